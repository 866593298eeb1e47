"""Alembic, configured in code: ``hmaopt db upgrade`` and the start-up schema check."""

from __future__ import annotations

from pathlib import Path

from service.db.session import VERSION_TABLE, current_revision, safe_url
from service.errors import DependencyUnavailableError


def include_object(obj, name, type_, reflected, compare_to) -> bool:
    """Only the service's tables: Optuna's live in the same database."""
    return type_ != "table" or (name.startswith("hmaopt_") and name != VERSION_TABLE)


def schema_diff(url: str) -> list:
    """Differences between the models and the database (empty when they agree)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from service.db.models import Base
    from service.db.session import get_engine

    with get_engine(url).connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"include_object": include_object,
                                                     "compare_type": True})
        return compare_metadata(ctx, Base.metadata)


def _config(url: str):
    from alembic.config import Config

    import migrations

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    cfg.set_main_option("version_table", VERSION_TABLE)
    cfg.attributes["url"] = url
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config("sqlite://")).get_current_head()


def upgrade(url: str, revision: str = "head") -> tuple[str | None, str]:
    """Apply the migrations up to ``revision``; returns (revision before, revision after)."""
    from alembic import command
    from sqlalchemy.exc import SQLAlchemyError

    from service.db.session import get_engine, translate

    before = current_revision(url)
    try:
        with get_engine(url).begin() as conn:
            cfg = _config(url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    except SQLAlchemyError as exc:
        raise translate(exc, url) from exc
    return before, current_revision(url)


def check_schema(url: str) -> None:
    """Refuse to run against a database whose schema is not at the head revision."""
    have, want = current_revision(url), head_revision()
    if have != want:
        state = "has no hmaopt tables" if have is None else f"is at revision {have}"
        raise DependencyUnavailableError(
            f"the database {safe_url(url)} {state}, this hmaopt needs {want}: "
            "run `hmaopt db upgrade`")
