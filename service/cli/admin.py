"""The admin commands, run against the service database: ``hmaopt db upgrade|current`` and
``hmaopt token create|list|revoke``.

``service.db`` is imported inside the handlers: SQLAlchemy and Alembic add about 0.2 s to
every ``hmaopt`` start, ``--help`` included, and only these commands need them here.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager

from service.cli.helpers import add_command, add_group
from service.cli.output import add_json_flag, emit, note
from service.errors import DependencyUnavailableError
from service.settings import get_settings
from service.status import Role


def add_db(sub) -> None:
    db = add_group(sub, "db", help="the service database")
    up = add_json_flag(add_command(db, "upgrade", db_upgrade_command, help="apply the "
                                   "migrations (DATABASE_URL, or the embedded SQLite file)"))
    up.add_argument("--revision", default="head", help="target revision (default head)")
    add_json_flag(add_command(db, "current", db_current_command,
                              help="print the schema revision of the database"))


def add_token(sub) -> None:
    token = add_group(sub, "token", help="API tokens (stored hashed; shown once)")
    create = add_command(token, "create", token_create_command,
                         help="create a token; it is printed alone on the last line")
    create.add_argument("--role", required=True, choices=["viewer", "operator", "admin"],
                        help="viewer: read; operator: also submit, cancel, export; admin: all")
    create.add_argument("--name", default=None, help="who or what uses it (default: the role)")
    add_json_flag(create)
    add_json_flag(add_command(token, "list", token_list_command,
                              help="list tokens (never the tokens themselves)"))
    revoke = add_json_flag(add_command(token, "revoke", token_revoke_command,
                                       help="revoke a token by its id"))
    revoke.add_argument("id")


def db_upgrade_command(args: argparse.Namespace) -> int:
    from service.db.migrate import upgrade
    from service.db.session import safe_url

    url = get_settings().database()
    before, after = upgrade(url, args.revision)
    emit(args, {"database": safe_url(url), "before": before, "after": after},
         f"database {safe_url(url)} is at revision {after}: nothing to do" if before == after
         else f"database {safe_url(url)} upgraded: {before or 'empty'} -> {after}")
    return 0


def db_current_command(args: argparse.Namespace) -> int:
    """Print the database's schema revision; exit 6 (like every command that needs the
    schema) when it is not the head: run `hmaopt db upgrade`."""
    from service.db.migrate import head_revision
    from service.db.session import current_revision, safe_url

    url = get_settings().database()
    have, head = current_revision(url), head_revision()
    emit(args, {"database": safe_url(url), "revision": have, "head": head},
         f"{safe_url(url)}: revision {have or 'none (run hmaopt db upgrade)'} (head {head})")
    if have != head:
        raise DependencyUnavailableError(f"the database {safe_url(url)} is at revision "
                                         f"{have or 'none'}, not {head}: run `hmaopt db upgrade`")
    return 0


@contextmanager
def _token_session() -> Iterator:
    """A session on the settings' database, once its schema is checked to be current."""
    from service.db import session_scope
    from service.db.migrate import check_schema

    url = get_settings().database()
    check_schema(url)
    with session_scope(url) as session:
        yield session


def token_create_command(args: argparse.Namespace) -> int:
    from service.db.tokens import create_token

    with _token_session() as session:
        row, token = create_token(session, Role(args.role), args.name or args.role)
        note(f"created {row.role} token {row.name!r} (id {row.id}); it is shown only now:")
        data = {"id": row.id, "name": row.name, "role": row.role, "token": token}
    emit(args, data, token)
    return 0


def token_list_command(args: argparse.Namespace) -> int:
    from service.db.tokens import list_tokens

    with _token_session() as session:
        rows = [{"id": t.id, "name": t.name, "role": t.role,
                 "created_at": t.created_at.isoformat(),
                 "last_used_at": t.last_used_at.isoformat() if t.last_used_at else None,
                 "revoked_at": t.revoked_at.isoformat() if t.revoked_at else None}
                for t in list_tokens(session)]

    def line(t: dict) -> str:
        used = t["last_used_at"][:19] if t["last_used_at"] else "never"
        return (f"{t['id']}  {t['role']:<8}  {'revoked' if t['revoked_at'] else 'active':<7}  "
                f"last used {used:<25}  {t['name']}")
    emit(args, {"data": rows, "count": len(rows)}, "\n".join(map(line, rows)) if rows else None)
    return 0


def token_revoke_command(args: argparse.Namespace) -> int:
    from service.db.tokens import revoke_token

    with _token_session() as session:
        row = revoke_token(session, args.id)
        data = {"id": row.id, "name": row.name, "role": row.role,
                "revoked_at": row.revoked_at.isoformat()}
    emit(args, data, f"revoked token {data['name']!r} ({data['id']})")
    return 0
