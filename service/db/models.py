"""SQLAlchemy 2 models of the service's own tables (Optuna keeps its tables beside them).

Every table is prefixed ``hmaopt_`` so that the service shares a database with Optuna (and
anything else) without clashes. Timestamps are timezone-aware UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from service.errors import NotFoundError
from service.status import (DeliveryStatus, ExportStatus, JobStatus, PipelineRunStatus,
                            TrialStatus, WorkerState)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC datetime on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime: use timezone-aware UTC values")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class StateString(TypeDecorator):
    """A state column: its ``str`` enum (service.status) in Python, the plain value in a
    ``VARCHAR`` in the database (as before the enums: no migration, no database enum type).
    A value outside the enum is refused on write."""

    impl = String
    cache_ok = True

    def __init__(self, enum: type, length: int = 16) -> None:
        super().__init__(length)
        self.enum = enum

    def process_bind_param(self, value, dialect):
        return None if value is None else self.enum(value).value

    def process_result_value(self, value, dialect):
        return None if value is None else self.enum(value)


class Base(DeclarativeBase):
    type_annotation_map = {dict: JSON, list: JSON, datetime: UTCDateTime}

    @classmethod
    def one_or_raise(cls, session, *where, lock: bool = False, missing: str):
        """The row matching ``where`` (``SELECT ... FOR UPDATE`` with ``lock``); NotFoundError
        with the message ``missing`` when there is none."""
        stmt = select(cls).where(*where)
        if lock:
            stmt = stmt.with_for_update()
        row = session.scalar(stmt)
        if row is None:
            raise NotFoundError(missing)
        return row


class Job(Base):
    """One merge-search job: the source of truth (Redis only carries it to a worker)."""

    __tablename__ = "hmaopt_jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    status: Mapped[JobStatus] = mapped_column(StateString(JobStatus), index=True)
    spec: Mapped[dict]
    token_id: Mapped[str | None] = mapped_column(String(32))
    submitted_by: Mapped[str | None] = mapped_column(String(100))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # search progress, kept up to date by the workers
    n_trials: Mapped[int]
    parallel: Mapped[int] = mapped_column(default=1)
    trials_finished: Mapped[int] = mapped_column(default=0)
    trials_pruned: Mapped[int] = mapped_column(default=0)
    best_trial: Mapped[int | None]
    best_reward: Mapped[float | None] = mapped_column(Float)
    best_tax: Mapped[float | None] = mapped_column(Float)
    best_ratios: Mapped[dict | None]
    baseline_ratio: Mapped[float | None] = mapped_column(Float)
    baseline_reward: Mapped[float | None] = mapped_column(Float)
    baseline_tax: Mapped[float | None] = mapped_column(Float)
    result: Mapped[dict | None]
    #: the grouping's layers and slots (Grouping.describe()), written when a worker starts it
    layout: Mapped[dict | None]
    error: Mapped[str | None] = mapped_column(Text)
    # queue bookkeeping
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    runs_enqueued: Mapped[int] = mapped_column(default=0)
    finalizer: Mapped[str | None] = mapped_column(String(32))
    # export of the best merge
    export_status: Mapped[ExportStatus | None] = mapped_column(StateString(ExportStatus))
    export_dir: Mapped[str | None] = mapped_column(Text)
    export_error: Mapped[str | None] = mapped_column(Text)
    export_manifest: Mapped[dict | None]

    __table_args__ = (UniqueConstraint("token_id", "idempotency_key",
                                       name="uq_hmaopt_jobs_idempotency"),)

    @property
    def gain(self) -> float | None:
        if self.best_reward is None or self.baseline_reward is None:
            return None
        return self.best_reward - self.baseline_reward


class Trial(Base):
    """A finished trial of a job: the read model of the API and the dashboard.

    Optuna's own tables hold the same trials (the search's state); this table adds fast
    paging and sorting. (job_id, number) is unique: a trial is never counted twice.
    """

    __tablename__ = "hmaopt_trials"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32))
    number: Mapped[int]
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[TrialStatus] = mapped_column(StateString(TrialStatus))
    ratios: Mapped[dict]
    reward: Mapped[float | None] = mapped_column(Float)
    tax: Mapped[float] = mapped_column(Float)
    feasible: Mapped[bool] = mapped_column(Boolean)
    stage: Mapped[int]
    metrics: Mapped[dict]
    task_tax: Mapped[dict]
    uniform_ratio: Mapped[float | None] = mapped_column(Float)
    merge_seconds: Mapped[float] = mapped_column(Float)
    eval_seconds: Mapped[float] = mapped_column(Float)
    worker_id: Mapped[str | None] = mapped_column(String(32))
    finished_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: standard errors of the reward and the tax over their records, and the records
    #: behind each (None for trials recorded before 0004)
    reward_se: Mapped[float | None] = mapped_column(Float)
    tax_se: Mapped[float | None] = mapped_column(Float)
    n_reward: Mapped[int | None] = mapped_column(Integer)
    n_tax: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (
        UniqueConstraint("job_id", "number", name="uq_hmaopt_trials_job_number"),
        Index("ix_hmaopt_trials_job_reward", "job_id", "reward"),
    )


class Token(Base):
    """An API token. Only its SHA-256 is stored; the token itself is shown once."""

    __tablename__ = "hmaopt_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class Worker(Base):
    """A worker process and its liveness (``heartbeat_at``)."""

    __tablename__ = "hmaopt_workers"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    hostname: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int]
    device: Mapped[str] = mapped_column(String(32))
    state: Mapped[WorkerState] = mapped_column(StateString(WorkerState), index=True)
    job_id: Mapped[str | None] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
    stopped_at: Mapped[datetime | None]


class Pipeline(Base):
    """A nightly merge pipeline: a job-spec template, a cron schedule, checkpoint sources,
    a promote folder and webhooks (``spec``: service.pipelines.spec.PipelineSpec, webhook
    secrets included: stored to sign, never returned)."""

    __tablename__ = "hmaopt_pipelines"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    spec: Mapped[dict]
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    #: the next cron time not yet handled (UTC); None until the first scheduler pass
    next_due_at: Mapped[datetime | None] = mapped_column(index=True)
    champion_run_id: Mapped[str | None] = mapped_column(String(32))
    #: set by POST .../rollback; the scheduler switches the alias (it may write the folder)
    rollback_requested_at: Mapped[datetime | None]
    token_id: Mapped[str | None] = mapped_column(String(32))
    created_by: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class PipelineRun(Base):
    """One run of a pipeline: claimed once per (pipeline, scheduled time) by the unique
    constraint, whichever scheduler inserts it first; a normal job does the search."""

    __tablename__ = "hmaopt_pipeline_runs"
    __table_args__ = (UniqueConstraint("pipeline_id", "scheduled_for",
                                       name="uq_hmaopt_pipeline_runs_due"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    pipeline_id: Mapped[str] = mapped_column(String(32), index=True)
    scheduled_for: Mapped[datetime]
    trigger: Mapped[str] = mapped_column(String(16))  # schedule | catch_up | manual
    status: Mapped[PipelineRunStatus] = mapped_column(StateString(PipelineRunStatus),
                                                      index=True)
    #: when the status last changed (a transient status held too long is failed)
    status_changed_at: Mapped[datetime] = mapped_column(default=utcnow)
    checkpoint: Mapped[str | None] = mapped_column(Text)
    base_checkpoint: Mapped[str | None] = mapped_column(Text)
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    job_id: Mapped[str | None] = mapped_column(String(32))
    warm_start: Mapped[dict | None]
    decision: Mapped[str | None] = mapped_column(String(16))  # promoted | kept
    reason: Mapped[str | None] = mapped_column(Text)
    reward: Mapped[float | None] = mapped_column(Float)
    tax: Mapped[float | None] = mapped_column(Float)
    holdout_reward: Mapped[float | None] = mapped_column(Float)
    holdout_tax: Mapped[float | None] = mapped_column(Float)
    gain: Mapped[float | None] = mapped_column(Float)
    champion_reward: Mapped[float | None] = mapped_column(Float)
    #: the champion run the decision compared against
    champion_run_id: Mapped[str | None] = mapped_column(String(32))
    #: the job that re-measured the champion's merge on this run's data (when it changed)
    champion_job_id: Mapped[str | None] = mapped_column(String(32))
    promoted_dir: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


class Promotion(Base):
    """The promote folder's history: each switch of its ``current`` alias."""

    __tablename__ = "hmaopt_promotions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    pipeline_id: Mapped[str] = mapped_column(String(32), index=True)
    run_id: Mapped[str] = mapped_column(String(32))
    action: Mapped[str] = mapped_column(String(16))  # promote | rollback
    dir: Mapped[str] = mapped_column(Text)
    previous_run_id: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDelivery(Base):
    """One webhook message to one URL, with its attempts (retried with backoff)."""

    __tablename__ = "hmaopt_webhook_deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    pipeline_id: Mapped[str] = mapped_column(String(32), index=True)
    run_id: Mapped[str | None] = mapped_column(String(32))
    event: Mapped[str] = mapped_column(String(32))
    msg_id: Mapped[str] = mapped_column(String(64))
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict]
    status: Mapped[DeliveryStatus] = mapped_column(StateString(DeliveryStatus), index=True)
    attempts: Mapped[int] = mapped_column(default=0)
    last_status_code: Mapped[int | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]
