"""/v1/workers: the worker processes and their liveness."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import SessionDep, SettingsDep, Viewer
from service.api.errors import responses
from service.api.schemas import WorkerList, WorkerPublic
from service.db import workers as worker_db
from service.db.models import utcnow
from service.status import WorkerState

router = APIRouter(prefix="/v1/workers", tags=["workers"])


@router.get("", response_model=WorkerList, responses=responses(401, 422, 503))
def list_workers(_: Viewer, session: SessionDep, settings: SettingsDep,
                 include_stopped: bool = False):
    """Workers, live ones first; stopped and dead ones only with include_stopped."""
    now = utcnow()
    data = []
    for w in worker_db.list_workers(session, include_stopped=include_stopped):
        age = (now - w.heartbeat_at).total_seconds()
        data.append(WorkerPublic(
            id=w.id, name=w.name, hostname=w.hostname, pid=w.pid, device=w.device, state=w.state,
            alive=WorkerState(w.state).alive and age <= settings.worker_stale_seconds,
            job_id=w.job_id, started_at=w.started_at, heartbeat_at=w.heartbeat_at,
            heartbeat_age_seconds=age))
    return WorkerList(data=data, count=len(data))
