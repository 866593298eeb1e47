"""Dependencies of the routes: settings, a database session, the authenticated caller."""

from __future__ import annotations

import hmac
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


#: the dashboard's cookies: the API token (HttpOnly) and the CSRF token (read by its scripts)
SESSION_COOKIE = "hmaopt_session"
CSRF_COOKIE = "hmaopt_csrf"
#: header (or form field ``csrf``) that must repeat the CSRF cookie on a cookie-authenticated
#: mutation (double-submit)
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def request_token(request: Request, creds, form_csrf: str | None = None) -> str | None:
    """The caller's API token: the Bearer header, else the dashboard's session cookie. A
    cookie-authenticated mutation must carry the CSRF token (header or form field)."""
    if creds is not None:
        return creds.credentials
    token = request.cookies.get(SESSION_COOKIE)
    if token is not None and request.method not in SAFE_METHODS:
        sent = request.headers.get(CSRF_HEADER) or form_csrf or ""
        expected = request.cookies.get(CSRF_COOKIE) or ""
        if not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
            raise PermissionDeniedError(
                f"missing or wrong CSRF token: a signed-in browser must send the "
                f"{CSRF_COOKIE} cookie's value in the {CSRF_HEADER} header", field=CSRF_HEADER)
    return token


def _check(session: Session, token: str | None, role: Role) -> Token:
    row = token_db.authenticate(session, token)
    if not Role(row.role).allows(role):
        raise PermissionDeniedError(
            f"this needs the {role.value} role; token {row.name!r} has {row.role}",
            field="role")
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at > timedelta(
            seconds=TOKEN_TOUCH_SECONDS):
        row.last_used_at = now
    return row


def _caller(role: Role):
    def dependency(session: SessionDep, request: Request,
                   creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
                   ) -> Token:
        return _check(session, request_token(request, creds), role)
    return dependency


def _streaming_caller(role: Role):
    """For long responses (SSE): authenticate in a session of its own, closed at once, so
    that an open stream holds no database connection."""
    def dependency(settings: SettingsDep, request: Request,
                   creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
                   ) -> Token:
        with session_scope(settings.database()) as session:
            return _check(session, request_token(request, creds), role)
    return dependency


Viewer = Annotated[Token, Depends(_caller(Role.VIEWER))]
StreamViewer = Annotated[Token, Depends(_streaming_caller(Role.VIEWER))]
Operator = Annotated[Token, Depends(_caller(Role.OPERATOR))]
Admin = Annotated[Token, Depends(_caller(Role.ADMIN))]
