"""/v1/pipelines: nightly merge pipelines (viewer reads, operator mutations).

Webhook secrets are stored to sign the deliveries and never returned: a pipeline's spec
comes back with ``has_secret`` in their place, and an update that names a hook's URL
without a secret keeps the stored one.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query

from service.api.deps import Operator, SessionDep, SettingsDep, Viewer
from service.api.schemas import (
    DeliveryList,
    DeliveryOut,
    ErrorBody,
    PipelineCreated,
    PipelineList,
    PipelineOut,
    PromotionList,
    PromotionOut,
    RunList,
    RunOut,
)
from service.db import pipelines as pipe_db
from service.db import webhooks as hook_db
from service.db.models import Pipeline
from service.pipelines import promotion, scheduler
from service.pipelines.sources import check_pipeline
from service.pipelines.spec import PipelineSpec

router = APIRouter(prefix="/v1/pipelines", tags=["pipelines"])
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody}, 403: {"model": ErrorBody}, 404: {"model": ErrorBody}}


def _out(p: Pipeline) -> PipelineOut:
    spec = PipelineSpec.model_validate(p.spec).public()
    return PipelineOut(id=p.id, name=p.name, spec=spec, paused=p.paused,
                       next_due_at=p.next_due_at, champion_run_id=p.champion_run_id,
                       created_by=p.created_by, created_at=p.created_at, updated_at=p.updated_at)


def _validated(raw: dict, settings, old: dict | None = None) -> PipelineSpec:
    """The spec validated and checked against the roots; hooks without a secret keep the
    stored secret of the same URL."""
    from pydantic import ValidationError

    from service.errors import SpecError
    from service.spec import spec_error_from_validation

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
    check_pipeline(spec, settings)
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
    hooks = spec.get("webhooks")
    given = {h.get("url") for h in hooks if isinstance(h, dict) and h.get("secret")} if (
        isinstance(hooks, list)) else set()
    checked = _validated(spec, settings)
    p = pipe_db.create_pipeline(session, checked.model_dump(mode="json"), token_id=caller.id,
                                created_by=caller.name)
    session.commit()
    return PipelineCreated(**_out(p).model_dump(), webhook_secrets={
        h.url: h.secret for h in checked.webhooks if h.url not in given})


@router.get("", response_model=PipelineList, responses=ERRORS)
def list_pipelines(_: Viewer, session: SessionDep):
    rows = pipe_db.list_pipelines(session)
    return PipelineList(data=[_out(p) for p in rows], count=len(rows))


@router.get("/{ref}", response_model=PipelineOut, responses=ERRORS)
def get(ref: str, _: Viewer, session: SessionDep):
    """By name or id."""
    return _out(pipe_db.get_pipeline(session, ref))


@router.put("/{ref}", response_model=PipelineOut, responses={
    **ERRORS, 422: {"model": ErrorBody, "description": "invalid spec"}})
def update(ref: str, spec: Annotated[dict, Body()], _: Operator, session: SessionDep,
           settings: SettingsDep):
    """Replace the spec (the name may change); the next run time follows the new schedule."""
    old = pipe_db.get_pipeline(session, ref, lock=True)
    checked = _validated(spec, settings, old=old.spec)
    return _committed(session, pipe_db.update_pipeline(session, ref,
                                                       checked.model_dump(mode="json")))


@router.post("/{ref}/pause", response_model=PipelineOut, responses=ERRORS)
def pause(ref: str, _: Operator, session: SessionDep):
    """No scheduled run starts while paused (a manual trigger still does)."""
    return _committed(session, pipe_db.set_paused(session, ref, True))


@router.post("/{ref}/resume", response_model=PipelineOut, responses=ERRORS)
def resume(ref: str, _: Operator, session: SessionDep):
    """Resume from the next scheduled time (the times passed while paused are not run)."""
    return _committed(session, pipe_db.set_paused(session, ref, False))


@router.delete("/{ref}", status_code=204, responses=ERRORS)
def remove(ref: str, _: Operator, session: SessionDep):
    """Delete the pipeline with its runs, promotions and delivery log (its jobs and
    promoted merges stay)."""
    pipe_db.delete_pipeline(session, ref)
    session.commit()


def _committed(session, p: Pipeline) -> PipelineOut:
    session.commit()
    return _out(p)


@router.post("/{ref}/trigger", status_code=202, response_model=RunOut, responses=ERRORS)
def trigger(ref: str, _: Operator, session: SessionDep, settings: SettingsDep):
    """Start a run now (the scheduler picks it up on its next pass, within
    HMAOPT_SCHEDULER_SECONDS). A manual run searches even an already processed checkpoint."""
    run_id = scheduler.Scheduler(settings).trigger(ref)
    return RunOut.model_validate(pipe_db.get_run(session, run_id), from_attributes=True)


@router.get("/{ref}/runs", response_model=RunList, responses=ERRORS)
def runs(ref: str, _: Viewer, session: SessionDep,
         limit: Annotated[int, Query(ge=1, le=1000)] = 100,
         offset: Annotated[int, Query(ge=0)] = 0):
    """Runs, newest first: status, checkpoint, job, reward, tax, gain, decision and reason."""
    p = pipe_db.get_pipeline(session, ref)
    rows = pipe_db.list_runs(session, p.id, limit=limit, offset=offset)
    return RunList(data=[RunOut.model_validate(r, from_attributes=True) for r in rows],
                count=len(rows))


@router.get("/{ref}/runs/{run_id}", response_model=RunOut, responses=ERRORS)
def run(ref: str, run_id: str, _: Viewer, session: SessionDep):
    return RunOut.model_validate(pipe_db.get_pipeline_run(session, ref, run_id),
                                 from_attributes=True)


@router.get("/{ref}/promotions", response_model=PromotionList, responses=ERRORS)
def promotions(ref: str, _: Viewer, session: SessionDep):
    """The alias's history, newest first."""
    p = pipe_db.get_pipeline(session, ref)
    rows = pipe_db.list_promotions(session, p.id)
    return PromotionList(data=[PromotionOut.model_validate(r, from_attributes=True) for r in rows],
                count=len(rows))


@router.post("/{ref}/rollback", status_code=202, responses={
    **ERRORS, 409: {"model": ErrorBody, "description": "no earlier champion"}})
def rollback(ref: str, _: Operator, settings: SettingsDep) -> dict:
    """Switch `current` back to the champion before the current one: the scheduler does it
    on its next pass (it writes the promote folders); follow `champion_run_id`."""
    return promotion.request_rollback(settings, ref)


@router.get("/{ref}/deliveries", response_model=DeliveryList, responses=ERRORS)
def deliveries(ref: str, _: Viewer, session: SessionDep,
               limit: Annotated[int, Query(ge=1, le=1000)] = 100):
    """The webhook delivery log, newest first."""
    p = pipe_db.get_pipeline(session, ref)
    rows = hook_db.list_deliveries(session, p.id, limit=limit)
    return DeliveryList(data=[DeliveryOut.model_validate(r, from_attributes=True) for r in rows],
                count=len(rows))
