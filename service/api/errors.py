"""The one table from hmaopt's errors to HTTP responses; every error body is JSON::

    {"error": "invalid_spec", "message": "tax.budget: Input should be ...", "field": "tax.budget"}
"""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import (AuthenticationError, ConflictError, DependencyUnavailableError,
                            HmaoptError, NotFoundError, PermissionDeniedError, SpecError)

log = logging.getLogger(__name__)

#: (class, HTTP status, error code); the first match in order wins
STATUS = [
    (SpecError, 422, "invalid_spec"),
    (AuthenticationError, 401, "unauthenticated"),
    (PermissionDeniedError, 403, "forbidden"),
    (NotFoundError, 404, "not_found"),
    (ConflictError, 409, "conflict"),
    (DependencyUnavailableError, 503, "unavailable"),
    (HmaoptError, 400, "bad_request"),
]


def error_body(code: str, message: str, field: str | None = None) -> dict:
    body = {"error": code, "message": message}
    if field is not None:
        body["field"] = field
    return body


def _hmaopt(request: Request, exc: HmaoptError) -> JSONResponse:
    status, code = next((s, c) for cls, s, c in STATUS if isinstance(exc, cls))
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(code, str(exc), getattr(exc, "field", None)), status,
                        headers=headers)


def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ())]
    where = loc[0] if loc else "body"
    field = ".".join(loc[1:]) or None
    msg = str(err.get("msg", "invalid request")).removeprefix("Value error, ")
    if err.get("type") in ("literal_error", "enum") and "input" in err:
        msg = f"{msg} (got {err['input']!r})"
    if err.get("type") == "missing":
        msg = "field required"
    text = f"{field}: {msg}" if field else f"{where}: {msg}"
    return JSONResponse(error_body("invalid_spec" if where == "body" else "invalid_request",
                                   text, field), 422)


def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
    return JSONResponse(error_body(codes.get(exc.status_code, "http_error"), str(exc.detail)),
                        exc.status_code, headers=getattr(exc, "headers", None))


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    from sqlalchemy.exc import SQLAlchemyError

    from service.db.session import translate
    from service.settings import get_settings

    if isinstance(exc, SQLAlchemyError):
        return _hmaopt(request, translate(exc, get_settings().database()))
    try:
        import redis

        if isinstance(exc, redis.RedisError):
            return _hmaopt(request, DependencyUnavailableError(
                f"Redis error: {exc}; check REDIS_URL"))
    except ImportError:  # pragma: no cover
        pass
    ref = uuid.uuid4().hex[:12]
    log.exception("unhandled error %s on %s %s", ref, request.method, request.url.path)
    return JSONResponse(error_body("internal", f"internal error (reference {ref}); the server "
                                   "log has the details"), 500)


def install(app: FastAPI) -> None:
    app.add_exception_handler(HmaoptError, _hmaopt)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _unexpected)
