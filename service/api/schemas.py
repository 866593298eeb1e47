"""Response shapes of the REST API (separate from the table models); lists are
``{"data": [...], "count": N}`` where ``count`` is the total before paging.

Ratio convention in every field named ``ratios``: a ratio is the weight on the ALIGNED model,
merged = base + ratio * (aligned - base); 0 = base (pre-RLHF), 1 = aligned (post-RLHF).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel, Field

from service.api.results import Flag, JobResult, Layout, described
from service.db.models import Job, Trial
from service.pipelines.spec import PublicPipelineSpec
from service.spec import JobSpec
from service.status import (DeliveryStatus, ExportStatus, JobStatus, PipelineRunStatus,
                            TrialStatus, WorkerState)

#: the largest offset a list takes (a 32-bit count of rows: beyond any table, and within
#: every database's integer types)
MAX_OFFSET = 2**31 - 1
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="rows to skip (paging)")]

T = TypeVar("T")


def limit_param(maximum: int) -> object:
    """``limit: Annotated[int, limit_param(500)] = 50``: a page of 1 to ``maximum`` rows."""
    return Query(ge=1, le=maximum, description=f"rows per page (1 to {maximum})")


def text_param(description: str) -> object:
    """A free-text query parameter: at most 200 characters, no NUL (no database stores it)."""
    return Query(max_length=200, pattern=r"^[^\x00]*$", description=description)


def check_storable(value, field: str = "") -> None:
    """Refuse (SpecError naming the field) a string no database stores: a NUL character
    (PostgreSQL's text and JSON refuse it) or a lone surrogate (not encodable as UTF-8)."""
    from service.errors import SpecError

    if isinstance(value, str):
        if "\x00" in value or any("\ud800" <= c <= "\udfff" for c in value):
            raise SpecError("a NUL character or a lone surrogate cannot be stored",
                            field=field or None)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_storable(key, field)
            check_storable(item, f"{field}.{key}" if field else str(key))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            check_storable(item, f"{field}.{i}")


RATIOS = ("Ratio per group slot, the weight on the ALIGNED model: merged = base + ratio * "
          "(aligned - base); 0 = base, 1 = aligned.")


class ErrorBody(BaseModel):
    error: str = Field(description="machine-readable code, e.g. invalid_spec, forbidden")
    message: str = Field(description="what is wrong and what to do")
    field: str | None = Field(None, description="the offending field of the request, if any")

    model_config = {"json_schema_extra": {"examples": [
        {"error": "invalid_spec", "message": "tax.budget: Input should be greater than or "
         "equal to 0", "field": "tax.budget"}]}}


class Progress(BaseModel):
    trials_finished: int = Field(description="complete or pruned trials, the baseline included, "
                                 "and the answer stage's uniform trials (past n_trials: "
                                 "search.pooled_uniform_trials)")
    trials_pruned: int
    n_trials: int
    fraction: float


class BestTrial(BaseModel):
    trial: int
    reward: float
    tax: float
    ratios: dict[str, float] = Field(description=RATIOS)
    reward_se: float | None = Field(None, description="standard error of the reward (over "
                                    "prompts); set once the job has its result")
    tax_se: float | None = Field(None, description="standard error of the tax (over records, "
                                 "paired with the base model)")


class Baseline(BaseModel):
    ratio: float | None = Field(description="the best feasible uniform ratio (vanilla averaging)")
    reward: float
    tax: float | None


class ExportState(BaseModel):
    status: ExportStatus | None = Field(description="none yet (null), queued, running, "
                                        "succeeded or failed")
    dir: str | None
    error: str | None
    manifest: dict | None = None


class JobSummary(BaseModel):
    id: str
    name: str
    status: JobStatus
    submitted_by: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    progress: Progress
    best: BestTrial | None = Field(description="best feasible trial so far (tax <= budget)")
    baseline: Baseline | None = Field(description="best feasible uniform ratio so far")
    gain: float | None = Field(description="best reward minus the baseline's, same budget")
    gain_ci95: list[float] | None = Field(None, description="95 % interval [lo, hi] of the "
                                          "gain, paired record by record (search data)")
    holdout_gain: float | None = Field(None, description="the gain on the holdout data")
    holdout_gain_ci95: list[float] | None = Field(None, description="its 95 % interval")
    flags: list[Flag] = Field(default_factory=list, description="why the result may not "
                              "hold (empty: nothing found)")
    budget: float
    base_model: str
    aligned_model: str
    cancel_requested: bool
    error: str | None


class JobDetail(JobSummary):
    spec: described(JobSpec) = Field(description="the job spec, paths resolved inside the "
                                     "server's roots")
    result: described(JobResult) | None = Field(
        description="the final result: holdout figures, pareto front, timings (as `hmaopt "
        "search --json`); null until the job has finished")
    export: ExportState
    layout: described(Layout) | None = Field(
        description="the grouping: decoder layers of each group and the ratio slots "
        "(written when a worker starts the job)")
    enqueue_deferred: bool = Field(False, description="true only in the 202 answer to a "
                                   "submission made while Redis was unreachable: the job is "
                                   "stored (queued) and the service enqueues it once Redis "
                                   "is back; do not submit it again")


class Page(BaseModel, Generic[T]):
    """A page of a list: ``data``, and ``count``, the number of rows before paging."""

    data: list[T]
    count: int = Field(description="rows matching, before limit and offset")


class JobList(Page[JobSummary]):
    pass


class TrialPublic(BaseModel):
    number: int
    kind: str = Field(description="the stage that ran it: uniform (the vanilla-averaging "
                      "baseline), warm (a search.warm_start vector), gradient (the gradient "
                      "stage's ray), search (the sampler) or walk (the best sampler trial's "
                      "ray to the budget)")
    state: TrialStatus = Field(description="complete or pruned (stopped after stage 1)")
    ratios: dict[str, float] = Field(description=RATIOS)
    reward: float | None
    tax: float
    feasible: bool
    stage: int
    metrics: dict[str, float | None]
    task_tax: dict[str, float | None]
    uniform_ratio: float | None
    merge_seconds: float
    eval_seconds: float
    worker_id: str | None
    finished_at: datetime
    reward_se: float | None = Field(None, description="standard error of the reward over "
                                    "its n_reward records (prompts)")
    tax_se: float | None = Field(None, description="standard error of the tax over its n_tax "
                                 "records, paired with the base model on the same records")
    n_reward: int | None = None
    n_tax: int | None = None


class TrialList(Page[TrialPublic]):
    pass


class TrialPoints(BaseModel):
    """Every finished trial of a job in columns, for figures: one entry per trial, by number.
    Reward and tax are rounded to 6 significant digits (the trials endpoint has them exact)."""
    count: int
    cursor: str | None = Field(description="the job's event-stream id read before the "
                               "trials: GET events?since=cursor continues from here")
    number: list[int]
    kind: list[str]
    state: list[TrialStatus]
    feasible: list[bool]
    reward: list[float | None]
    tax: list[float]
    uniform_ratio: list[float | None]
    reward_se: list[float | None] = Field(description="standard errors, as the trials have them")
    tax_se: list[float | None]


class ExportRequest(BaseModel):
    model_config = {"extra": "forbid", "json_schema_extra": {"examples": [
        {"dir": "exports/demo-best", "overwrite": False}]}}

    dir: str | None = Field(None, description="output folder inside the model roots (default: "
                            "the spec's export.dir)")
    overwrite: bool = False


# ------------------------------------------------------------------------------ workers

class WorkerPublic(BaseModel):
    id: str
    name: str
    hostname: str
    pid: int
    device: str
    state: WorkerState = Field(description="idle | busy | stopped | dead")
    alive: bool = Field(description="reported within HMAOPT_WORKER_STALE_SECONDS")
    job_id: str | None
    started_at: datetime
    heartbeat_at: datetime
    heartbeat_age_seconds: float


class WorkerList(Page[WorkerPublic]):
    pass


# ------------------------------------------------------------------------------ pipelines

class PipelineOut(BaseModel):
    id: str
    name: str
    spec: described(PublicPipelineSpec) = Field(description="the pipeline spec, webhook "
                                                "secrets left out")
    paused: bool
    next_due_at: datetime | None = Field(description="the next scheduled run (UTC)")
    champion_run_id: str | None = Field(description="the run whose merge `current` names")
    created_by: str | None
    created_at: datetime
    updated_at: datetime


class PipelineCreated(PipelineOut):
    webhook_secrets: dict[str, str] = Field(
        {}, description="the secrets generated for hooks given without one, by URL: shown "
        "once, here; keep them to verify the signatures")


class WarmStart(BaseModel):
    from_run: str = Field(description="the earlier run whose job found them")
    ratios: dict[str, float] = Field(description=RATIOS)
    uniform: float | None = Field(description="its best feasible uniform ratio")


class RollbackRequested(BaseModel):
    pipeline: str
    status: str = Field(description="requested: the scheduler switches `current` on its "
                        "next pass")
    champion_run: str = Field(description="the run whose merge becomes `current` again")
    dir: str | None
    replaced_run: str | None = Field(description="the champion it replaces")


class RunOut(BaseModel):
    id: str
    pipeline_id: str
    scheduled_for: datetime
    trigger: str = Field(description="schedule, catch_up (a missed time run late) or manual")
    status: PipelineRunStatus = Field(
        description="pending, starting, running, remeasuring (the champion, on changed "
        "data), deciding, promoting, switching, succeeded, skipped or failed")
    checkpoint: str | None
    base_checkpoint: str | None
    job_id: str | None
    warm_start: described(WarmStart) | None = Field(
        description="the previous run's best ratios and uniform α this run started from")
    decision: str | None = Field(description="promoted or kept (with the reason)")
    reason: str | None
    reward: float | None
    tax: float | None
    holdout_reward: float | None
    holdout_tax: float | None
    gain: float | None = Field(description="over the best feasible uniform α")
    champion_reward: float | None
    champion_job_id: str | None = Field(description="the job that re-measured the champion "
                                        "on this run's data (when it changed)")
    promoted_dir: str | None
    created_at: datetime
    finished_at: datetime | None


class PromotionOut(BaseModel):
    id: int
    run_id: str
    action: str = Field(description="promote or rollback")
    dir: str
    previous_run_id: str | None
    created_at: datetime


class DeliveryOut(BaseModel):
    id: int
    run_id: str | None
    event: str
    msg_id: str
    url: str
    status: DeliveryStatus = Field(description="pending, delivered or failed")
    attempts: int
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: datetime
    created_at: datetime
    delivered_at: datetime | None


class PipelineList(Page[PipelineOut]):
    pass


class RunList(Page[RunOut]):
    pass


class PromotionList(Page[PromotionOut]):
    pass


class DeliveryList(Page[DeliveryOut]):
    pass


class Health(BaseModel):
    status: str
    checks: dict[str, str] = {}


def job_summary(job: Job, detail: bool = False) -> JobSummary | JobDetail:
    best = None
    result = job.result or {}
    if job.best_reward is not None:
        chosen = result.get("best") or {}
        best = BestTrial(trial=job.best_trial, reward=job.best_reward, tax=job.best_tax,
                         ratios=job.best_ratios or {}, reward_se=chosen.get("reward_se"),
                         tax_se=chosen.get("tax_se"))
    baseline = None
    if job.baseline_reward is not None:
        baseline = Baseline(ratio=job.baseline_ratio, reward=job.baseline_reward,
                            tax=job.baseline_tax)
    fields = dict(
        id=job.id, name=job.name, status=job.status, submitted_by=job.submitted_by,
        created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
        updated_at=job.updated_at,
        progress=Progress(trials_finished=job.trials_finished, trials_pruned=job.trials_pruned,
                          n_trials=job.n_trials,
                          fraction=min(1.0, job.trials_finished / max(job.n_trials, 1))),
        best=best, baseline=baseline, gain=job.gain, gain_ci95=result.get("gain_ci95"),
        holdout_gain=result.get("holdout_gain"),
        holdout_gain_ci95=result.get("holdout_gain_ci95"), flags=result.get("flags") or [],
        budget=job.spec["tax"]["budget"],
        base_model=job.spec["base_model"], aligned_model=job.spec["aligned_model"],
        cancel_requested=job.cancel_requested, error=job.error)
    if not detail:
        return JobSummary(**fields)
    public = {k: v for k, v in result.items() if k != "per_record"} if job.result else None
    return JobDetail(**fields, spec=job.spec, result=public, layout=job.layout,
                     export=ExportState(status=job.export_status, dir=job.export_dir,
                                        error=job.export_error, manifest=job.export_manifest))


def trial_public(t: Trial) -> TrialPublic:
    return TrialPublic.model_validate(t, from_attributes=True)
