"""Shared pytest fixtures: a real workbench SQLite file per test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# `pytest` (not only `python -m pytest` from the repo root) must find storage/, jobs/, workbench/.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from storage.db import open_db  # noqa: E402


@pytest.fixture
def db_engine(tmp_path: Path):
    """A fresh workbench DB at tmp_path/'wb.db' (tables created)."""
    engine = open_db(tmp_path / "wb.db")
    yield engine
    engine.dispose()
