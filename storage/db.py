"""The SQLite engine: one file, WAL mode, a busy timeout, and a schema-version check at start.

An incompatible or unreadable database raises `DatabaseError` with what is wrong and how to fix it;
nothing is ever migrated or overwritten silently.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DatabaseError as SADatabaseError
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, SQLModel, create_engine, select

from storage.models import SCHEMA_VERSION, SchemaInfo

BUSY_TIMEOUT_MS = 30_000


class DatabaseError(RuntimeError):
    """The workbench DB cannot be used as it is; the message says why and what to do."""


def _on_connect(dbapi_conn: sqlite3.Connection, _record: object) -> None:
    # Let SQLAlchemy's BEGIN be ours: pysqlite otherwise opens transactions lazily and the
    # claim's BEGIN IMMEDIATE would not take the write lock up front.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _on_begin(conn) -> None:  # noqa: ANN001 - SQLAlchemy connection
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.get("immediate") else "BEGIN")


def make_engine(db_path: Path) -> Engine:
    """Engine for one SQLite file; creates the folder, not the tables (see `init_db`)."""
    db_path = Path(db_path)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        f"sqlite:///{db_path}",
        connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000},
    )
    event.listen(engine, "connect", _on_connect)
    event.listen(engine, "begin", _on_begin)
    return engine


def init_db(engine: Engine) -> None:
    """Create tables on a new DB; on an existing one check the schema version first."""
    path = engine.url.database
    try:
        with engine.connect() as conn:
            has_schema = conn.execute(
                text("SELECT name FROM sqlite_master WHERE type='table' AND name='schemainfo'")
            ).first()
            other_tables = conn.execute(
                text("SELECT count(*) FROM sqlite_master WHERE type='table'")
            ).scalar_one()
    except (SADatabaseError, OperationalError) as exc:
        raise DatabaseError(
            f"cannot open the workbench database {path}: {exc.orig}. If another program holds it, "
            "close that program; if the file is not a FlexQuant database, move it away or set "
            "FLEXQUANT_DATA_DIR to another folder."
        ) from None
    if has_schema is None and other_tables:
        raise DatabaseError(
            f"{path} is an SQLite file but not a FlexQuant workbench database (no schemainfo table); "
            "refusing to touch it. Point FLEXQUANT_DATA_DIR at another folder."
        )
    if has_schema is not None:
        with Session(engine) as session:
            info = session.exec(select(SchemaInfo)).first()
        found = info.version if info else None
        if found != SCHEMA_VERSION:
            raise DatabaseError(
                f"{path} has schema version {found}, this workbench needs {SCHEMA_VERSION}. "
                "Use the workbench version that created it, or start with a new FLEXQUANT_DATA_DIR."
            )
        return
    SQLModel.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(SchemaInfo(version=SCHEMA_VERSION))
        session.commit()


def open_db(db_path: Path) -> Engine:
    engine = make_engine(db_path)
    init_db(engine)
    return engine


@contextmanager
def write_session(engine: Engine) -> Iterator[Session]:
    """A session whose transaction starts with BEGIN IMMEDIATE: read-then-write without races."""
    with engine.connect() as conn:
        conn.info["immediate"] = True
        try:
            with Session(bind=conn) as session:
                yield session
        finally:
            conn.info.pop("immediate", None)
