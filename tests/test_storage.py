"""storage.crud on a real SQLite file: lookups, unique inserts, policy upsert, DB errors."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import storage.db
from storage.crud import (
    find_checkpoint,
    find_policy,
    find_source_model,
    insert_row,
    list_checkpoints,
    list_policies,
    list_source_models,
    save_policy,
)
from storage.db import DatabaseError, open_db
from storage.models import Checkpoint, SourceModel


def model_row(name: str) -> SourceModel:
    return SourceModel(name=name, path=f"/models/{name}", architecture="LlamaForCausalLM")


def test_insert_find_list(db_engine) -> None:
    a = insert_row(db_engine, model_row("a"))
    b = insert_row(db_engine, model_row("b"))
    assert (a.id, b.id) == (1, 2) and a.path == "/models/a"  # readable after the session closed
    assert find_source_model(db_engine, name="b").id == b.id
    assert find_source_model(db_engine, id=a.id).name == "a"
    assert find_source_model(db_engine, name="zzz") is None
    assert [m.name for m in list_source_models(db_engine)] == ["a", "b"]
    ck = insert_row(db_engine, Checkpoint(name="ck", path="/ck", source_model_id=a.id))
    assert find_checkpoint(db_engine, name="ck").source_model_id == a.id
    assert [c.id for c in list_checkpoints(db_engine)] == [ck.id]


def test_duplicate_name_is_refused_and_nothing_added(db_engine) -> None:
    insert_row(db_engine, model_row("a"))
    with pytest.raises(ValueError, match="named 'a' already exists"):
        insert_row(db_engine, model_row("a"))
    assert len(list_source_models(db_engine)) == 1


def test_save_policy_inserts_then_replaces(db_engine) -> None:
    first = save_policy(db_engine, name="p", body_yaml="v1")
    time.sleep(0.01)
    second = save_policy(db_engine, name="p", body_yaml="v2", origin="autotune", data_json='{"x": 1}')
    assert second.id == first.id and second.created_at == first.created_at
    assert second.updated_at > first.updated_at
    row = find_policy(db_engine, name="p")
    assert (row.body_yaml, row.origin, row.data_json) == ("v2", "autotune", '{"x": 1}')
    save_policy(db_engine, name="q", body_yaml="v1")
    assert [p.name for p in list_policies(db_engine)] == ["p", "q"]


def test_write_while_locked_is_a_database_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(storage.db, "BUSY_TIMEOUT_MS", 200)
    db = tmp_path / "wb.db"
    engine = open_db(db)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sqlite3,sys,time; c=sqlite3.connect(sys.argv[1], isolation_level=None);"
         "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(30)", str(db)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DatabaseError, match=r"wb\.db: database is locked; another program"):
            save_policy(engine, name="p", body_yaml="v1")
    finally:
        holder.kill()
        holder.wait()
    assert sqlite3.connect(db).execute("select count(*) from policyrecord").fetchone() == (0,)
    engine.dispose()


def test_damaged_file_is_a_database_error(tmp_path: Path) -> None:
    db = tmp_path / "wb.db"
    engine = open_db(db)
    engine.dispose()
    # Corrupt the header page after the engine was made: reads must fail with a clear error.
    data = bytearray(db.read_bytes())
    data[:100] = b"\x00" * 100
    db.write_bytes(bytes(data))
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    with pytest.raises(DatabaseError, match=r"could not list SourceModel in .*wb\.db"):
        list_source_models(engine)
    engine.dispose()
