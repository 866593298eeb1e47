"""Queries on jobs and their trials. Routes, the scheduler and the workers call these; no
SQL elsewhere (each table's queries live in its module of service.db)."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import datetime

from sqlalchemy import func, or_, select, update

from service.db import workers as worker_db
from service.db.models import Job, Trial, utcnow
from service.errors import ConflictError, NotFoundError
from service.status import TERMINAL, ExportStatus, JobStatus, TrialStatus

#: sortable columns of GET /v1/jobs/{id}/trials
TRIAL_SORTS = {"number": Trial.number, "reward": Trial.reward, "tax": Trial.tax,
               "eval_seconds": Trial.eval_seconds, "merge_seconds": Trial.merge_seconds}


def request_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def create_job(session, spec: dict, *, n_trials: int, parallel: int = 1,
               token_id: str | None = None, submitted_by: str | None = None,
               idempotency_key: str | None = None) -> tuple[Job, bool]:
    """A new queued job, or the existing one of the same idempotency key (created=False).

    The same key with another spec is a ConflictError: a key names one request. Two
    submissions of one key at the same moment: the one whose row lands second is rolled
    back (with the rest of its session: call this first in a session when giving a key)
    and gets the first one's job.
    """
    from sqlalchemy.exc import IntegrityError

    digest = request_hash(spec)
    if idempotency_key is not None:
        old = session.scalar(select(Job).where(Job.token_id == token_id,
                                               Job.idempotency_key == idempotency_key))
        if old is not None:
            if old.request_hash != digest:
                raise ConflictError(f"Idempotency-Key {idempotency_key!r} was used for another "
                                    f"job spec (job {old.id}); use a new key for a new job")
            return old, False
    job = Job(id=uuid.uuid4().hex, name=spec["name"], status=JobStatus.QUEUED, spec=spec,
              n_trials=n_trials, parallel=parallel, token_id=token_id,
              submitted_by=submitted_by, idempotency_key=idempotency_key,
              request_hash=digest)
    session.add(job)
    try:
        session.flush()
    except IntegrityError:  # the same key, submitted at the same moment: the other won
        session.rollback()
        if idempotency_key is None:
            raise
        return create_job(session, spec, n_trials=n_trials, parallel=parallel,
                          token_id=token_id, submitted_by=submitted_by,
                          idempotency_key=idempotency_key)
    return job, True


def get_job(session, job_id: str, *, lock: bool = False) -> Job:
    if not storable_key(job_id):  # no row has it, and PostgreSQL refuses to compare it
        raise NotFoundError(f"no job with id {job_id!r}")
    return Job.one_or_raise(session, Job.id == job_id, lock=lock,
                            missing=f"no job with id {job_id}")


def storable_key(value: str) -> bool:
    """Whether ``value`` can be a key at all: no NUL, no lone surrogate, at most 200
    characters (a path parameter is looked up only then)."""
    return len(value) <= 200 and "\x00" not in value and not any(
        "\ud800" <= c <= "\udfff" for c in value)


def find_job(session, job_id: str | None) -> Job | None:
    """The job, or None (no id, or no such row)."""
    return None if job_id is None else session.get(Job, job_id)


def list_jobs(session, *, status: list[str] | None = None, name: str | None = None,
              q: str | None = None, limit: int = 50, offset: int = 0) -> tuple[list[Job], int]:
    stmt = select(Job)
    if status:
        stmt = stmt.where(Job.status.in_(status))
    if name:
        stmt = stmt.where(Job.name == name)
    if q:
        like = f"%{q}%"
        stmt = stmt.where(or_(Job.name.ilike(like), Job.id.ilike(like),
                              Job.submitted_by.ilike(like)))
    return page(session, stmt, (Job.created_at.desc(), Job.id), limit, offset)


def page(session, stmt, order: tuple, limit: int, offset: int) -> tuple[list, int]:
    """One page of ``stmt``'s rows and the count of them all, in the same statement (a
    window over the matching rows), so that a row written meanwhile cannot make them
    disagree; a page past the end counts apart."""
    counted = stmt.add_columns(func.count().over().label("total"))
    rows = session.execute(counted.order_by(*order).limit(limit).offset(offset)).all()
    if rows:
        return [r[0] for r in rows], rows[0][1]
    return [], session.scalar(select(func.count()).select_from(stmt.subquery()))


def progress(job: Job) -> dict:
    """The job's progress fields that ride on every ``trial`` event."""
    return {"trials_finished": job.trials_finished, "n_trials": job.n_trials,
            "best_trial": job.best_trial, "best_reward": job.best_reward,
            "best_tax": job.best_tax, "baseline_reward": job.baseline_reward, "gain": job.gain}


