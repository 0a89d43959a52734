"""The accounts database: SQLite (default, under the cache dir, WAL) or PostgreSQL.

One SQLAlchemy engine per process. Writes on SQLite take the write lock up front
(``BEGIN IMMEDIATE``), so a read-then-write transaction never fails half-way on a lock upgrade;
on PostgreSQL the rows being changed are locked with ``SELECT ... FOR UPDATE``. The schema is
versioned by Alembic and upgraded on open, under a lock that serialises processes migrating at
once (a file lock beside the SQLite file, an advisory lock on PostgreSQL).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError

from mmembed.extras import install_hint

MIGRATIONS = Path(__file__).parent / "migrations"
PG_MIGRATION_LOCK = 0x6D6D656D  # advisory lock id ("mmem")


class StoreUnavailable(Exception):
    """The database cannot be reached or is locked; the message says which, for humans."""


def database_url(setting: str, cache_path: str) -> str:
    """The SQLAlchemy URL for the ``database_url`` setting ('' -> SQLite under the cache dir)."""
    if not setting:
        return "sqlite:///" + os.path.join(cache_path, "accounts.db")
    for prefix in ("postgresql://", "postgres://"):
        if setting.startswith(prefix):  # the plain form picks psycopg (3), our [postgres] extra
            return "postgresql+psycopg://" + setting[len(prefix) :]
    return setting


def describe_url(url: str) -> str:
    """The URL without its password, for messages and /health."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<invalid database_url>"


def explain(exc: BaseException) -> str:
    """A one-line reason for a database failure (never a password)."""
    if isinstance(exc, StoreUnavailable):
        return str(exc)
    inner = getattr(exc, "orig", None) or exc
    first = (str(inner).strip().splitlines() or [type(inner).__name__])[0]
    if "locked" in first.lower():
        return f"the accounts database is locked ({first})"
    return f"the accounts database is unavailable ({type(inner).__name__}: {first})"


def is_transient(exc: BaseException) -> bool:
    """Failures that mean 'database down or busy' (503), as opposed to our own bugs."""
    return isinstance(exc, OperationalError | StoreUnavailable) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    )


class Store:
    def __init__(self, url: str, timeout_s: float = 5.0, sync: str = "full") -> None:
        self.url = url
        self.timeout_s = timeout_s
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            self.path = parsed.database or ""
            if self.path and self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            if sync.lower() not in {"full", "normal"}:
                raise ValueError(f"database_sync must be 'full' or 'normal', got {sync!r}")
            self.engine = _sqlite_engine(url, timeout_s, sync.upper())
        elif self.dialect == "postgresql":
            self.path = ""
            self.engine = _postgres_engine(url, timeout_s)
        else:
            raise ValueError(
                f"database_url: unsupported database {self.dialect!r} (use sqlite or postgresql)"
            )

    def __repr__(self) -> str:
        return f"Store({describe_url(self.url)})"

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """A transaction that will write: committed on success, rolled back on error."""
        with self.engine.connect().execution_options(mmembed_write=True) as conn, conn.begin():
            yield conn

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def migrate(self) -> None:
        """Upgrade the schema to the latest revision; safe with several processes at once."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with self._migration_lock(), self.engine.connect() as conn:
            if self.dialect == "postgresql":  # held until this transaction ends
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_MIGRATION_LOCK})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            conn.commit()

    @contextlib.contextmanager
    def _migration_lock(self) -> Iterator[None]:
        if self.dialect != "sqlite" or not self.path or self.path == ":memory:":
            yield
            return
        with open(self.path + ".migrate-lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def ping(self) -> None:
        with self.read() as conn:
            conn.execute(text("SELECT 1"))

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_engine(url: str, timeout_s: float, sync: str) -> Engine:
    engine = create_engine(
        url,
        connect_args={"timeout": timeout_s, "check_same_thread": False},
        hide_parameters=True,  # see _postgres_engine
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
        cur.execute("PRAGMA journal_mode = WAL")
        # FULL: a commit is on disk when it returns, so an answered request survives even a
        # power cut; NORMAL (WAL): the commit is in the OS's cache, which survives a killed
        # process but not a power cut. Group commit pays for FULL's fsync.
        cur.execute(f"PRAGMA synchronous = {sync}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("mmembed_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def _postgres_engine(url: str, timeout_s: float) -> Engine:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise ValueError(
            "database_url names PostgreSQL, whose driver is in the postgres extra: "
            + install_hint("postgres")
        ) from None
    ms = int(timeout_s * 1000)
    return create_engine(
        url,
        pool_size=4,
        max_overflow=4,
        pool_pre_ping=True,
        pool_timeout=timeout_s,
        # A failed statement's message (and so any traceback or log line) never carries its
        # parameters: secret hashes, key names, ledger values.
        hide_parameters=True,
        connect_args={
            "connect_timeout": max(1, int(timeout_s)),
            "options": f"-c lock_timeout={ms} -c statement_timeout={ms * 4}",
        },
    )
