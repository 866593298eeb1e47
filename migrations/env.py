"""Alembic environment: the URL and connection come from service/db/migrate.py (Settings)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from service.db.migrate import include_object
from service.db.models import Base

config = context.config
target_metadata = Base.metadata
VERSION_TABLE = config.get_main_option("version_table")


def _run(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata,
                      version_table=VERSION_TABLE, include_object=include_object,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    with create_engine(config.attributes["url"]).connect() as conn:
        _run(conn)
