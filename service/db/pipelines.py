"""Queries of the pipeline tables (the API, the CLI and the scheduler call these)."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import select, update

from service.db.models import Pipeline, PipelineRun, Promotion, WebhookDelivery, utcnow
from service.errors import ConflictError, NotFoundError

#: run statuses after which nothing more happens to a run
RUN_DONE = ("succeeded", "skipped", "failed")


def new_id() -> str:
    return uuid.uuid4().hex


def next_due(schedule: dict, after: datetime) -> datetime:
    """The first time of the cron schedule strictly after ``after`` (UTC)."""
    from datetime import UTC
    from zoneinfo import ZoneInfo

    from croniter import croniter

    local = after.astimezone(ZoneInfo(schedule.get("timezone", "UTC")))
    return croniter(schedule["cron"], local).get_next(datetime).astimezone(UTC)


def due_between(schedule: dict, start: datetime, now: datetime, limit: int = 1000) -> list[datetime]:
    """The schedule's times in [start, now] (UTC), at most ``limit`` of the latest."""
    from datetime import UTC, timedelta

    out: list[datetime] = []
    t = start
    if t <= now:
        out.append(t)
        while True:
            t = next_due(schedule, t)
            if t > now:
                break
            out.append(t)
            if len(out) > limit:
                out.pop(0)
    return [d.astimezone(UTC) for d in out]


def create_pipeline(session, spec: dict, *, token_id: str | None, created_by: str | None,
                    now: datetime | None = None) -> Pipeline:
    if session.scalar(select(Pipeline).where(Pipeline.name == spec["name"])) is not None:
        raise ConflictError(f"a pipeline named {spec['name']!r} exists; update it, or choose "
                            "another name")
    now = now or utcnow()
    p = Pipeline(id=new_id(), name=spec["name"], spec=spec, paused=False,
                 next_due_at=next_due(spec["schedule"], now), token_id=token_id,
                 created_by=created_by, created_at=now, updated_at=now)
    session.add(p)
    session.flush()
    return p


def get_pipeline(session, ref: str, *, lock: bool = False) -> Pipeline:
    """By name or id."""
    stmt = select(Pipeline).where((Pipeline.name == ref) | (Pipeline.id == ref))
    if lock:
        stmt = stmt.with_for_update()
    p = session.scalar(stmt)
    if p is None:
        raise NotFoundError(f"no pipeline {ref!r}")
    return p


def list_pipelines(session) -> list[Pipeline]:
    return list(session.scalars(select(Pipeline).order_by(Pipeline.name)))


def list_runs(session, pipeline_id: str, *, limit: int = 100, offset: int = 0) -> list[PipelineRun]:
    return list(session.scalars(select(PipelineRun).where(PipelineRun.pipeline_id == pipeline_id)
                                .order_by(PipelineRun.scheduled_for.desc(),
                                          PipelineRun.created_at.desc())
                                .limit(limit).offset(offset)))


def get_run(session, run_id: str) -> PipelineRun:
    run = session.get(PipelineRun, run_id)
    if run is None:
        raise NotFoundError(f"no pipeline run {run_id!r}")
    return run


def list_promotions(session, pipeline_id: str) -> list[Promotion]:
    return list(session.scalars(select(Promotion).where(Promotion.pipeline_id == pipeline_id)
                                .order_by(Promotion.id.desc())))


def list_deliveries(session, pipeline_id: str, limit: int = 100) -> list[WebhookDelivery]:
    return list(session.scalars(select(WebhookDelivery)
                                .where(WebhookDelivery.pipeline_id == pipeline_id)
                                .order_by(WebhookDelivery.id.desc()).limit(limit)))


def claim_run(session, pipeline_id: str, scheduled_for: datetime, trigger: str,
              status: str = "pending", reason: str | None = None) -> PipelineRun | None:
    """Insert the run of (pipeline, scheduled time) and commit; None when another scheduler
    inserted it first (the unique constraint decides)."""
    from sqlalchemy.exc import IntegrityError

    run = PipelineRun(id=new_id(), pipeline_id=pipeline_id, scheduled_for=scheduled_for,
                      trigger=trigger, status=status, reason=reason, status_changed_at=utcnow(),
                      finished_at=utcnow() if status in RUN_DONE else None)
    session.add(run)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        return None
    return run


def move_run(session, run_id: str, old: str, new: str) -> bool:
    """Compare-and-set a run's status: True for the one caller that moved it."""
    done = session.execute(update(PipelineRun).where(PipelineRun.id == run_id,
                                                     PipelineRun.status == old)
                           .values(status=new, status_changed_at=utcnow()))
    session.commit()
    return done.rowcount == 1


def runs_in(session, statuses: tuple[str, ...]) -> list[tuple[str, str]]:
    """(run id, status) of the runs in these statuses, oldest first."""
    return list(session.execute(select(PipelineRun.id, PipelineRun.status)
                                .where(PipelineRun.status.in_(statuses))
                                .order_by(PipelineRun.created_at)))


def last_processed(session, pipeline_id: str, *, exclude: str) -> PipelineRun | None:
    """The newest run of the pipeline whose search ran to its end (a failed run does not
    count: its checkpoint is searched again)."""
    return session.scalar(select(PipelineRun).where(
        PipelineRun.pipeline_id == pipeline_id, PipelineRun.job_id.is_not(None),
        PipelineRun.status == "succeeded", PipelineRun.id != exclude)
        .order_by(PipelineRun.created_at.desc()).limit(1))


def stale_runs(session, statuses: tuple[str, ...], before: datetime) -> list[tuple[str, str]]:
    """(id, status) of the runs held in a transient status since before ``before`` (their
    scheduler stopped mid-step)."""
    return [tuple(r) for r in session.execute(select(PipelineRun.id, PipelineRun.status).where(
        PipelineRun.status.in_(statuses), PipelineRun.status_changed_at < before))]
