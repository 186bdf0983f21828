"""Model folders: inspection from headers, registration, and every refusal leaving the DB unchanged."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import storage.db
from storage.crud import list_source_models
from storage.db import DatabaseError, open_db
from workbench.models import (
    SUPPORTED_ARCHITECTURES,
    ModelError,
    add_model,
    get_model,
    inspect_model_dir,
    list_models,
)
from workbench.paths import PathNotAllowed, resolve_user_path
from workbench.settings import Settings

TINY_SHAPES = {
    "model.embed_tokens.weight": (256, 64),
    "model.layers.0.self_attn.q_proj.weight": (64, 64),
    "model.layers.0.mlp.up_proj.weight": (128, 64),
    "model.layers.1.self_attn.q_proj.weight": (64, 64),
    "model.norm.weight": (64,),
}


def make_model_dir(
    path: Path, *, arch: str = "LlamaForCausalLM", dtype: torch.dtype = torch.bfloat16, shards: int = 1
) -> Path:
    """A minimal HF-style folder: config.json plus random tensors split over `shards` files."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": [arch], "model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64}
    (path / "config.json").write_text(json.dumps(cfg))
    items = list(TINY_SHAPES.items())
    for i in range(shards):
        part = {k: torch.randn(shape).to(dtype) for k, shape in items[i::shards]}
        save_file(part, str(path / f"model-{i:05d}-of-{shards:05d}.safetensors"))
    return path


def expected_params() -> int:
    return sum(torch.Size(s).numel() for s in TINY_SHAPES.values())


def db_snapshot(engine) -> list[tuple]:
    return [(m.id, m.name, m.path) for m in list_source_models(engine)]


@pytest.mark.parametrize("dtype,name", [(torch.bfloat16, "bfloat16"), (torch.float16, "float16"),
                                        (torch.float32, "float32")])
def test_inspect_reads_headers(tmp_path: Path, dtype, name) -> None:
    folder = make_model_dir(tmp_path / "m", dtype=dtype, shards=2)
    info = inspect_model_dir(folder)
    assert info.architecture == "LlamaForCausalLM"
    assert (info.num_layers, info.hidden_size, info.dtype) == (2, 64, name)
    assert info.num_params == expected_params()
    assert info.size_bytes == sum(p.stat().st_size for p in folder.iterdir())
    assert len(info.weight_files) == 2


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
def test_every_supported_architecture_is_accepted(tmp_path: Path, arch: str) -> None:
    assert inspect_model_dir(make_model_dir(tmp_path / arch, arch=arch)).architecture == arch


def test_inspect_refusals(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        inspect_model_dir(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ModelError, match="is a file"):
        inspect_model_dir(tmp_path / "file.txt")
    with pytest.raises(ModelError, match="no config.json"):
        inspect_model_dir(tmp_path)
    bad = make_model_dir(tmp_path / "gemma", arch="Gemma3ForCausalLM")
    with pytest.raises(ModelError, match="Gemma3ForCausalLM.*not supported.*LlamaForCausalLM"):
        inspect_model_dir(bad)
    broken = make_model_dir(tmp_path / "broken")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        inspect_model_dir(broken)


def test_pickle_weights_are_refused_with_reason(tmp_path: Path) -> None:
    folder = make_model_dir(tmp_path / "p")
    for f in folder.glob("*.safetensors"):
        f.unlink()
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="pickle.*arbitrary code.*safetensors"):
        inspect_model_dir(folder)


def test_corrupt_safetensors_and_int_weights(tmp_path: Path) -> None:
    folder = make_model_dir(tmp_path / "c")
    next(folder.glob("*.safetensors")).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ModelError, match="not a readable safetensors"):
        inspect_model_dir(folder)
    folder = make_model_dir(tmp_path / "i", dtype=torch.int8)
    with pytest.raises(ModelError, match="mostly I8"):
        inspect_model_dir(folder)


