"""Liveness, readiness and Prometheus metrics (no token needed)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from service.api.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz():
    """The process is up (it answers)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
def readyz(request: Request):
    """Ready to serve: the database is reachable and at the schema's head revision, and Redis
    answers."""
    from service import queue
    from service.api.errors import public_text
    from service.db.migrate import check_schema
    from service.errors import HmaoptError

    settings = request.app.state.settings
    checks, ok = {}, True
    try:
        check_schema(settings.database())
        checks["database"] = "ok"
    except HmaoptError as exc:
        checks["database"], ok = public_text(str(exc)), False
    try:
        queue.redis_client(queue.redis_url(settings)).ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"], ok = public_text(f"{type(exc).__name__}: {exc}"), False
    body = Health(status="ok" if ok else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get("/metrics", response_class=Response, responses={200: {
    "description": "Prometheus text exposition format",
    "content": {"text/plain": {"schema": {"type": "string"}}}}})
def metrics(request: Request):
    """Prometheus text format: request counts and latencies, jobs by status, trials, live
    workers, queue length."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(request.app.state.metrics.registry),
                    media_type=CONTENT_TYPE_LATEST)
