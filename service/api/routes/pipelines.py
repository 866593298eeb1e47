"""/v1/pipelines: nightly merge pipelines (viewer reads, operator mutations).

Webhook secrets are stored to sign the deliveries and never returned: a pipeline's spec
comes back with ``has_secret`` in their place, and an update that names a hook's URL
without a secret keeps the stored one.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body

from service.api.deps import Operator, SessionDep, SettingsDep, Viewer
from service.api.errors import responses
from service.api.results import SchemaOf
from service.api.schemas import (
    DeliveryList,
    DeliveryOut,
    ErrorBody,
    Offset,
    PipelineCreated,
    PipelineList,
    PipelineOut,
    PromotionList,
    PromotionOut,
    RollbackRequested,
    RunList,
    RunOut,
    check_storable,
    limit_param,
)
from service.db import pipelines as pipe_db
from service.db.models import Pipeline
from service.pipelines import promotion, scheduler
from service.pipelines.sources import check_pipeline
from service.pipelines.spec import PipelineSpec

router = APIRouter(prefix="/v1/pipelines", tags=["pipelines"])
#: a read of one pipeline, and a mutation of one (operator role)
READ: dict[int | str, dict[str, Any]] = responses(401, 422, 503, s404="no such pipeline")
WRITE: dict[int | str, dict[str, Any]] = responses(401, 403, 422, 503,
                                                   s404="no such pipeline")
#: the body of a create or an update: a pipeline spec (kept as JSON until checked: a
#: hook given without a secret keeps the stored one)
SpecBody = Annotated[dict[str, Any], SchemaOf(PipelineSpec), Body(openapi_examples={
    "nightly": {"summary": "nightly: the newest RLHF checkpoint, promoted when it wins",
                "value": PipelineSpec.model_config["json_schema_extra"]["examples"][0]},
    "fixed_base": {"summary": "a base source too, weekly, no webhooks", "value": {
        "name": "weekly", "job": {
            "name": "weekly", "base_model": "models/sft", "aligned_model": "models/rlhf/latest",
            "reward": {"type": "reward_model", "model": "models/reward",
                       "prompts": "data/reward_prompts.jsonl"},
            "tax": {"budget": 0.05, "tasks": [{"name": "facts", "type": "multiple_choice",
                                               "data": "data/facts_mc.jsonl"}]}},
        "schedule": {"cron": "0 3 * * 1", "missed": "skip"},
        "aligned": {"dir": "models/rlhf", "marker": "COMPLETE"},
        "base": {"dir": "models/sft-nightly"},
        "promote": {"dir": "promoted/weekly", "confidence": 0.9}}}})]


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
        url = hook.get("url") if isinstance(hook, dict) else None
        if isinstance(url, str) and not hook.get("secret") and stored.get(url):
            hook["secret"] = stored[hook["url"]]
        if isinstance(hook, dict):
            hook.pop("has_secret", None)
    check_storable(raw)
    try:
        spec = PipelineSpec.model_validate(raw)
    except ValidationError as exc:
        raise spec_error_from_validation(exc) from None
    check_pipeline(spec, settings)
    return spec


@router.post("", status_code=201, response_model=PipelineCreated, responses={
    **responses(400, 401, 413, 503, s403="role too low, or a folder outside the roots "
                "(`field` names it)"), 409: {"model": ErrorBody, "description": "a pipeline of that name exists"},
    422: {"model": ErrorBody, "description": "invalid spec (`field` names it): cron, time "
          "zone, sources, template"}})
def create_pipeline(spec: SpecBody, caller: Operator, session: SessionDep,
                    settings: SettingsDep):
    """Create a pipeline: a job-spec template, a cron schedule, the aligned checkpoint
    source (and optionally the base), the promote folder, webhooks."""
    hooks = spec.get("webhooks")
    given = {h.get("url") for h in hooks if isinstance(h, dict) and h.get("secret")
             and isinstance(h.get("url"), str)} if isinstance(hooks, list) else set()
    checked = _validated(spec, settings)
    p = pipe_db.create_pipeline(session, checked.model_dump(mode="json"), token_id=caller.id,
                                created_by=caller.name)
    session.commit()
    return PipelineCreated(**_out(p).model_dump(), webhook_secrets={
        h.url: h.secret for h in checked.webhooks if h.url not in given})


@router.get("", response_model=PipelineList, responses=responses(401, 422, 503))
def list_pipelines(_: Viewer, session: SessionDep,
                   limit: Annotated[int, limit_param(1000)] = 100, offset: Offset = 0):
    """Pipelines, by name."""
    rows, total = pipe_db.page_pipelines(session, limit=limit, offset=offset)
    return PipelineList(data=[_out(p) for p in rows], count=total)


@router.get("/{ref}", response_model=PipelineOut, responses=READ)
def get_pipeline(ref: str, _: Viewer, session: SessionDep):
    """By name or id."""
    return _out(pipe_db.get_pipeline(session, ref))


@router.put("/{ref}", response_model=PipelineOut, responses={
    **responses(400, 401, 413, 503, s403="role too low, or a folder outside the roots "
                "(`field` names it)", s404="no such pipeline"),
    409: {"model": ErrorBody, "description": "another pipeline has the new name"},
    422: {"model": ErrorBody, "description": "invalid spec (`field` names it)"}})
def update_pipeline(ref: str, spec: SpecBody, _: Operator, session: SessionDep,
                    settings: SettingsDep):
    """Replace the spec (the name may change); the next run time follows the new schedule."""
    old = pipe_db.get_pipeline(session, ref, lock=True)
    checked = _validated(spec, settings, old=old.spec)
    return _committed(session, pipe_db.update_pipeline(session, ref,
                                                       checked.model_dump(mode="json")))


@router.post("/{ref}/pause", response_model=PipelineOut, responses=WRITE)
def pause_pipeline(ref: str, _: Operator, session: SessionDep):
    """No scheduled run starts while paused (a manual trigger still does)."""
    return _committed(session, pipe_db.set_paused(session, ref, True))


@router.post("/{ref}/resume", response_model=PipelineOut, responses=WRITE)
def resume_pipeline(ref: str, _: Operator, session: SessionDep):
    """Resume from the next scheduled time (the times passed while paused are not run)."""
    return _committed(session, pipe_db.set_paused(session, ref, False))


@router.delete("/{ref}", status_code=204, responses=WRITE)
def delete_pipeline(ref: str, _: Operator, session: SessionDep):
    """Delete the pipeline with its runs, promotions and delivery log (its jobs and
    promoted merges stay)."""
    pipe_db.delete_pipeline(session, ref)
    session.commit()


def _committed(session, p: Pipeline) -> PipelineOut:
    session.commit()
    return _out(p)


@router.post("/{ref}/trigger", status_code=202, response_model=RunOut, responses={
    **WRITE, 409: {"model": ErrorBody, "description": "triggered twice at the same moment"}})
def trigger_run(ref: str, _: Operator, session: SessionDep, settings: SettingsDep):
    """Start a run now (the scheduler picks it up on its next pass, within
    HMAOPT_SCHEDULER_SECONDS). A manual run searches even an already processed checkpoint."""
    run_id = scheduler.Scheduler(settings).trigger(ref)
    return RunOut.model_validate(pipe_db.get_run(session, run_id), from_attributes=True)


@router.get("/{ref}/runs", response_model=RunList, responses=READ)
def list_runs(ref: str, _: Viewer, session: SessionDep,
              limit: Annotated[int, limit_param(1000)] = 100, offset: Offset = 0):
    """Runs, newest first: status, checkpoint, job, reward, tax, gain, decision and reason."""
    p = pipe_db.get_pipeline(session, ref)
    rows, total = pipe_db.page_runs(session, p.id, limit=limit, offset=offset)
    return RunList(data=[RunOut.model_validate(r, from_attributes=True) for r in rows],
                   count=total)


@router.get("/{ref}/runs/{run_id}", response_model=RunOut, responses=responses(
    401, 422, 503, s404="no such pipeline, or no such run of it"))
def get_run(ref: str, run_id: str, _: Viewer, session: SessionDep):
    return RunOut.model_validate(pipe_db.get_pipeline_run(session, ref, run_id),
                                 from_attributes=True)


@router.get("/{ref}/promotions", response_model=PromotionList, responses=READ)
def list_promotions(ref: str, _: Viewer, session: SessionDep,
                    limit: Annotated[int, limit_param(1000)] = 100, offset: Offset = 0):
    """The alias's history, newest first."""
    p = pipe_db.get_pipeline(session, ref)
    rows, total = pipe_db.page_promotions(session, p.id, limit=limit, offset=offset)
    return PromotionList(data=[PromotionOut.model_validate(r, from_attributes=True)
                               for r in rows], count=total)


@router.post("/{ref}/rollback", status_code=202, response_model=RollbackRequested,
             responses={**WRITE, 409: {"model": ErrorBody, "description": "no earlier "
                                       "champion, or its merge is gone"}})
def rollback(ref: str, _: Operator, settings: SettingsDep):
    """Switch `current` back to the champion before the current one: the scheduler does it
    on its next pass (it writes the promote folders); follow `champion_run_id`."""
    return promotion.request_rollback(settings, ref)


@router.get("/{ref}/deliveries", response_model=DeliveryList, responses=READ)
def list_deliveries(ref: str, _: Viewer, session: SessionDep,
                    limit: Annotated[int, limit_param(1000)] = 100, offset: Offset = 0):
    """The webhook delivery log, newest first."""
    p = pipe_db.get_pipeline(session, ref)
    rows, total = pipe_db.page_deliveries(session, p.id, limit=limit, offset=offset)
    return DeliveryList(data=[DeliveryOut.model_validate(r, from_attributes=True)
                              for r in rows], count=total)
