"""Queries of the pipelines, their runs and their promotions (the API, the CLI and the
scheduler call these; webhook deliveries are in service.db.webhooks)."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import delete, select, update

from service.db.models import Pipeline, PipelineRun, Promotion, WebhookDelivery, utcnow
from service.errors import ConflictError, NotFoundError
from service.status import RUN_DONE, PipelineRunStatus

__all__ = ["RUN_DONE"]  # re-exported: the run statuses after which nothing more happens


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
    from datetime import UTC

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



def _name_taken(session, name: str) -> ConflictError | None:
    if session.scalar(select(Pipeline.id).where(Pipeline.name == name)) is None:
        return None
    return ConflictError(f"a pipeline named {name!r} exists; update it, or choose another "
                         "name")


def create_pipeline(session, spec: dict, *, token_id: str | None, created_by: str | None,
                    now: datetime | None = None) -> Pipeline:
    """A new pipeline, its first run time from its schedule; ConflictError when the name is
    taken (also when another request creates it at the same moment: the session is then
    rolled back)."""
    from sqlalchemy.exc import IntegrityError

    taken = _name_taken(session, spec["name"])
    if taken is not None:
        raise taken
    now = now or utcnow()
    p = Pipeline(id=new_id(), name=spec["name"], spec=spec, paused=False,
                 next_due_at=next_due(spec["schedule"], now), token_id=token_id,
                 created_by=created_by, created_at=now, updated_at=now)
    session.add(p)
    try:
        session.flush()
    except IntegrityError:  # the same name, created at the same moment
        session.rollback()
        raise ConflictError(f"a pipeline named {spec['name']!r} exists") from None
    return p


def update_pipeline(session, ref: str, spec: dict, now: datetime | None = None) -> Pipeline:
    """Replace a pipeline's spec (the name may change; ConflictError when the new one is
    taken); the next run time follows the new schedule."""
    p = get_pipeline(session, ref, lock=True)
    if spec["name"] != p.name:
        taken = _name_taken(session, spec["name"])
        if taken is not None:
            raise taken
    p.spec, p.name = spec, spec["name"]
    p.next_due_at = next_due(spec["schedule"], now or utcnow())
    return p


def set_paused(session, ref: str, paused: bool, now: datetime | None = None) -> Pipeline:
    """Pause, or resume from the next scheduled time (the times passed meanwhile are not
    run)."""
    p = get_pipeline(session, ref, lock=True)
    p.paused = paused
    if not paused:
        p.next_due_at = next_due(p.spec["schedule"], now or utcnow())
    return p


def delete_pipeline(session, ref: str) -> None:
    """The pipeline with its runs, promotions and delivery log (its jobs stay)."""
    p = get_pipeline(session, ref, lock=True)
    for model in (PipelineRun, Promotion, WebhookDelivery):
        session.execute(delete(model).where(model.pipeline_id == p.id))
    session.delete(p)


def get_pipeline(session, ref: str, *, lock: bool = False) -> Pipeline:
    """By name or id."""
    from service.db.jobs import storable_key

    if not storable_key(ref):  # no row has it, and PostgreSQL refuses to compare it
        raise NotFoundError(f"no pipeline {ref!r}")
    return Pipeline.one_or_raise(session, (Pipeline.name == ref) | (Pipeline.id == ref),
                                 lock=lock, missing=f"no pipeline {ref!r}")


def pipeline_by_id(session, pipeline_id: str, *, lock: bool = False) -> Pipeline:
    return Pipeline.one_or_raise(session, Pipeline.id == pipeline_id, lock=lock,
                                 missing=f"no pipeline with id {pipeline_id}")


def find_pipeline(session, pipeline_id: str) -> Pipeline | None:
    return session.get(Pipeline, pipeline_id)


def list_pipelines(session) -> list[Pipeline]:
    return list(session.scalars(select(Pipeline).order_by(Pipeline.name)))


def due_pipelines(session, now: datetime) -> list[tuple[str, dict, datetime]]:
    """(id, schedule, next_due_at) of the active pipelines whose next run time has come."""
    return [(p.id, p.spec["schedule"], p.next_due_at) for p in session.scalars(
        select(Pipeline).where(Pipeline.paused.is_(False), Pipeline.next_due_at <= now))]


def advance_due(session, pipeline_id: str, seen: datetime, now: datetime) -> None:
    """Move the next run time past ``now``, unless another scheduler moved it from ``seen``
    meanwhile."""
    p = pipeline_by_id(session, pipeline_id)
    if p.next_due_at == seen:
        p.next_due_at = next_due(p.spec["schedule"], now)


def rollbacks_requested(session) -> list[str]:
    """Ids of the pipelines with a rollback requested over the API."""
    return list(session.scalars(select(Pipeline.id).where(
        Pipeline.rollback_requested_at.is_not(None))))


def clear_rollback(session, pipeline_id: str) -> None:
    pipeline_by_id(session, pipeline_id).rollback_requested_at = None


# ------------------------------------------------------------------------------ runs

def list_runs(session, pipeline_id: str, *, limit: int = 100, offset: int = 0) -> list[PipelineRun]:
    return list(session.scalars(select(PipelineRun).where(PipelineRun.pipeline_id == pipeline_id)
                                .order_by(PipelineRun.scheduled_for.desc(),
                                          PipelineRun.created_at.desc())
                                .limit(limit).offset(offset)))


def page_runs(session, pipeline_id: str, *, limit: int = 100,
              offset: int = 0) -> tuple[list[PipelineRun], int]:
    """One page of the pipeline's runs, newest first, and the count of them all."""
    from service.db.jobs import page

    stmt = select(PipelineRun).where(PipelineRun.pipeline_id == pipeline_id)
    return page(session, stmt, (PipelineRun.scheduled_for.desc(),
                                PipelineRun.created_at.desc(), PipelineRun.id), limit, offset)


