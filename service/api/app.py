"""The FastAPI application: ``create_app(settings)``; ``hmaopt serve`` runs it with uvicorn.

The API never imports torch or transformers. At start it checks the database schema (the
fix is ``hmaopt db upgrade``) and re-enqueues the unfinished jobs Redis has lost; it repeats
the latter every ``HMAOPT_MAINTENANCE_SECONDS``.
"""

from __future__ import annotations

import gc
import json
import logging
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware.gzip import GZipMiddleware

from service._version import __version__
from service.api import errors
from service.api.metrics import Metrics
from service.api.routes import health, jobs, pipelines, ui, workers
from service.settings import Settings, get_settings

log = logging.getLogger(__name__)

DESCRIPTION = """
Heterogeneous Model Averaging (HMA) as a service: submit a merge-search job, workers search
per-group merge ratios that maximise the alignment reward under an alignment-tax budget.

**Ratio convention**: a ratio is the weight on the ALIGNED (post-RLHF) model,
`merged = base + ratio * (aligned - base)`; ratio 0 is the base model, 1 the aligned one.

**Auth**: `Authorization: Bearer <token>` (`hmaopt token create --role ROLE`). Reads need the
viewer role, submit / cancel / export need operator.

**Errors** are JSON, whatever the status: `{"error": code, "message": text, "field": name}`
(`field` names the offending parameter, header or spec field where there is one). 400: the
body cannot be parsed; 401: no or unknown token; 403: role too low (`field` `role`), CSRF
token missing, a path outside the roots; 404; 405 (with `Allow`); 409; 413: body too large;
422: invalid parameter or spec; 500: a fault of the server (its `message` names a log
reference); 503: the database or Redis unreachable. No error carries SQL or a stack.
"""


def operation_id(route) -> str:
    """Operation ids are the route functions' names (``list_jobs``, not FastAPI's
    ``list_jobs_v1_jobs_get``): what generated clients call their methods."""
    return route.name


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413 (by Content-Length, or counted)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge()
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send) -> None:
        body = json.dumps(errors.error_body(
            "too_large", f"request body over {self.limit} bytes "
            "(HMAOPT_MAX_REQUEST_BYTES)")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(BaseException):
    """A BaseException: the body parser's ``except Exception`` (-> 400) must not catch it."""


def _maintenance(settings: Settings, stop: threading.Event) -> None:
    from service import queue

    while True:
        try:
            queue.reconcile(settings)
        except Exception as exc:
            log.warning("maintenance: %s", exc)
        if stop.wait(settings.maintenance_seconds):
            return


def create_app(settings: Settings | None = None, *, maintenance: bool = True) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from service.db.migrate import check_schema

        check_schema(settings.database())
        stop = threading.Event()
        thread = None
        if maintenance:
            thread = threading.Thread(target=_maintenance, args=(settings, stop),
                                      name="hmaopt-maintenance", daemon=True)
            thread.start()
        gc.freeze()  # start-up objects out of the collector's way: shorter full collections
        yield
        stop.set()
        if thread is not None:
            thread.join(timeout=5)

    app = FastAPI(title="hmaopt", version=__version__, description=DESCRIPTION,
                  lifespan=lifespan, generate_unique_id_function=operation_id,
                  openapi_tags=[{"name": "jobs", "description": "merge-search jobs"},
                                {"name": "workers", "description": "worker liveness"},
                                {"name": "pipelines", "description": "nightly merge pipelines"},
                                {"name": "health", "description": "probes and metrics"}])
    app.state.settings = settings
    app.state.metrics = Metrics(settings)
    errors.install(app)
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    # JSON and pages over 1 KiB gzip-compressed when the client accepts it (the trial points
    # of a large study shrink about 4x); server-sent events are never buffered (Starlette
    # leaves text/event-stream alone), nor is anything already encoded (plotly.js).
    app.add_middleware(GZipMiddleware, minimum_size=1024, compresslevel=5)
    app.add_middleware(app.state.metrics.asgi)
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(workers.router)
    app.include_router(pipelines.router)
    app.include_router(ui.router)
    from pathlib import Path

    from fastapi.staticfiles import StaticFiles

    app.mount("/ui/static", StaticFiles(directory=Path(__file__).parent / "static"),
              name="static")
    return app
