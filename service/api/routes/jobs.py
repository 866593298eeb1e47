"""/v1/jobs: submit, list, inspect, cancel, trials, best, pareto, events, export."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Annotated, Literal

from fastapi import APIRouter, Body, Depends, Header, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.sse import EventSourceResponse, ServerSentEvent

from service import queue
from service.admission import admit_job
from service.api.deps import Operator, SessionDep, SettingsDep, StreamViewer, Viewer
from service.api.errors import responses
from service.api.schemas import (MAX_OFFSET, ErrorBody, ExportRequest, ExportState, JobDetail,
                                 JobList, Offset, TrialList, TrialPoints,
                                 TrialPublic, check_storable, job_summary, limit_param,
                                 text_param, trial_public)
from service.db import jobs as job_db
from service.db import session_scope
from service.errors import DependencyUnavailableError
from service.paths import resolve_path
from service.spec import JobSpec
from service.status import TERMINAL, ExportStatus, JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
log = logging.getLogger(__name__)

#: what every read of one job can answer besides its own
READ = responses(401, 422, 503, s404="no such job")
#: and a mutation (operator role)
WRITE = responses(401, 403, 422, 503, s404="no such job")
TRIAL_KINDS = Literal["uniform", "warm", "gradient", "search", "walk"]
#: named examples of a submission (the OpenAPI's; paths relative to the server's roots)
SUBMIT_EXAMPLES = {
    "reward_model": {"summary": "reward model, three tax tasks, TPE",
                     "value": JobSpec.model_config["json_schema_extra"]["examples"][0]},
    "minimal": {"summary": "the fewest fields: defaults for groups and search", "value": {
        "name": "minimal", "base_model": "models/base", "aligned_model": "models/aligned",
        "reward": {"type": "reward_model", "model": "models/reward",
                   "prompts": "data/reward_prompts.jsonl"},
        "tax": {"budget": 0.05, "tasks": [
            {"name": "facts", "type": "multiple_choice", "data": "data/facts_mc.jsonl"}]}}},
    "pareto_lm_eval": {"summary": "pareto mode, an lm-eval task, 2 workers", "value": {
        "name": "pareto", "base_model": "models/base", "aligned_model": "models/aligned",
        "groups": {"scheme": "layers"}, "mode": "pareto",
        "reward": {"type": "reward_model", "model": "models/reward",
                   "prompts": "data/reward_prompts.jsonl"},
        "tax": {"budget": 0.1, "tasks": [
            {"name": "arc", "type": "lm_eval", "data": "data/arc_easy.yaml"}]},
        "search": {"n_trials": 64, "workers": 2, "sampler": "nsga2"}}},
}
#: seconds an events stream waits on Redis before a keep-alive comment
EVENTS_BLOCK_SECONDS = 15


@router.post("", status_code=201, response_model=JobDetail, responses={
    **responses(400, 401, 413, 503, s403="role too low, a path outside the roots, or a "
                "setting refuses the spec (`field` names it)"),
    200: {"model": JobDetail, "description": "same Idempotency-Key: the job "
                    "submitted before"},
    202: {"model": JobDetail, "description": "created and stored, but Redis is unreachable: "
          "`enqueue_deferred` is true and the job is enqueued once Redis is back (it was "
          "created: do not submit it again)"},
    409: {"model": ErrorBody, "description": "Idempotency-Key reused with another spec"},
    422: {"model": ErrorBody, "description": "invalid spec; `field` names the field"},
    503: {"model": ErrorBody, "description": "database unavailable (no job was created)"}})
def submit_job(spec: Annotated[JobSpec, Body(openapi_examples=SUBMIT_EXAMPLES)],
               caller: Operator, session: SessionDep, settings: SettingsDep, response: Response,
               idempotency_key: Annotated[str, Header(
                   max_length=200, description="resubmitting with the same key returns the "
                   "first job instead of a new one")] = None):
    """Submit a merge-search job (the job-spec schema of the CLI file). Relative paths
    resolve against the server's roots (HMAOPT_MODEL_ROOTS, HMAOPT_DATA_ROOTS). The job is
    stored before Redis hears of it: while Redis is unreachable the answer is 202 with
    ``enqueue_deferred`` true, and the job reaches a worker once Redis is back."""
    check_storable(spec.model_dump(mode="json"))
    resolved = admit_job(spec, settings)  # paths, checkpoints, data: service/admission.py
    job, created = job_db.create_job(
        session, resolved.model_dump(mode="json"), n_trials=spec.search.n_trials,
        parallel=spec.search.workers, token_id=caller.id, submitted_by=caller.name,
        idempotency_key=idempotency_key)
    session.commit()  # the row is the truth: it exists before Redis hears of it
    deferred = False
    if created:
        try:
            queue.enqueue_runs(settings, job.id, job.parallel)
        except DependencyUnavailableError as exc:  # stored: the reconcile enqueues it later
            log.warning("job %s stored; not enqueued now (%s): the reconcile enqueues it when "
                        "Redis is back", job.id, exc)
            deferred, response.status_code = True, 202
        queue.publish(settings, job.id, "status", {"status": JobStatus.QUEUED.value})
        session.refresh(job)
    else:
        response.status_code = 200
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    detail = job_summary(job, detail=True)
    detail.enqueue_deferred = deferred
    return detail


@router.get("", response_model=JobList, responses=responses(401, 422, 503))
def list_jobs(_: Viewer, session: SessionDep,
              status: Annotated[list[JobStatus] | None, Query(description="repeatable")] = None,
              name: Annotated[str, text_param("exact job name")] = None,
              q: Annotated[str, text_param("text in name, id or submitter")] = None,
              limit: Annotated[int, limit_param(500)] = 50, offset: Offset = 0):
    """Jobs, newest first."""
    rows, total = job_db.list_jobs(session, status=[s.value for s in status or []], name=name,
                                   q=q, limit=limit, offset=offset)
    return JobList(data=[job_summary(j) for j in rows], count=total)


@router.get("/{job_id}", response_model=JobDetail, responses=READ)
def get_job(job_id: str, _: Viewer, session: SessionDep):
    """Status, progress, best so far, the uniform baseline and the gain over it."""
    return job_summary(job_db.get_job(session, job_id), detail=True)


@router.post("/{job_id}/cancel", response_model=JobDetail, responses={
    **WRITE, 409: {"model": ErrorBody, "description": "the job has already finished"}})
def cancel_job(job_id: str, _: Operator, session: SessionDep, settings: SettingsDep):
    """Cancel: a queued job at once; a running one within seconds (its worker stops at the
    next evaluation batch). ``cancel_requested`` is true until the status says cancelled."""
    job = job_db.request_cancel(session, job_id)
    session.commit()
    queue.set_cancel_flag(settings, job_id)
    if job.status == JobStatus.CANCELLED:
        queue.publish(settings, job_id, "status", {"status": JobStatus.CANCELLED.value})
    return job_summary(job, detail=True)


@router.get("/{job_id}/trials", response_model=TrialList, responses=READ)
def list_trials(job_id: str, _: Viewer, session: SessionDep,
                sort: Literal["number", "reward", "tax", "eval_seconds", "merge_seconds"] = "number",
                order: Literal["asc", "desc"] = "asc",
                kind: TRIAL_KINDS | None = None,
                feasible: bool | None = None,
                limit: Annotated[int, limit_param(1000)] = 100, offset: Offset = 0):
    """Finished trials (complete or pruned), paged and sorted."""
    rows, total = job_db.list_trials(session, job_id, sort=sort, desc=order == "desc",
                                     kind=kind, feasible=feasible, limit=limit, offset=offset)
    return TrialList(data=[trial_public(t) for t in rows], count=total)


@router.get("/{job_id}/points", response_model=TrialPoints, responses=READ)
def trial_points(job_id: str, _: Viewer, session: SessionDep, settings: SettingsDep):
    """Every finished trial in columns (no ratios, no metrics): what a reward-tax figure of
    a large study needs in one small response. Reward and tax to 6 significant digits.
    ``cursor``: the job's event-stream position read before the trials, so that
    ``events?since=cursor`` then brings every later trial and no earlier one twice over
    (null when Redis cannot be reached: follow the events from their start)."""
    job_db.get_job(session, job_id)
    try:
        cursor = queue.stream_position(settings, job_id)
    except DependencyUnavailableError:
        cursor = None
    rows = job_db.trial_points(session, job_id)
    cols = list(zip(*rows)) if rows else [()] * 9
    return TrialPoints(count=len(rows), cursor=cursor, number=cols[0], kind=cols[1], state=cols[2],
                       feasible=cols[3], reward=[_round(v) for v in cols[4]],
                       tax=[_round(v) for v in cols[5]], uniform_ratio=cols[6],
                       reward_se=[_round(v) for v in cols[7]],
                       tax_se=[_round(v) for v in cols[8]])


def _round(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.6g}")


@router.get("/{job_id}/trials/{number}", response_model=TrialPublic, responses=responses(
    401, 422, 503, s404="no such job, or no such finished trial"))
def get_trial(job_id: str, number: Annotated[int, Path(ge=0, le=MAX_OFFSET)], _: Viewer,
              session: SessionDep):
    """One finished trial: ratios, reward, tax, per-task metrics, timings."""
    return trial_public(job_db.get_trial(session, job_id, number))


@router.get("/{job_id}/best", response_model=TrialPublic, responses=responses(
    401, 422, 503, s404="no such job, or no feasible trial yet"))
def best_trial(job_id: str, _: Viewer, session: SessionDep):
    """The feasible trial (tax <= budget) of highest reward so far."""
    return trial_public(job_db.best_trial(session, job_id))


@router.get("/{job_id}/pareto", response_model=TrialList, responses=READ,
            operation_id="pareto_front")
def pareto(job_id: str, _: Viewer, session: SessionDep):
    """Feasible trials not dominated in (higher reward, lower tax), by tax."""
    rows = job_db.pareto_trials(session, job_id)
    return TrialList(data=[trial_public(t) for t in rows], count=len(rows))


@router.post("/{job_id}/export", status_code=202, response_model=ExportState,
             operation_id="export_job", responses={
    **responses(400, 401, 413, 503, s403="role too low, or the folder is outside the model "
                "roots (`field` dir)", s404="no such job"),
    409: {"model": ErrorBody, "description": "no feasible trial, or an export is already "
          "running"},
    422: {"model": ErrorBody, "description": "no dir given and the spec has no export.dir, "
          "or an invalid body (`field` names it)"}})
def export(job_id: str, _: Operator, session: SessionDep, settings: SettingsDep,
           body: ExportRequest | None = None):
    """Materialise the best merge as a Hugging Face checkpoint with hma_manifest.json (a
    worker does it; follow ``export`` in GET /v1/jobs/{id} or the events)."""
    from service.errors import SpecError

    body = body or ExportRequest()
    job = job_db.get_job(session, job_id, lock=True)
    raw = body.dir or (job.spec.get("export") or {}).get("dir")
    if raw is None:
        raise SpecError("give a dir (the spec has no export.dir)", field="dir")
    out = resolve_path("export.dir", raw, settings.model_roots, must_exist=False)
    queue.request_export(settings, session, job, out, overwrite=body.overwrite)
    session.commit()
    return ExportState(status=ExportStatus.QUEUED, dir=out, error=None)


#: an event-stream id (Redis stream ids, e.g. 1763800000000-0; 0 is the start)
STREAM_ID = r"^(0|[0-9]+-[0-9]+)$"


def _events_start(job_id: str, settings: SettingsDep,
                  last_event_id: Annotated[str, Header(
                      alias="Last-Event-ID", pattern=STREAM_ID, description="the id of the "
                      "last event received (a reconnecting EventSource sends it)")] = None,
                  since: Annotated[str, Query(
                      pattern=STREAM_ID, description="stream id to start after (as "
                      "Last-Event-ID), e.g. 1763800000000-0; default: the start")] = None
                  ) -> dict:
    """Checks made before the stream opens, so that they get a proper status code."""
    cursor = last_event_id or since
    with session_scope(settings.database()) as s:
        snapshot = job_summary(job_db.get_job(s, job_id)).model_dump(mode="json")
    queue.redis_client(queue.redis_url(settings)).ping()  # 503 now, not a broken stream
    return {"snapshot": snapshot, "cursor": cursor}


@router.get("/{job_id}/events", response_class=EventSourceResponse, operation_id="job_events",
            responses=responses(401, 503, s404="no such job", s422="malformed Last-Event-ID "
                                "or since (`field` names it)", sse=True))
async def events(job_id: str, request: Request, _: StreamViewer, settings: SettingsDep,
                 start: Annotated[dict, Depends(_events_start)]):
    """Server-sent events: ``job`` (a snapshot, first), ``status`` (status changes),
    ``trial`` (each finished trial with the job's progress), ``export``, ``worker_lost``.
    Each event's id is its stream id: reconnecting with Last-Event-ID (or ``since``) resumes
    after it. The stream ends after a final status."""
    import redis.asyncio as aioredis

    def load():
        with session_scope(settings.database()) as s:
            return job_summary(job_db.get_job(s, job_id)).model_dump(mode="json")

    snapshot, cursor = start["snapshot"], start["cursor"]
    yield ServerSentEvent(event="job", data=snapshot, retry=3000)
    if JobStatus(snapshot["status"]) in TERMINAL and cursor is None:
        return
    cursor = cursor or "0"
    conn = aioredis.Redis.from_url(queue.redis_url(settings),
                                   socket_timeout=EVENTS_BLOCK_SECONDS + 15)
    try:
        while not await request.is_disconnected():
            found = await conn.xread({queue.Keys.events(job_id): cursor}, count=100,
                                     block=EVENTS_BLOCK_SECONDS * 1000)
            if not found:
                status = (await run_in_threadpool(load))["status"]
                if JobStatus(status) in TERMINAL:
                    return
                yield ServerSentEvent(comment="keep-alive")
                continue
            for _key, entries in found:
                for entry_id, fields in entries:
                    cursor = entry_id.decode()
                    kind = fields[b"type"].decode()
                    data = json.loads(fields[b"data"])
                    yield ServerSentEvent(event=kind, data=data, id=cursor)
                    if kind == "status" and JobStatus(data["status"]) in TERMINAL:
                        return
            await asyncio.sleep(0)
    finally:
        await conn.aclose()