def page_pipelines(session, *, limit: int = 100, offset: int = 0) -> tuple[list[Pipeline], int]:
    """One page of the pipelines by name, and the count of them all."""
    from service.db.jobs import page

    return page(session, select(Pipeline), (Pipeline.name,), limit, offset)


def page_promotions(session, pipeline_id: str, *, limit: int = 100,
                    offset: int = 0) -> tuple[list[Promotion], int]:
    """One page of the alias's history, newest first, and the count of it all."""
    from service.db.jobs import page

    stmt = select(Promotion).where(Promotion.pipeline_id == pipeline_id)
    return page(session, stmt, (Promotion.id.desc(),), limit, offset)


def page_deliveries(session, pipeline_id: str, *, limit: int = 100,
                    offset: int = 0) -> tuple[list[WebhookDelivery], int]:
    """One page of the pipeline's webhook delivery log, newest first, and its count."""
    from service.db.jobs import page

    stmt = select(WebhookDelivery).where(WebhookDelivery.pipeline_id == pipeline_id)
    return page(session, stmt, (WebhookDelivery.id.desc(),), limit, offset)


def get_run(session, run_id: str) -> PipelineRun:
    from service.db.jobs import storable_key

    if not storable_key(run_id):
        raise NotFoundError(f"no pipeline run {run_id!r}")
    run = session.get(PipelineRun, run_id)
    if run is None:
        raise NotFoundError(f"no pipeline run {run_id!r}")
    return run


def find_run(session, run_id: str | None) -> PipelineRun | None:
    """The run, or None (no id, or no such row)."""
    return None if run_id is None else session.get(PipelineRun, run_id)


def get_pipeline_run(session, ref: str, run_id: str) -> PipelineRun:
    """A run of the pipeline ``ref`` (NotFoundError when it is another pipeline's)."""
    p = get_pipeline(session, ref)
    run = get_run(session, run_id)
    if run.pipeline_id != p.id:
        raise NotFoundError(f"pipeline {p.name} has no run {run_id}")
    return run


def claim_run(session, pipeline_id: str, scheduled_for: datetime, trigger: str,
              status: PipelineRunStatus = PipelineRunStatus.PENDING,
              reason: str | None = None) -> PipelineRun | None:
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


def move_run(session, run_id: str, old: PipelineRunStatus, new: PipelineRunStatus) -> bool:
    """Compare-and-set a run's status: True for the one caller that moved it."""
    done = session.execute(update(PipelineRun).where(PipelineRun.id == run_id,
                                                     PipelineRun.status == old)
                           .values(status=new, status_changed_at=utcnow()))
    session.commit()
    return done.rowcount == 1


def runs_in(session, statuses) -> list[tuple[str, PipelineRunStatus]]:
    """(run id, status) of the runs in these statuses, oldest first."""
    return list(session.execute(select(PipelineRun.id, PipelineRun.status)
                                .where(PipelineRun.status.in_(list(statuses)))
                                .order_by(PipelineRun.created_at)))


def last_processed(session, pipeline_id: str, *, exclude: str) -> PipelineRun | None:
    """The newest run of the pipeline whose search ran to its end (a failed run does not
    count: its checkpoint is searched again)."""
    return session.scalar(select(PipelineRun).where(
        PipelineRun.pipeline_id == pipeline_id, PipelineRun.job_id.is_not(None),
        PipelineRun.status == PipelineRunStatus.SUCCEEDED, PipelineRun.id != exclude)
        .order_by(PipelineRun.created_at.desc()).limit(1))


def last_rewarded(session, pipeline_id: str, *, exclude: str) -> PipelineRun | None:
    """The newest succeeded run of the pipeline whose job found a best merge (a warm start
    takes its ratios)."""
    return session.scalar(select(PipelineRun).where(
        PipelineRun.pipeline_id == pipeline_id, PipelineRun.id != exclude,
        PipelineRun.status == PipelineRunStatus.SUCCEEDED, PipelineRun.reward.is_not(None))
        .order_by(PipelineRun.created_at.desc()).limit(1))


def stale_runs(session, statuses, before: datetime) -> list[tuple[str, PipelineRunStatus]]:
    """(id, status) of the runs held in a transient status since before ``before`` (their
    scheduler stopped mid-step)."""
    return [tuple(r) for r in session.execute(select(PipelineRun.id, PipelineRun.status).where(
        PipelineRun.status.in_(list(statuses)), PipelineRun.status_changed_at < before))]


# ------------------------------------------------------------------------------ promotions

def list_promotions(session, pipeline_id: str) -> list[Promotion]:
    return list(session.scalars(select(Promotion).where(Promotion.pipeline_id == pipeline_id)
                                .order_by(Promotion.id.desc())))


def add_promotion(session, pipeline_id: str, run_id: str, action: str, dir: str,
                  previous_run_id: str | None, now: datetime) -> Promotion:
    """Record a switch of the ``current`` alias (``action``: promote | rollback)."""
    row = Promotion(pipeline_id=pipeline_id, run_id=run_id, action=action, dir=dir,
                    previous_run_id=previous_run_id, created_at=now)
    session.add(row)
    return row


def promotion_of(session, pipeline_id: str, run_id: str) -> Promotion | None:
    """The latest promotion of ``run_id`` in the pipeline (it names the champion before)."""
    return session.scalar(select(Promotion).where(
        Promotion.pipeline_id == pipeline_id, Promotion.run_id == run_id,
        Promotion.action == "promote").order_by(Promotion.id.desc()).limit(1))
