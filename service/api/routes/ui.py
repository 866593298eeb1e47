"""The team dashboard, served by the API process itself (``/`` and ``/ui/...``).

Server-rendered pages (Jinja2, autoescaped), no CDN: every asset ships in the package.
Sign-in takes an API token and keeps it in an HttpOnly, SameSite=Strict cookie beside a CSRF
cookie; every cookie-authenticated mutation must repeat the CSRF value (deps.request_token).
"""

from __future__ import annotations

import functools
import gzip
import json
import secrets
from pathlib import Path
from typing import Annotated
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from service.api.deps import (CSRF_COOKIE, SESSION_COOKIE, SessionDep, SettingsDep,
                              request_token)
from service.api.schemas import job_summary
from service.db import jobs as job_db
from service.db import tokens as token_db
from service.errors import AuthenticationError, HmaoptError, NotFoundError
from service.status import JobStatus, Role

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).parent.parent / "templates")
#: jobs per page of the jobs list
PAGE_SIZE = 25
#: seconds a dashboard sign-in lasts
SESSION_SECONDS = 12 * 3600


def _signed_in(request: Request, session):
    """The token row of the signed-in browser, or None."""
    token = request.cookies.get(SESSION_COOKIE)
    if token is None:
        return None
    try:
        return token_db.authenticate(session, token)
    except AuthenticationError:
        return None


def _render(request: Request, name: str, caller, status_code: int = 200, **context):
    return templates.TemplateResponse(request, name, {
        "caller": caller, "csrf": request.cookies.get(CSRF_COOKIE, ""),
        "can_operate": caller is not None and Role(caller.role).allows(Role.OPERATOR),
        **context}, status_code=status_code)


@router.get("/")
def home() -> RedirectResponse:
    return RedirectResponse("/ui/jobs", status_code=303)


@router.get("/ui/signin", response_class=HTMLResponse)
def signin_form(request: Request, session: SessionDep, next: str = "/ui/jobs"):
    return _render(request, "signin.html", _signed_in(request, session), next=_local(next),
                   error=None)


@router.post("/ui/signin", response_class=HTMLResponse)
async def signin(request: Request, settings: SettingsDep) -> Response:
    from fastapi.concurrency import run_in_threadpool

    from service.db import session_scope

    form = parse_qs((await request.body()).decode(errors="replace"))
    token = (form.get("token") or [""])[0].strip()
    target = _local((form.get("next") or ["/ui/jobs"])[0])

    def check():
        with session_scope(settings.database()) as s:
            return token_db.authenticate(s, token)

    try:
        row = await run_in_threadpool(check)
    except HmaoptError:
        return _render(request, "signin.html", None, status_code=401, next=target,
                       error="Unknown or revoked token.")
    response = RedirectResponse(target, status_code=303)
    secure = request.url.scheme == "https"
    response.set_cookie(SESSION_COOKIE, token, max_age=SESSION_SECONDS, httponly=True,
                        samesite="strict", secure=secure, path="/")
    response.set_cookie(CSRF_COOKIE, secrets.token_urlsafe(24), max_age=SESSION_SECONDS,
                        httponly=False, samesite="strict", secure=secure, path="/")
    response.headers["X-Signed-In-As"] = f"{row.name} ({row.role})"
    return response