def test_add_get_list(db_engine, tmp_path: Path) -> None:
    folder = make_model_dir(tmp_path / "tiny")
    row = add_model(db_engine, name="tiny-llama", path=folder)
    assert row.id is not None and row.num_params == expected_params() and row.num_layers == 2
    assert get_model(db_engine, "tiny-llama").path == str(folder.resolve())
    assert get_model(db_engine, row.id).name == "tiny-llama"
    assert get_model(db_engine, str(row.id)).name == "tiny-llama"
    assert [m.name for m in list_models(db_engine)] == ["tiny-llama"]
    with pytest.raises(ModelError, match="no model named 'other'.*tiny-llama"):
        get_model(db_engine, "other")


def test_add_refusals_change_nothing(db_engine, tmp_path: Path) -> None:
    good = make_model_dir(tmp_path / "good")
    add_model(db_engine, name="m1", path=good)
    before = db_snapshot(db_engine)
    with pytest.raises(ModelError, match="already exists"):
        add_model(db_engine, name="m1", path=good)
    for bad_name in ["", "has space", "../x", "-lead", "x" * 65]:
        with pytest.raises(ModelError, match="not allowed"):
            add_model(db_engine, name=bad_name, path=good)
    with pytest.raises(ModelError, match="not supported"):
        add_model(db_engine, name="g", path=make_model_dir(tmp_path / "g", arch="GPT2LMHeadModel"))
    with pytest.raises(ModelError, match="no config.json"):
        add_model(db_engine, name="empty", path=tmp_path)
    assert db_snapshot(db_engine) == before


def test_add_with_settings_confines_paths(db_engine, tmp_path: Path) -> None:
    data, outside = tmp_path / "data", tmp_path / "outside"
    folder = make_model_dir(outside / "m")
    settings = Settings(data_dir=data)
    with pytest.raises(ModelError, match="outside the folders.*FLEXQUANT_ALLOWED_ROOTS.*--allow-root"):
        add_model(db_engine, name="m", path=folder, settings=settings)
    assert db_snapshot(db_engine) == []
    allowed = Settings(data_dir=data, allowed_roots=[outside])
    row = add_model(db_engine, name="m", path=folder, settings=allowed)
    assert row.path == str(folder.resolve())


def test_resolve_user_path_follows_symlinks(tmp_path: Path) -> None:
    data, outside = tmp_path / "data", tmp_path / "outside"
    data.mkdir()
    outside.mkdir()
    (outside / "f.txt").write_text("x")
    (data / "sneaky").symlink_to(outside)
    settings = Settings(data_dir=data)
    with pytest.raises(PathNotAllowed, match="outside"):
        resolve_user_path(data / "sneaky", settings=settings)
    with pytest.raises(PathNotAllowed, match="outside"):
        resolve_user_path(data / ".." / "outside", settings=settings)
    (data / "inner").mkdir()
    assert resolve_user_path(data / "inner", settings=settings) == (data / "inner").resolve()
    with pytest.raises(PathNotAllowed, match="does not exist"):
        resolve_user_path(data / "missing", settings=settings)
    new = resolve_user_path(data / "missing", settings=settings, must_exist=False)
    assert new == (data / "missing").resolve()
    with pytest.raises(PathNotAllowed, match="is a file"):
        resolve_user_path(outside / "f.txt", settings=Settings(data_dir=data, allowed_roots=[outside]))
    # A sibling whose name merely starts with the root's name is not inside it.
    (tmp_path / "data2").mkdir()
    with pytest.raises(PathNotAllowed):
        resolve_user_path(tmp_path / "data2", settings=settings)


def test_locked_db_gives_database_error_and_changes_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(storage.db, "BUSY_TIMEOUT_MS", 200)
    engine = open_db(tmp_path / "wb.db")
    folder = make_model_dir(tmp_path / "m")
    # Another *process* holds the write lock, as a second workbench or a DB browser would.
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sqlite3,sys,time; c=sqlite3.connect(sys.argv[1], isolation_level=None);"
         "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(30)",
         str(tmp_path / "wb.db")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DatabaseError, match="locked.*another program"):
            add_model(engine, name="m", path=folder)
    finally:
        holder.kill()
        holder.wait()
    assert sqlite3.connect(tmp_path / "wb.db").execute("select count(*) from sourcemodel").fetchone() == (0,)
    engine.dispose()
