"""Source models: check that a folder is an HF causal-LM the workbench can quantize, and register it.

Inspection reads `config.json` and the safetensors *headers* only (no tensor data, no torch), so
checking a 16 GB model folder takes milliseconds and never executes anything from the folder.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open
from sqlalchemy.engine import Engine

from storage.crud import find_source_model, insert_row, list_source_models
from storage.models import SourceModel
from workbench.settings import Settings

log = logging.getLogger(__name__)

__all__ = [
    "MODEL_NAME_RE",
    "SUPPORTED_ARCHITECTURES",
    "ModelError",
    "ModelInfo",
    "add_model",
    "check_model_name",
    "get_model",
    "inspect_model_dir",
    "list_models",
]

# Architectures whose linears QuantFactory and both runtimes know (dense decoder-only, q/k/v/o + MLP).
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
# safetensors dtype tag -> the name stored in SourceModel.dtype (torch's spelling).
_FLOAT_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


class ModelError(ValueError):
    """A model folder or name the workbench cannot use; the message says why and what to do."""


@dataclass(frozen=True)
class ModelInfo:
    """What `inspect_model_dir` found in a model folder."""

    path: Path
    architecture: str
    num_layers: int
    hidden_size: int
    dtype: str
    num_params: int
    size_bytes: int
    weight_files: tuple[str, ...]


def _read_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelError(
            f"{path} has no config.json, so it is not a Hugging Face model folder; "
            "point at the folder that holds config.json and *.safetensors"
        )
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{cfg_path} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{cfg_path} must hold a JSON object")
    return cfg


def _architecture(cfg: dict, path: Path) -> str:
    archs = cfg.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"{path}: architecture {arch!r} is not supported; supported causal LMs are "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "?")
        raise ModelError(
            f"{path} is already quantized ({method}); add the unquantized bf16/fp16/fp32 model instead"
        )
    return arch


def _weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise ModelError(
            f"{path} holds only pickle weights ({', '.join(pickles[:3])}). Pickle files can run arbitrary "
            "code when loaded, so the workbench reads *.safetensors only; convert them once with "
            "transformers (from_pretrained(...).save_pretrained(dir, safe_serialization=True))"
        )
    raise ModelError(f"{path} has no *.safetensors weight files")


def _scan_weights(files: list[Path]) -> tuple[int, str]:
    """(parameter count, dominant float dtype) from the safetensors headers."""
    num_params = 0
    per_dtype: dict[str, int] = {}
    for file in files:
        try:
            with safe_open(file, framework="numpy") as handle:
                for key in handle.keys():
                    tensor = handle.get_slice(key)
                    count = 1
                    for dim in tensor.get_shape():
                        count *= dim
                    num_params += count
                    tag = tensor.get_dtype()
                    per_dtype[tag] = per_dtype.get(tag, 0) + count
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelError(f"{file} is not a readable safetensors file: {exc}") from None
    if num_params == 0:
        raise ModelError(f"the safetensors files in {files[0].parent} hold no tensors")
    dominant = max(per_dtype, key=per_dtype.get)
    if dominant not in _FLOAT_DTYPES:
        raise ModelError(
            f"{files[0].parent}: weights are mostly {dominant}; the workbench quantizes bf16, fp16 or "
            "fp32 models only (this one looks already quantized)"
        )
    return num_params, _FLOAT_DTYPES[dominant]


def inspect_model_dir(path: Path) -> ModelInfo:
    """Check that `path` is an HF causal-LM folder the workbench supports; `ModelError` if not."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path} does not exist")
    if not path.is_dir():
        raise ModelError(f"{path} is a file; give the model's folder (with config.json and *.safetensors)")
    cfg = _read_config(path)
    arch = _architecture(cfg, path)
    num_layers, hidden = cfg.get("num_hidden_layers"), cfg.get("hidden_size")
    if not isinstance(num_layers, int) or not isinstance(hidden, int) or num_layers < 1 or hidden < 1:
        raise ModelError(f"{path}/config.json: num_hidden_layers and hidden_size must be positive integers")
    files = _weight_files(path)
    num_params, dtype = _scan_weights(files)
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return ModelInfo(
        path=path.resolve(),
        architecture=arch,
        num_layers=num_layers,
        hidden_size=hidden,
        dtype=dtype,
        num_params=num_params,
        size_bytes=size,
        weight_files=tuple(f.name for f in files),
    )


def check_model_name(name: str) -> str:
    """Return `name` if it can name a model (letters, digits, `_.-`, up to 64); ModelError if not."""
    if not isinstance(name, str) or not MODEL_NAME_RE.match(name):
        raise ModelError(
            f"model name {name!r} is not allowed: use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


def add_model(
    engine: Engine, *, name: str, path: Path, settings: Settings | None = None, is_default: bool = False
) -> SourceModel:
    """Inspect `path` and register it as SourceModel `name`; nothing is written if any check fails.

    With `settings`, the path must also lie inside the data dir or an allowed root (user input).
    """
    check_model_name(name)
    if settings is not None:
        from workbench.paths import resolve_user_path  # local: keeps paths optional for library users

        try:
            path = resolve_user_path(path, settings=settings, kind="folder")
        except ValueError as exc:
            raise ModelError(str(exc)) from None
    if find_source_model(engine, name=name) is not None:
        raise ModelError(f"a model named {name!r} already exists; choose another name")
    info = inspect_model_dir(path)
    row = SourceModel(
        name=name,
        path=str(info.path),
        architecture=info.architecture,
        dtype=info.dtype,
        num_params=info.num_params,
        num_layers=info.num_layers,
        size_bytes=info.size_bytes,
        is_default=is_default,
    )
    try:
        row = insert_row(engine, row)
    except ValueError as exc:  # lost a race with another writer for the same name
        raise ModelError(str(exc)) from None
    log.info("registered model %s (%s, %d params) at %s", name, info.architecture, info.num_params, info.path)
    return row


def get_model(engine: Engine, name_or_id: str | int) -> SourceModel:
    """The SourceModel by name, or by id when given an int or a string of digits; ModelError if missing."""
    row = find_source_model(engine, name=str(name_or_id))
    if row is None and (isinstance(name_or_id, int) or str(name_or_id).isdigit()):
        row = find_source_model(engine, id=int(name_or_id))
    if row is None:
        known = [m.name for m in list_source_models(engine)]
        raise ModelError(
            f"no model named {name_or_id!r}; known models: {', '.join(known) or 'none'} "
            "(add one with `flexquant models add NAME PATH` or run `flexquant init` for the default)"
        )
    return row


def list_models(engine: Engine) -> list[SourceModel]:
    """Every registered model, oldest first."""
    return list_source_models(engine)
