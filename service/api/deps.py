"""Dependencies of the routes: settings, a database session, the authenticated caller."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service.db import session_scope
from service.db import tokens as token_db
from service.db.models import Token, utcnow
from service.errors import PermissionDeniedError
from service.settings import Settings
from service.status import Role

#: last_used_at of a token is written at most this often
TOKEN_TOUCH_SECONDS = 60

_bearer = HTTPBearer(auto_error=False, description="an API token (hmaopt token create)")


async def get_settings_dep(request: Request) -> Settings:  # async: no thread-pool hop
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    with session_scope(settings.database()) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def _check(session: Session, creds, role: Role) -> Token:
    row = token_db.authenticate(session, creds.credentials if creds is not None else None)
    if not Role(row.role).allows(role):
        raise PermissionDeniedError(
            f"this needs the {role.value} role; token {row.name!r} has {row.role}")
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at > timedelta(
            seconds=TOKEN_TOUCH_SECONDS):
        row.last_used_at = now
    return row


def _caller(role: Role):
    def dependency(session: SessionDep,
                   creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
                   ) -> Token:
        return _check(session, creds, role)
    return dependency


def _streaming_caller(role: Role):
    """For long responses (SSE): authenticate in a session of its own, closed at once, so
    that an open stream holds no database connection."""
    def dependency(settings: SettingsDep,
                   creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
                   ) -> Token:
        with session_scope(settings.database()) as session:
            return _check(session, creds, role)
    return dependency


Viewer = Annotated[Token, Depends(_caller(Role.VIEWER))]
StreamViewer = Annotated[Token, Depends(_streaming_caller(Role.VIEWER))]
Operator = Annotated[Token, Depends(_caller(Role.OPERATOR))]
Admin = Annotated[Token, Depends(_caller(Role.ADMIN))]