def set_status(session, job_id: str, status: JobStatus, *, expect: set[JobStatus] | None = None,
               error: str | None = None, **fields) -> bool:
    """Move a job to ``status`` when its status is one of ``expect`` (atomic). True if moved."""
    values = {"status": status, "updated_at": utcnow(), **fields}
    if status in TERMINAL:
        values.setdefault("finished_at", utcnow())
    if status is JobStatus.RUNNING:  # the first start counts
        values.setdefault("started_at", func.coalesce(Job.started_at, utcnow()))
    if error is not None:
        values["error"] = error
    stmt = update(Job).where(Job.id == job_id)
    if expect is not None:
        stmt = stmt.where(Job.status.in_(list(expect)))
    return session.execute(stmt.values(**values)).rowcount == 1


def request_cancel(session, job_id: str) -> Job:
    """Cancel a job: a queued one at once, a running one when its worker next checks."""
    job = get_job(session, job_id)
    if JobStatus(job.status).terminal:
        raise ConflictError(f"job {job_id} is already {job.status}")
    job.cancel_requested = True
    set_status(session, job_id, JobStatus.CANCELLED, expect={JobStatus.QUEUED})
    session.flush()
    session.refresh(job)
    return job


def add_trial(session, job_id: str, **fields) -> bool:
    """Record a finished trial once; False when (job, number) is already there.

    An INSERT ... ON CONFLICT DO NOTHING, so that two writers (a live worker recording, a
    joining one backfilling) never fail on each other.
    """
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover - the two supported backends
        raise NotImplementedError(dialect)
    fields.setdefault("finished_at", utcnow())
    stmt = (insert(Trial).values(job_id=job_id, **fields)
            .on_conflict_do_nothing(index_elements=["job_id", "number"]).returning(Trial.id))
    return session.execute(stmt).scalar() is not None


def refresh_progress(session, job_id: str) -> Job:
    """Recompute a job's progress and best-so-far from its trials (the job row locked, so
    that two workers' updates do not overwrite each other)."""
    job = get_job(session, job_id, lock=True)
    job.trials_finished = session.scalar(
        select(func.count()).where(Trial.job_id == job_id)) or 0
    job.trials_pruned = session.scalar(select(func.count()).where(
        Trial.job_id == job_id, Trial.state == TrialStatus.PRUNED)) or 0
    best = _best(session, job_id)
    if best is not None:
        job.best_trial, job.best_reward, job.best_tax = best.number, best.reward, best.tax
        job.best_ratios = best.ratios
    base = _best(session, job_id, kind="uniform")
    if base is not None:
        job.baseline_ratio, job.baseline_reward = base.uniform_ratio, base.reward
        job.baseline_tax = base.tax
    job.updated_at = utcnow()
    return job


def _best(session, job_id: str, kind: str | None = None) -> Trial | None:
    stmt = select(Trial).where(Trial.job_id == job_id, Trial.feasible.is_(True),
                               Trial.reward.is_not(None))
    if kind is not None:
        stmt = stmt.where(Trial.kind == kind)
    return session.scalar(stmt.order_by(Trial.reward.desc(), Trial.tax, Trial.number).limit(1))


