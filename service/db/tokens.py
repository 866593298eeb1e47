"""API tokens: created once (shown once), stored as SHA-256, looked up by hash."""

from __future__ import annotations

import hashlib
import secrets
import uuid

from sqlalchemy import select

from service.db.models import Token, utcnow
from service.errors import AuthenticationError, NotFoundError
from service.status import Role

#: every token starts with this, so that secret scanners can find leaked ones
TOKEN_PREFIX = "hmaopt_"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(session, role: Role, name: str) -> tuple[Token, str]:
    """A new token row and the token itself (the only time it is known)."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = Token(id=uuid.uuid4().hex, name=name, role=Role(role).value,
                token_hash=hash_token(token))
    session.add(row)
    session.flush()
    return row, token


def authenticate(session, token: str | None) -> Token:
    """The live token row for ``token``; AuthenticationError when missing, unknown or revoked."""
    if not token:
        raise AuthenticationError("this endpoint needs an API token: send "
                                  "'Authorization: Bearer <token>' (hmaopt token create)")
    row = session.scalar(select(Token).where(Token.token_hash == hash_token(token)))
    if row is None or row.revoked_at is not None:
        raise AuthenticationError("unknown or revoked API token")
    return row


def revoke_token(session, token_id: str) -> Token:
    row = session.get(Token, token_id)
    if row is None:
        raise NotFoundError(f"no token with id {token_id}")
    row.revoked_at = row.revoked_at or utcnow()
    return row


def list_tokens(session) -> list[Token]:
    return list(session.scalars(select(Token).order_by(Token.created_at)))
