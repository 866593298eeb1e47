"""Engines and sessions: every database call goes through :func:`session_scope`
(the API's session dependency included).

:func:`translate` turns a driver error into one that names the fix: an unreachable
database into DependencyUnavailableError (check DATABASE_URL), a database without the
service's tables into DependencyUnavailableError (run ``hmaopt db upgrade``). It is called
at the edges, chained to the cause: the API's error handler (service.api.errors), the
schema check (service.db.migrate) and :func:`current_revision`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service.errors import DependencyUnavailableError

#: Alembic's version table of the service (Optuna keeps its own ``alembic_version``).
VERSION_TABLE = "hmaopt_alembic_version"
#: Seconds a SQLite writer waits for a lock held by another process.
SQLITE_BUSY_SECONDS = 30

_engines: dict[str, Engine] = {}
_factories: dict[str, sessionmaker] = {}
_lock = threading.Lock()


def safe_url(url: str | None) -> str | None:
    """The URL without its password, for messages and logs."""
    if url is None or "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    creds, _, host = rest.rpartition("@")
    return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"


def engine_kwargs(url: str) -> dict:
    """Keyword arguments of create_engine for ``url`` (also given to Optuna's RDBStorage)."""
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": SQLITE_BUSY_SECONDS, "check_same_thread": False}}
    return {"pool_pre_ping": True, "pool_size": 10, "max_overflow": 20}


def get_engine(url: str) -> Engine:
    """One engine per URL and process (SQLite: WAL mode, so readers never block the writer)."""
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            if url.startswith("sqlite:///"):
                Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, **engine_kwargs(url))
            if url.startswith("sqlite"):
                event.listen(engine, "connect", _sqlite_pragmas)
            _engines[url] = engine
        return engine


def dispose_engines() -> None:
    """Close every pooled connection (after a fork, and in tests)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _factories.clear()


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_SECONDS * 1000}")
    cur.close()


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits when the block ends and rolls back when it raises; closed
    either way. Driver errors pass through unchanged (SQLAlchemyError): the edge that
    catches them translates them (:func:`translate`)."""
    factory = _factories.get(url)
    if factory is None:  # one per URL: a sessionmaker per call costs ~0.1 ms of setup
        factory = _factories.setdefault(url, sessionmaker(get_engine(url),
                                                          expire_on_commit=False))
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def translate(exc: SQLAlchemyError, url: str) -> Exception:
    """The hmaopt error for a driver error (call as ``raise translate(exc, url) from exc``)."""
    where = safe_url(url)
    if isinstance(exc, OperationalError | ProgrammingError) and _missing_table(exc):
        return DependencyUnavailableError(
            f"the database {where} has no hmaopt tables: run `hmaopt db upgrade`")
    if isinstance(exc, OperationalError) or (isinstance(exc, DBAPIError)
                                             and exc.connection_invalidated):
        return DependencyUnavailableError(
            f"cannot reach the database {where}: {exc.orig or exc}; check DATABASE_URL")
    return DependencyUnavailableError(f"database error on {where}: {exc}")


def _missing_table(exc: SQLAlchemyError) -> bool:
    msg = str(getattr(exc, "orig", exc)).lower()
    return "no such table" in msg or ("relation" in msg and "does not exist" in msg)


def current_revision(url: str) -> str | None:
    """The service schema's Alembic revision in the database (None: never upgraded)."""
    engine = get_engine(url)
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table(VERSION_TABLE):
                return None
            return conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
    except SQLAlchemyError as exc:
        raise translate(exc, url) from exc