def best_trial(session, job_id: str) -> Trial:
    """The job's answer once it has a result (chosen on the validation data), before that
    the feasible trial of highest reward so far (NotFoundError when none yet)."""
    job = get_job(session, job_id)
    best = None
    if job.result and job.result.get("best") is not None:
        best = session.scalar(select(Trial).where(Trial.job_id == job_id,
                                                  Trial.number == job.result["best"]["trial"]))
    best = best or _best(session, job_id)
    if best is None:
        raise NotFoundError(f"job {job_id} has no feasible trial yet")
    return best


def list_trials(session, job_id: str, *, sort: str = "number", desc: bool = False,
                kind: str | None = None, feasible: bool | None = None,
                limit: int = 100, offset: int = 0) -> tuple[list[Trial], int]:
    get_job(session, job_id)
    stmt = select(Trial).where(Trial.job_id == job_id)
    if kind is not None:
        stmt = stmt.where(Trial.kind == kind)
    if feasible is not None:
        stmt = stmt.where(Trial.feasible.is_(feasible))
    column = TRIAL_SORTS[sort]
    order = column.desc().nulls_last() if desc else column.asc().nulls_last()
    return page(session, stmt, (order, Trial.number), limit, offset)


def trial_points(session, job_id: str) -> list[tuple]:
    """(number, kind, state, feasible, reward, tax, uniform_ratio, reward_se, tax_se) of every
    finished trial, by number: the columns the dashboard's figures need, without loading
    whole rows."""
    get_job(session, job_id)
    return list(session.execute(
        select(Trial.number, Trial.kind, Trial.state, Trial.feasible, Trial.reward, Trial.tax,
               Trial.uniform_ratio, Trial.reward_se, Trial.tax_se)
        .where(Trial.job_id == job_id).order_by(Trial.number)))


def get_trial(session, job_id: str, number: int) -> Trial:
    get_job(session, job_id)
    return Trial.one_or_raise(session, Trial.job_id == job_id, Trial.number == number,
                              missing=f"job {job_id} has no finished trial {number}")


def uniform_trial(session, job_id: str, ratio: float) -> Trial | None:
    """The job's finished uniform-baseline trial at ``ratio``, if any."""
    return session.scalar(select(Trial).where(Trial.job_id == job_id, Trial.kind == "uniform",
                                              Trial.uniform_ratio == ratio))


def pareto_trials(session, job_id: str) -> list[Trial]:
    """Feasible trials not dominated in (higher reward, lower tax), by tax."""
    get_job(session, job_id)
    pts = list(session.scalars(select(Trial).where(
        Trial.job_id == job_id, Trial.feasible.is_(True), Trial.reward.is_not(None))
        .order_by(Trial.tax, Trial.reward.desc(), Trial.number)))
    front, best = [], None
    for t in pts:  # by tax ascending: keep each trial that beats every cheaper one
        if best is None or t.reward > best:
            front.append(t)
            best = t.reward
    return front


def claim_finalizer(session, job_id: str, worker_id: str) -> bool:
    """Exactly one worker of a job writes its result: the one this returns True to. A claim
    held by a worker that is no longer alive is taken over."""
    from sqlalchemy import exists

    from service.db.models import Worker
    from service.db.workers import ALIVE

    holder_alive = exists().where(Worker.id == Job.finalizer,
                                  Worker.state.in_(ALIVE))
    stmt = (update(Job).where(Job.id == job_id,
                              or_(Job.finalizer.is_(None), Job.finalizer == worker_id,
                                  ~holder_alive))
            .values(finalizer=worker_id))
    return session.execute(stmt).rowcount == 1


def release_finalizer(session, job_id: str, worker_id: str) -> None:
    session.execute(update(Job).where(Job.id == job_id, Job.finalizer == worker_id)
                    .values(finalizer=None))


def count_runs(session, job_id: str, count: int) -> int:
    """Add ``count`` to a job's enqueued runs atomically; returns the new total."""
    total = session.execute(update(Job).where(Job.id == job_id)
                            .values(runs_enqueued=Job.runs_enqueued + count)
                            .returning(Job.runs_enqueued)).scalar()
    if total is None:
        raise NotFoundError(f"no job with id {job_id}")
    return total


