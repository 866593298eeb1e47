"""/v1/workers: the worker processes and their liveness."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter
from pydantic import BaseModel, Field
from sqlalchemy import select

from service.api.deps import SessionDep, SettingsDep, Viewer
from service.db.models import Worker, utcnow
from service.db.workers import ALIVE

router = APIRouter(prefix="/v1/workers", tags=["workers"])


class WorkerPublic(BaseModel):
    id: str
    name: str
    hostname: str
    pid: int
    device: str
    state: str = Field(description="idle | busy | stopped | dead")
    alive: bool = Field(description="reported within HMAOPT_WORKER_STALE_SECONDS")
    job_id: str | None
    started_at: datetime
    heartbeat_at: datetime
    heartbeat_age_seconds: float


class WorkerList(BaseModel):
    data: list[WorkerPublic]
    count: int


@router.get("", response_model=WorkerList)
def list_workers(_: Viewer, session: SessionDep, settings: SettingsDep,
                 include_stopped: bool = False):
    """Workers, live ones first; stopped and dead ones only with include_stopped."""
    stmt = select(Worker).order_by(Worker.heartbeat_at.desc())
    if not include_stopped:
        stmt = stmt.where(Worker.state.in_(ALIVE))
    now = utcnow()
    data = []
    for w in session.scalars(stmt):
        age = (now - w.heartbeat_at).total_seconds()
        data.append(WorkerPublic(
            id=w.id, name=w.name, hostname=w.hostname, pid=w.pid, device=w.device, state=w.state,
            alive=w.state in ALIVE and age <= settings.worker_stale_seconds,
            job_id=w.job_id, started_at=w.started_at, heartbeat_at=w.heartbeat_at,
            heartbeat_age_seconds=age))
    return WorkerList(data=data, count=len(data))
