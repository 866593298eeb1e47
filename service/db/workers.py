"""Worker liveness: each worker process has a row and refreshes ``heartbeat_at``."""

from __future__ import annotations

import os
import socket
import uuid
from datetime import timedelta

from sqlalchemy import select, update

from service.db.models import Worker, utcnow
from service.status import WORKER_ALIVE, WorkerState

#: states of a worker that claims to be alive
ALIVE = WORKER_ALIVE


def register(session, *, device: str, name: str | None = None) -> Worker:
    host = socket.gethostname()
    wid = uuid.uuid4().hex
    row = Worker(id=wid, name=name or f"{host}:{os.getpid()}:{device}", hostname=host,
                 pid=os.getpid(), device=device, state=WorkerState.IDLE)
    session.add(row)
    session.flush()
    return row


def heartbeat(session, worker_id: str, *, state: WorkerState | None = None,
              job_id: str | None | type[Ellipsis] = ...) -> bool:
    """Refresh a worker's liveness; False when it was declared dead meanwhile."""
    values = {"heartbeat_at": utcnow()}
    if state is not None:
        values["state"] = state
    if job_id is not ...:
        values["job_id"] = job_id
    stmt = update(Worker).where(Worker.id == worker_id, Worker.state.in_(ALIVE)).values(**values)
    return session.execute(stmt).rowcount == 1


def stop(session, worker_id: str) -> None:
    session.execute(update(Worker).where(Worker.id == worker_id)
                    .values(state=WorkerState.STOPPED, stopped_at=utcnow(), job_id=None))


def stale(session, seconds: float) -> list[Worker]:
    """Workers that claim to be alive but have not reported for ``seconds``."""
    cutoff = utcnow() - timedelta(seconds=seconds)
    return list(session.scalars(select(Worker).where(Worker.state.in_(ALIVE),
                                                     Worker.heartbeat_at < cutoff)))


def declare_dead(session, worker_id: str) -> bool:
    """Mark a stale worker dead; True for exactly one caller (several maintainers may race)."""
    stmt = (update(Worker).where(Worker.id == worker_id, Worker.state.in_(ALIVE))
            .values(state=WorkerState.DEAD, stopped_at=utcnow()))
    return session.execute(stmt).rowcount == 1


def unrecovered(session) -> list[Worker]:
    """Dead workers whose job has not been recovered yet (a recovery that failed midway)."""
    return list(session.scalars(select(Worker).where(Worker.state == WorkerState.DEAD,
                                                     Worker.job_id.is_not(None))))


def mark_recovered(session, worker_id: str) -> None:
    session.execute(update(Worker).where(Worker.id == worker_id).values(job_id=None))


def alive_ids(session) -> set[str]:
    return set(session.scalars(select(Worker.id).where(Worker.state.in_(ALIVE))))


def alive(session, *, job_id: str | None = None, seconds: float | None = None) -> list[Worker]:
    stmt = select(Worker).where(Worker.state.in_(ALIVE))
    if job_id is not None:
        stmt = stmt.where(Worker.job_id == job_id)
    if seconds is not None:
        stmt = stmt.where(Worker.heartbeat_at >= utcnow() - timedelta(seconds=seconds))
    return list(session.scalars(stmt))


def list_workers(session, *, include_stopped: bool = False) -> list[Worker]:
    """Workers, latest heartbeat first; stopped and dead ones only with ``include_stopped``."""
    stmt = select(Worker).order_by(Worker.heartbeat_at.desc())
    if not include_stopped:
        stmt = stmt.where(Worker.state.in_(ALIVE))
    return list(session.scalars(stmt))


def revive(session, worker_id: str, state: WorkerState) -> None:
    """A worker declared dead while alive (a long pause) reports alive again."""
    session.execute(update(Worker).where(Worker.id == worker_id)
                    .values(state=state, stopped_at=None))
