"""/v1/pipelines: nightly merge pipelines (viewer reads, operator mutations).

Webhook secrets are stored to sign the deliveries and never returned: a pipeline's spec
comes back with ``has_secret`` in their place, and an update that names a hook's URL
without a secret keeps the stored one.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query
from pydantic import BaseModel, Field
from sqlalchemy import delete

from service.api.deps import Operator, SessionDep, SettingsDep, Viewer
from service.api.schemas import ErrorBody
from service.db import pipelines as pipe_db
from service.db.models import Pipeline, PipelineRun, Promotion, WebhookDelivery, utcnow
from service.pipelines import scheduler
from service.pipelines.spec import PipelineSpec

router = APIRouter(prefix="/v1/pipelines", tags=["pipelines"])
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody}, 403: {"model": ErrorBody}, 404: {"model": ErrorBody}}


class PipelineOut(BaseModel):
    id: str
    name: str
    spec: dict = Field(description="the pipeline spec, webhook secrets left out")
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


class RunOut(BaseModel):
    id: str
    pipeline_id: str
    scheduled_for: datetime
    trigger: str = Field(description="schedule, catch_up (a missed time run late) or manual")
    status: str = Field(description="pending, starting, running, remeasuring (the "
                        "champion, on changed data), deciding, promoting, switching, "
                        "succeeded, skipped or failed")
    checkpoint: str | None
    base_checkpoint: str | None
    job_id: str | None
    warm_start: dict | None = Field(description="the previous run's best ratios and "
                                    "uniform α this run started from")
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
    status: str = Field(description="pending, delivered or failed")
    attempts: int
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: datetime
    created_at: datetime
    delivered_at: datetime | None


class Page(BaseModel):
    data: list
    count: int


def _out(p: Pipeline) -> PipelineOut:
    spec = PipelineSpec.model_validate(p.spec).public()
    return PipelineOut(id=p.id, name=p.name, spec=spec, paused=p.paused,
                       next_due_at=p.next_due_at, champion_run_id=p.champion_run_id,
                       created_by=p.created_by, created_at=p.created_at, updated_at=p.updated_at)


def _validated(raw: dict, settings, old: dict | None = None) -> PipelineSpec:
    """The spec validated and checked against the roots; hooks without a secret keep the
    stored secret of the same URL."""
    from pydantic import ValidationError

    from service.spec import spec_error_from_validation

    from service.errors import SpecError

    stored = {h["url"]: h.get("secret") for h in (old or {}).get("webhooks", [])}
    hooks = raw.get("webhooks") or []
    if not isinstance(hooks, list):
        raise SpecError("webhooks must be a list of {url, events, secret}", field="webhooks")
    for hook in hooks:
        if isinstance(hook, dict) and not hook.get("secret") and stored.get(hook.get("url")):
            hook["secret"] = stored[hook["url"]]
        if isinstance(hook, dict):
            hook.pop("has_secret", None)
    try:
        spec = PipelineSpec.model_validate(raw)
    except ValidationError as exc:
        raise spec_error_from_validation(exc) from None
    scheduler.check_pipeline(spec, settings)
    return spec


@router.post("", status_code=201, response_model=PipelineCreated, responses={
    **ERRORS, 409: {"model": ErrorBody, "description": "a pipeline of that name exists"},
    422: {"model": ErrorBody, "description": "invalid spec (`field` names it): cron, time "
          "zone, sources, template"}})
def create(spec: Annotated[dict, Body(openapi_examples={"nightly": {
               "value": PipelineSpec.model_json_schema()["examples"][0]}})],
           caller: Operator, session: SessionDep, settings: SettingsDep):
    """Create a pipeline: a job-spec template, a cron schedule, the aligned checkpoint
    source (and optionally the base), the promote folder, webhooks."""
    from sqlalchemy.exc import IntegrityError

    from service.errors import ConflictError

    hooks = spec.get("webhooks")
    given = {h.get("url") for h in hooks if isinstance(h, dict) and h.get("secret")} if (
        isinstance(hooks, list)) else set()
    checked = _validated(spec, settings)
    try:
        p = pipe_db.create_pipeline(session, checked.model_dump(mode="json"),
                                    token_id=caller.id, created_by=caller.name)
        session.commit()
    except IntegrityError:  # the same name, created at the same moment
        session.rollback()
        raise ConflictError(f"a pipeline named {checked.name!r} exists") from None
    return PipelineCreated(**_out(p).model_dump(), webhook_secrets={
        h.url: h.secret for h in checked.webhooks if h.url not in given})


@router.get("", response_model=Page, responses=ERRORS)
def list_pipelines(_: Viewer, session: SessionDep):
    rows = pipe_db.list_pipelines(session)
    return Page(data=[_out(p) for p in rows], count=len(rows))


@router.get("/{ref}", response_model=PipelineOut, responses=ERRORS)
def get(ref: str, _: Viewer, session: SessionDep):
    """By name or id."""
    return _out(pipe_db.get_pipeline(session, ref))


@router.put("/{ref}", response_model=PipelineOut, responses={
    **ERRORS, 422: {"model": ErrorBody, "description": "invalid spec"}})
def update(ref: str, spec: Annotated[dict, Body()], _: Operator, session: SessionDep,
           settings: SettingsDep):
    """Replace the spec (the name may change); the next run time follows the new schedule."""
    from sqlalchemy import select

    from service.errors import ConflictError

    p = pipe_db.get_pipeline(session, ref, lock=True)
    checked = _validated(spec, settings, old=p.spec)
    if checked.name != p.name and session.scalar(
            select(Pipeline).where(Pipeline.name == checked.name)) is not None:
        raise ConflictError(f"a pipeline named {checked.name!r} exists")
    p.spec, p.name = checked.model_dump(mode="json"), checked.name
    p.next_due_at = pipe_db.next_due(p.spec["schedule"], utcnow())
    session.commit()
    return _out(p)


@router.post("/{ref}/pause", response_model=PipelineOut, responses=ERRORS)
def pause(ref: str, _: Operator, session: SessionDep):
    """No scheduled run starts while paused (a manual trigger still does)."""
    p = pipe_db.get_pipeline(session, ref, lock=True)
    p.paused = True
    session.commit()
    return _out(p)


@router.post("/{ref}/resume", response_model=PipelineOut, responses=ERRORS)
def resume(ref: str, _: Operator, session: SessionDep):
    """Resume from the next scheduled time (the times passed while paused are not run)."""
    p = pipe_db.get_pipeline(session, ref, lock=True)
    p.paused = False
    p.next_due_at = pipe_db.next_due(p.spec["schedule"], utcnow())
    session.commit()
    return _out(p)


@router.delete("/{ref}", status_code=204, responses=ERRORS)
def remove(ref: str, _: Operator, session: SessionDep):
    """Delete the pipeline with its runs, promotions and delivery log (its jobs and
    promoted merges stay)."""
    p = pipe_db.get_pipeline(session, ref, lock=True)
    for model in (PipelineRun, Promotion, WebhookDelivery):
        session.execute(delete(model).where(model.pipeline_id == p.id))
    session.delete(p)
    session.commit()


@router.post("/{ref}/trigger", status_code=202, response_model=RunOut, responses=ERRORS)
def trigger(ref: str, _: Operator, session: SessionDep, settings: SettingsDep):
    """Start a run now (the scheduler picks it up on its next pass, within
    HMAOPT_SCHEDULER_SECONDS). A manual run searches even an already processed checkpoint."""
    run_id = scheduler.Scheduler(settings).trigger(ref)
    return RunOut.model_validate(pipe_db.get_run(session, run_id), from_attributes=True)


@router.get("/{ref}/runs", response_model=Page, responses=ERRORS)
def runs(ref: str, _: Viewer, session: SessionDep,
         limit: Annotated[int, Query(ge=1, le=1000)] = 100,
         offset: Annotated[int, Query(ge=0)] = 0):
    """Runs, newest first: status, checkpoint, job, reward, tax, gain, decision and reason."""
    p = pipe_db.get_pipeline(session, ref)
    rows = pipe_db.list_runs(session, p.id, limit=limit, offset=offset)
    return Page(data=[RunOut.model_validate(r, from_attributes=True) for r in rows],
                count=len(rows))


@router.get("/{ref}/runs/{run_id}", response_model=RunOut, responses=ERRORS)
def run(ref: str, run_id: str, _: Viewer, session: SessionDep):
    from service.errors import NotFoundError

    p = pipe_db.get_pipeline(session, ref)
    r = pipe_db.get_run(session, run_id)
    if r.pipeline_id != p.id:
        raise NotFoundError(f"pipeline {p.name} has no run {run_id}")
    return RunOut.model_validate(r, from_attributes=True)


@router.get("/{ref}/promotions", response_model=Page, responses=ERRORS)
def promotions(ref: str, _: Viewer, session: SessionDep):
    """The alias's history, newest first."""
    p = pipe_db.get_pipeline(session, ref)
    rows = pipe_db.list_promotions(session, p.id)
    return Page(data=[PromotionOut.model_validate(r, from_attributes=True) for r in rows],
                count=len(rows))


@router.post("/{ref}/rollback", status_code=202, responses={
    **ERRORS, 409: {"model": ErrorBody, "description": "no earlier champion"}})
def rollback(ref: str, _: Operator, settings: SettingsDep) -> dict:
    """Switch `current` back to the champion before the current one: the scheduler does it
    on its next pass (it writes the promote folders); follow `champion_run_id`."""
    return scheduler.request_rollback(settings, ref)


@router.get("/{ref}/deliveries", response_model=Page, responses=ERRORS)
def deliveries(ref: str, _: Viewer, session: SessionDep,
               limit: Annotated[int, Query(ge=1, le=1000)] = 100):
    """The webhook delivery log, newest first."""
    p = pipe_db.get_pipeline(session, ref)
    rows = pipe_db.list_deliveries(session, p.id, limit=limit)
    return Page(data=[DeliveryOut.model_validate(r, from_attributes=True) for r in rows],
                count=len(rows))
