"""The one table from hmaopt's errors to HTTP responses; every error body is JSON::

    {"error": "invalid_spec", "message": "tax.budget: Input should be ...", "field": "tax.budget"}

- :data:`STATUS` maps the HmaoptError groups to statuses; :func:`install` adds the handlers
  (hmaopt errors, request validation, Starlette's HTTP errors, database and Redis errors) and
  :class:`CatchAll`, which answers any other exception with a 500 that names a log
  reference. A handled error never leaves the connection broken: the handlers answer and
  return (Starlette's last-resort handler would re-raise, and uvicorn then closes the
  keep-alive connection).
- No body carries SQL, query parameters or a stack: database errors are reduced to their
  kind (:func:`_database`), and :func:`error_body` cuts what a driver appends.
- :func:`responses` documents in the OpenAPI the error statuses an operation sends, always
  as ``application/json`` :class:`~service.api.schemas.ErrorBody` (the events stream too).
"""

from __future__ import annotations

import logging
import re
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

#: what the OpenAPI says of each error status when the operation says nothing more
DESCRIPTIONS = {
    400: "the body cannot be parsed (not JSON, or not UTF-8); `field` is `body`",
    401: "no API token, or an unknown or revoked one (`WWW-Authenticate: Bearer`)",
    403: "the token's role is too low (`field`: `role`), a signed-in browser's CSRF token "
         "is missing (`field`: the header), or the settings refuse it (`field` names it)",
    404: "no such record",
    409: "the state forbids it",
    413: "the body is over HMAOPT_MAX_REQUEST_BYTES",
    422: "a parameter or the body is invalid; `field` names it",
    503: "the database or Redis cannot be reached (retry later)",
}

#: appended by SQLAlchemy and drivers to their messages: never sent to a client
_INTERNALS = re.compile(r"\s*(\[SQL:|\[parameters:|\(Background on this error|Traceback "
                        r"\(most recent call last\)|LINE \d+:)", re.S)
#: a message that opens with the field it is about ("promote.dir: ... lies outside")
_LEADING_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_.\[\]-]*): ")


def public_text(text: str) -> str:
    """``text`` without what a driver appends (SQL, parameters, a stack), and encodable."""
    match = _INTERNALS.search(text)
    if match:
        text = text[:match.start()]
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(code: str, message: str, field: str | None = None) -> dict:
    body = {"error": code, "message": public_text(message)}
    if field is not None:
        body["field"] = public_text(field)
    return body


def responses(*statuses: int, sse: bool = False, **described: str) -> dict:
    """The ``responses=`` of a route: each status with the error body and its description
    (``described`` as ``s404="no such job"``; else :data:`DESCRIPTIONS`). ``sse``: the route
    streams text/event-stream, its errors are still JSON."""
    from service.api.schemas import ErrorBody

    texts = {int(k.removeprefix("s")): v for k, v in described.items()}
    out: dict = {}
    for status in sorted(set(statuses) | set(texts)):
        entry: dict = {"description": texts.get(status) or DESCRIPTIONS[status]}
        if sse:  # FastAPI would file a model under the route's own media type
            entry["content"] = {"application/json": {
                "schema": {"$ref": "#/components/schemas/ErrorBody"}}}
        else:
            entry["model"] = ErrorBody
        out[status] = entry
    return out


def _field_of(exc: HmaoptError) -> str | None:
    field = getattr(exc, "field", None)
    if field is None and isinstance(exc, PermissionDeniedError):
        match = _LEADING_FIELD.match(str(exc))  # path errors open with the spec field
        field = match.group(1) if match else None
    return field


def _hmaopt(request: Request, exc: HmaoptError) -> JSONResponse:
    status, code = next((s, c) for cls, s, c in STATUS if isinstance(exc, cls))
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(code, str(exc), _field_of(exc)), status, headers=headers)


def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0]
    if err.get("type") == "json_invalid":
        detail = (err.get("ctx") or {}).get("error") or "JSON decode error"
        pos = err.get("loc", ("body", None))[-1]
        where = f" at character {pos}" if isinstance(pos, int) else ""
        return JSONResponse(error_body("bad_request", f"body: not valid JSON ({detail}{where})",
                                       "body"), 400)
    loc = [str(p) for p in err.get("loc", ())]
    where = loc[0] if loc else "body"
    field = ".".join(loc[1:]) or (where if where != "body" else None)
    msg = str(err.get("msg", "invalid request")).removeprefix("Value error, ")
    if err.get("type") in ("literal_error", "enum") and "input" in err:
        msg = f"{msg} (got {err['input']!r})"
    if err.get("type") == "missing":
        msg = "field required"
    if where == "body" and not loc[1:]:
        field = "body"
    text = f"{field}: {msg}" if field else f"{where}: {msg}"
    return JSONResponse(error_body("invalid_spec" if where == "body" else "invalid_request",
                                   text, field), 422)