@router.post("/ui/signout")
async def signout(request: Request) -> Response:
    form = parse_qs((await request.body()).decode(errors="replace"))
    request_token(request, None, form_csrf=(form.get("csrf") or [None])[0])  # CSRF check
    response = RedirectResponse("/ui/signin", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    response.delete_cookie(CSRF_COOKIE, path="/")
    return response


@router.get("/ui/jobs", response_class=HTMLResponse)
def jobs_page(request: Request, session: SessionDep,
              status: Annotated[list[JobStatus] | None, Query()] = None,
              q: str | None = None, page: Annotated[int, Query(ge=1)] = 1) -> Response:
    caller = _signed_in(request, session)
    if caller is None:
        return _to_signin(request)
    rows, total = job_db.list_jobs(session, status=[s.value for s in status or []], q=q,
                                   limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
    pages = max(1, -(-total // PAGE_SIZE))
    query = {"q": q or "", "status": [s.value for s in status or []]}
    return _render(request, "jobs.html", caller, jobs=[job_summary(j) for j in rows],
                   total=total, page=page, pages=pages, q=q or "",
                   statuses=[s.value for s in JobStatus],
                   selected={s.value for s in status or []},
                   prev_url=_page_url(query, page - 1) if page > 1 else None,
                   next_url=_page_url(query, page + 1) if page < pages else None)


@router.get("/ui/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: str, request: Request, session: SessionDep) -> Response:
    """The live job page: figures and table are drawn by static/job.js from the REST API and
    kept current over the job's server-sent events."""
    caller = _signed_in(request, session)
    if caller is None:
        return _to_signin(request)
    job = job_summary(job_db.get_job(session, job_id), detail=True)
    return _render(request, "job.html", caller, job=job)


@router.get("/ui/jobs/{job_id}/answer", response_class=HTMLResponse)
def job_answer(job_id: str, request: Request, session: SessionDep) -> Response:
    """The job page's flags banner and held-out panel alone (answer.html, the same markup
    the page renders): static/job.js swaps them in when the job ends."""
    caller = _signed_in(request, session)
    if caller is None:
        return _to_signin(request)
    job = job_summary(job_db.get_job(session, job_id), detail=True)
    return _render(request, "job_answer.html", caller, job=job)


#: one colour per compared job (table swatch and every figure)
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b",
          "#e377c2")
#: the most jobs one comparison shows
COMPARE_MAX = 8


@router.get("/ui/compare", response_class=HTMLResponse)
def compare_page(request: Request, session: SessionDep,
                 jobs: Annotated[list[str] | None, Query()] = None) -> Response:
    """Two or more jobs overlaid; the address (``?jobs=ID&jobs=ID``) is the share link."""
    caller = _signed_in(request, session)
    if caller is None:
        return _to_signin(request)
    ids = list(dict.fromkeys(i.strip() for raw in jobs or [] for i in raw.split(",")
                             if i.strip()))[:COMPARE_MAX]
    found, missing = [], []
    for job_id in ids:
        try:
            found.append(job_summary(job_db.get_job(session, job_id), detail=True))
        except NotFoundError:
            missing.append(job_id)
    recent, _ = job_db.list_jobs(session, limit=50)
    picked = {j.id for j in found}
    figures = [{"id": j.id, "name": j.name, "budget": j.budget, "color": COLORS[i % len(COLORS)],
                "layout": j.layout, "best_ratios": j.best.ratios if j.best else None,
                "best": j.best.model_dump(exclude={"ratios"}) if j.best else None}
               for i, j in enumerate(found)]
    without = {j.id: "/ui/compare?" + urlencode({"jobs": [k.id for k in found if k is not j]},
                                                doseq=True) for j in found}
    return _render(request, "compare.html", caller, jobs=found, missing=missing,
                   others=[job_summary(j) for j in recent if j.id not in picked],
                   figures=figures, colors=COLORS, without=without,
                   differences=spec_differences([j.spec for j in found]))


#: spec fields the compare page never lists as a difference (shown elsewhere on the page)
SAME_BY_DESIGN = ("name",)


def spec_differences(specs: list[dict]) -> list[dict]:
    """The spec fields whose values differ between the jobs, as rows ``{"field": dotted
    path, "values": one text per job}`` (nested fields flattened: ``search.sampler``,
    ``tax.tasks[0].data``; "—" where a field is unset or a job's spec lacks it)."""
    if len(specs) < 2:
        return []
    flat = [_flatten(spec) for spec in specs]
    fields = list(dict.fromkeys(k for f in flat for k in f))
    rows = []
    for field in fields:
        values = [f.get(field, "—") for f in flat]
        if field not in SAME_BY_DESIGN and len(set(values)) > 1:
            rows.append({"field": field, "values": values})
    return rows


def _flatten(value, prefix: str = "") -> dict[str, str]:
    """A spec as {dotted path: text}: dicts and lists of dicts are walked, scalars and
    lists of scalars written as JSON (strings as they are, None as "—")."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        out = {}
        for i, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}[{i}]"))
        return out
    if value is None:
        return {prefix: "—"}
    return {prefix: value if isinstance(value, str) else json.dumps(value)}


@router.get("/ui/pipelines", response_class=HTMLResponse)
def pipelines_page(request: Request, session: SessionDep) -> Response:
    """Every pipeline: schedule, next run, champion, its latest run."""
    from service.db import pipelines as pipe_db

    caller = _signed_in(request, session)
    if caller is None:
        return _to_signin(request)
    rows = []
    for p in pipe_db.list_pipelines(session):
        latest = pipe_db.list_runs(session, p.id, limit=1)
        rows.append({"p": p, "latest": latest[0] if latest else None})
    return _render(request, "pipelines.html", caller, pipelines=rows)


@router.get("/ui/pipelines/{ref}", response_class=HTMLResponse)
def pipeline_page(ref: str, request: Request, session: SessionDep) -> Response:
    """One pipeline's runs over time: reward, tax, gain over uniform, promotion decision."""
    from service.db import pipelines as pipe_db
    from service.pipelines.spec import PipelineSpec

    caller = _signed_in(request, session)
    if caller is None:
        return _to_signin(request)
    p = pipe_db.get_pipeline(session, ref)
    runs = pipe_db.list_runs(session, p.id, limit=500)
    series = [{"id": r.id, "at": r.scheduled_for.isoformat(), "status": r.status,
               "decision": r.decision, "reward": r.reward, "tax": r.tax, "gain": r.gain,
               "holdout_tax": r.holdout_tax, "champion_reward": r.champion_reward,
               "reason": r.reason} for r in reversed(runs)]
    spec = PipelineSpec.model_validate(p.spec)
    return _render(request, "pipeline.html", caller, p=p, runs=runs, series=series,
                   budget=spec.job.tax.budget, public=spec.public(),
                   promotions=pipe_db.list_promotions(session, p.id)[:20])


@router.get("/ui/vendor/plotly.min.js")
def plotly_js(request: Request) -> Response:
    """plotly.js from the plotly Python package (no CDN), gzip-compressed once per process:
    4.8 MB becomes about 1.4 MB on the wire."""
    body, etag = _plotly_gzip()
    headers = {"Cache-Control": "public, max-age=86400", "ETag": etag, "Vary": "Accept-Encoding"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    if "gzip" in request.headers.get("accept-encoding", ""):
        return Response(body, media_type="text/javascript",
                        headers={**headers, "Content-Encoding": "gzip"})
    return Response(gzip.decompress(body), media_type="text/javascript", headers=headers)


@functools.cache
def _plotly_gzip() -> tuple[bytes, str]:
    import plotly

    raw = (Path(plotly.__file__).parent / "package_data" / "plotly.min.js").read_bytes()
    return gzip.compress(raw, compresslevel=9, mtime=0), f'"plotly-{plotly.__version__}"'


def _page_url(query: dict, page: int) -> str:
    return "/ui/jobs?" + urlencode({**query, "page": page}, doseq=True)


def _to_signin(request: Request) -> RedirectResponse:
    return RedirectResponse("/ui/signin?" + urlencode({"next": _here(request)}), status_code=303)


def _here(request: Request) -> str:
    """This page's local address with its query, to come back to after sign-in."""
    query = request.url.query
    return request.url.path + ("?" + query if query else "")


def _local(target: str) -> str:
    """Only local redirects after sign-in (no open redirect)."""
    return target if target.startswith("/") and not target.startswith("//") else "/ui/jobs"
