"""Small keyword-only helpers for the rows most parts read: SourceModel, Checkpoint, PolicyRecord.

They keep SQL out of the CLI/UI and turn SQLite's "locked"/"not a database" failures into
`storage.db.DatabaseError` with a message a user can act on. Validation of *what* is stored
(model folders, policies) lives in the workbench; this module only reads and writes rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.engine import Engine
from sqlalchemy.exc import DatabaseError as SADatabaseError
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, select

from storage.db import DatabaseError, write_session
from storage.models import Checkpoint, PolicyRecord, SourceModel, now

__all__ = [
    "db_errors",
    "find_checkpoint",
    "find_policy",
    "find_source_model",
    "insert_row",
    "list_checkpoints",
    "list_policies",
    "list_source_models",
    "save_policy",
]


@contextmanager
def db_errors(engine: Engine, action: str) -> Iterator[None]:
    """Re-raise SQLite failures during `action` as `DatabaseError` naming the file and a fix."""
    try:
        yield
    except OperationalError as exc:
        reason = str(exc.orig)
        hint = (
            "another program holds a write lock on it; wait for it to finish or close it, then retry"
            if "locked" in reason or "busy" in reason
            else "check that the file is readable and writable and the disk is not full"
        )
        raise DatabaseError(f"could not {action} in {engine.url.database}: {reason}; {hint}") from None
    except SADatabaseError as exc:
        raise DatabaseError(
            f"could not {action} in {engine.url.database}: {exc.orig}; the file may be damaged or not a "
            "FlexQuant database; move it away or set FLEXQUANT_DATA_DIR to another folder"
        ) from None


def _find(engine: Engine, table: type, *, name: str | None, id: int | None):  # noqa: A002
    with db_errors(engine, f"read {table.__name__}"), Session(engine) as session:
        if id is not None:
            return session.get(table, id)
        return session.exec(select(table).where(table.name == name)).first()


def find_source_model(
    engine: Engine, *, name: str | None = None, id: int | None = None  # noqa: A002 - the column's name
) -> SourceModel | None:
    """The SourceModel with this id (if given) or name, or None."""
    return _find(engine, SourceModel, name=name, id=id)


def find_checkpoint(engine: Engine, *, name: str | None = None, id: int | None = None) -> Checkpoint | None:  # noqa: A002
    """The Checkpoint with this id (if given) or name, or None."""
    return _find(engine, Checkpoint, name=name, id=id)


def find_policy(engine: Engine, *, name: str) -> PolicyRecord | None:
    """The PolicyRecord with this name, or None."""
    return _find(engine, PolicyRecord, name=name, id=None)


def _list(engine: Engine, table: type) -> list:
    with db_errors(engine, f"list {table.__name__}"), Session(engine) as session:
        return list(session.exec(select(table).order_by(table.id)))


def list_source_models(engine: Engine) -> list[SourceModel]:
    return _list(engine, SourceModel)


def list_checkpoints(engine: Engine) -> list[Checkpoint]:
    return _list(engine, Checkpoint)


def list_policies(engine: Engine) -> list[PolicyRecord]:
    return _list(engine, PolicyRecord)


def insert_row(engine: Engine, row, *, unique_name: bool = True):  # noqa: ANN001 - any table row
    """Insert `row` in one BEGIN IMMEDIATE transaction; ValueError if its name is taken.

    Checking and inserting under the write lock means two writers cannot both pass the check.
    """
    table = type(row)
    with db_errors(engine, f"save {table.__name__}"), write_session(engine) as session:
        if unique_name and session.exec(select(table).where(table.name == row.name)).first() is not None:
            raise ValueError(f"a {table.__name__} named {row.name!r} already exists; choose another name")
        session.add(row)
        session.commit()
        session.refresh(row)
        return row


def save_policy(
    engine: Engine, *, name: str, body_yaml: str, origin: str = "user", data_json: str | None = None
) -> PolicyRecord:
    """Insert the named policy or replace its text (an edit keeps the row and its created_at)."""
    with db_errors(engine, "save the policy"), write_session(engine) as session:
        row = session.exec(select(PolicyRecord).where(PolicyRecord.name == name)).first()
        if row is None:
            row = PolicyRecord(name=name, body_yaml=body_yaml, origin=origin, data_json=data_json)
        else:
            row.body_yaml, row.origin, row.data_json, row.updated_at = body_yaml, origin, data_json, now()
        session.add(row)
        session.commit()
        session.refresh(row)
        return row