def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    codes = {400: "bad_request", 404: "not_found", 405: "method_not_allowed",
             413: "too_large"}
    headers = dict(getattr(exc, "headers", None) or {})
    message, field = str(exc.detail), None
    if exc.status_code == 405:
        allowed = allowed_methods(request) or [
            m.strip() for m in headers.get("Allow", "").split(",") if m.strip()]
        headers["Allow"] = ", ".join(allowed)
        message = f"{request.method} is not allowed here; allowed: {', '.join(allowed)}"
    elif exc.status_code == 400:  # FastAPI: the body could not be read (e.g. not UTF-8)
        message, field = "body: cannot be parsed (send UTF-8 JSON)", "body"
    return JSONResponse(error_body(codes.get(exc.status_code, "http_error"), message, field),
                        exc.status_code, headers=headers or None)


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app answers on this request's path (Starlette's
    405 names the methods of the first route only). The table is built once per app."""
    table = getattr(request.app.state, "allow_table", None)
    if table is None:
        from starlette.routing import compile_path

        try:  # FastAPI >= 0.16x keeps included routers nested; this walks them
            from fastapi.routing import iter_route_contexts

            routes = list(iter_route_contexts(request.app.router.routes))
        except ImportError:  # pragma: no cover - older FastAPI: the routes are flat
            routes = request.app.router.routes
        table = [(compile_path(r.path)[0], frozenset(r.methods)) for r in routes
                 if getattr(r, "methods", None) and getattr(r, "path", None)]
        request.app.state.allow_table = table
    path = request.scope.get("path", "")
    return sorted(set().union(*(methods for regex, methods in table if regex.match(path))))


def _database(request: Request, exc) -> JSONResponse:
    """A database error: an outage (503) or a fault of ours (500); never the SQL."""
    from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError

    from service.db.session import safe_url

    where = safe_url(request.app.state.settings.database())
    orig = str(getattr(exc, "orig", "") or "").lower()
    if isinstance(exc, OperationalError | ProgrammingError) and (
            "no such table" in orig or ("relation" in orig and "does not exist" in orig)):
        return _hmaopt(request, DependencyUnavailableError(
            f"the database {where} has no hmaopt tables: run `hmaopt db upgrade`"))
    if isinstance(exc, OperationalError) or (isinstance(exc, DBAPIError)
                                             and exc.connection_invalidated):
        kind = type(getattr(exc, "orig", None) or exc).__name__
        ref = _log_reference(request, exc, "database unavailable")
        return _hmaopt(request, DependencyUnavailableError(
            f"cannot reach the database {where} ({kind}, reference {ref}); check DATABASE_URL"))
    return _internal(request, exc)


def _redis(request: Request, exc) -> JSONResponse:
    ref = _log_reference(request, exc, "Redis unavailable")
    return _hmaopt(request, DependencyUnavailableError(
        f"Redis error ({type(exc).__name__}, reference {ref}); check REDIS_URL"))


def _log_reference(request: Request, exc: BaseException, what: str) -> str:
    ref = uuid.uuid4().hex[:12]
    log.error("%s %s on %s %s", what, ref, request.method, request.url.path, exc_info=exc)
    return ref


def _internal(request: Request, exc: BaseException) -> JSONResponse:
    ref = _log_reference(request, exc, "unhandled error")
    return JSONResponse(error_body("internal", f"internal error (reference {ref}); the server "
                                   "log has the details"), 500)


class CatchAll:
    """Innermost ASGI middleware: an exception no handler took becomes a JSON 500 and is not
    re-raised, so that uvicorn keeps the connection open for the next request. One raised
    after the response started (a stream) is logged and ends that response only."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            request = Request(scope)
            if started:
                _log_reference(request, exc, "error in a started response")
                raise
            await _internal(request, exc)(scope, receive, send)


def install(app: FastAPI) -> None:
    from sqlalchemy.exc import SQLAlchemyError

    app.add_exception_handler(HmaoptError, _hmaopt)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(SQLAlchemyError, _database)
    try:
        import redis

        app.add_exception_handler(redis.RedisError, _redis)
    except ImportError:  # pragma: no cover - the API installs with redis
        pass
    app.add_middleware(CatchAll)