def jobs_to_reconcile(session, grace_seconds: float = 0) -> list:
    """(id, status, parallel, runs_enqueued, cancel_requested, finalizer) of the unfinished
    jobs submitted more than ``grace_seconds`` ago (no spec loaded)."""
    from datetime import timedelta

    return list(session.execute(select(
        Job.id, Job.status, Job.parallel, Job.runs_enqueued, Job.cancel_requested,
        Job.finalizer).where(
        Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
        Job.created_at < utcnow() - timedelta(seconds=grace_seconds))).all())


def status_counts(session) -> dict[str, int]:
    return dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())


def trial_count(session) -> int:
    return session.scalar(select(func.count()).select_from(Trial)) or 0


def age_seconds(when: datetime | None) -> float | None:
    return None if when is None else (utcnow() - when).total_seconds()


# ------------------------------------------------------------------ a job run (the workers)

def set_layout(session, job_id: str, layout: dict) -> bool:
    """Store the grouping's layout on the job once; True when this call stored it."""
    done = session.execute(update(Job).where(Job.id == job_id, Job.layout.is_(None))
                           .values(layout=layout))
    return done.rowcount == 1


def write_result(session, job_id: str, result: dict) -> JobStatus:
    """Store a search's result on a job still running (with its progress); the job's status
    (anything but running: cancelled or failed meanwhile, and nothing written)."""
    job = refresh_progress(session, job_id)
    status = JobStatus(job.status)
    if status is JobStatus.RUNNING:
        job.result = result
        best, uniform = result.get("best"), result.get("best_uniform")
        if best is not None:  # the answer chosen on the validation data is the job's best
            job.best_trial, job.best_reward, job.best_tax = best["trial"], best["reward"], best["tax"]
            job.best_ratios = best["ratios"]
        if uniform is not None:
            job.baseline_ratio, job.baseline_reward = uniform["ratio"], uniform["reward"]
            job.baseline_tax = uniform["tax"]
    return status


def start_export(session, job_id: str, out_dir: str) -> tuple[dict, dict | None]:
    """Mark the job's export running into ``out_dir``; (its spec, its best ratios)."""
    job = get_job(session, job_id)
    job.export_status, job.export_dir, job.export_error = ExportStatus.RUNNING, out_dir, None
    return job.spec, job.best_ratios


def finish_export(session, job_id: str, out_dir: str, status: ExportStatus, **fields) -> bool:
    """Record the end of an export still ``running`` into ``out_dir``: the recovery may have
    failed it meanwhile (its worker was declared dead), and another export may have started.
    True when recorded."""
    done = session.execute(update(Job).where(
        Job.id == job_id, Job.export_status == ExportStatus.RUNNING, Job.export_dir == out_dir)
        .values(export_status=status, **fields))
    return done.rowcount == 1


def recover_job(session, job_id: str, worker_id: str, *, export_error: str) -> tuple[bool, bool]:
    """The job of a dead worker: its export fails (``export_error``) when it was running and
    no other live worker is on the job; an unfinished job is freed for another worker
    (its finaliser claim, and back to queued when nobody else runs it). Returns (the job is
    unfinished: enqueue a run, its export was failed)."""
    job = get_job(session, job_id)
    unfinished = not JobStatus(job.status).terminal
    others = [w for w in worker_db.alive(session, job_id=job_id) if w.id != worker_id]
    orphaned = job.export_status == ExportStatus.RUNNING and not others
    if orphaned:  # it died exporting: nobody else will finish it
        job.export_status, job.export_error = ExportStatus.FAILED, export_error
    if unfinished:
        if job.finalizer == worker_id:  # it died writing the result: another worker will
            job.finalizer = None
        if not others:
            set_status(session, job_id, JobStatus.QUEUED, expect={JobStatus.RUNNING})
    return unfinished, orphaned
