"""The commands that talk to an hmaopt server over REST: ``hmaopt submit`` and
``hmaopt pipeline create|list|trigger|runs|rollback`` (``hmaopt jobs`` is in jobs.py).
Errors exit with their group's code like everywhere (service/errors.py, ``ExitCode``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from service.cli.helpers import (add_command, add_group, add_progress_flag, follow_job,
                                 poll_until, read_spec_for_submit, report, show_progress)
from service.cli.output import add_json_flag, emit, note, wants_json
from service.client import Client
from service.errors import JobFailedError, NoFeasibleMergeError, NoResultError, SpecError
from service.settings import get_settings
from service.status import PipelineRunStatus


def add_client_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--server", default=None,
                        help="server URL (default HMAOPT_SERVER_URL, http://127.0.0.1:8000)")
    parser.add_argument("--token", default=None, help="API token (default HMAOPT_TOKEN)")
    return parser


def client_for(args: argparse.Namespace) -> Client:
    settings = get_settings()
    return Client(args.server or settings.server_url, args.token or settings.token)


#: how a browser gets in: the dashboard asks for an API token once
SIGN_IN = "the page asks for an API token once: the one this command used (--token or " \
    "HMAOPT_TOKEN), or a viewer token from `hmaopt token create --role viewer` on the server"


def print_dashboard(client: Client, job_id: str, sign_in: str = SIGN_IN) -> None:
    """Where a person watches the job: its dashboard page and how to sign in (stderr)."""
    note(f"dashboard: {client.dashboard_url(job_id)}\n  ({sign_in})")


def add_submit(sub) -> None:
    submit = add_command(sub, "submit", submit_command,
                         help="submit a job spec to an hmaopt server")
    submit.add_argument("spec", help="job spec file (YAML or JSON)")
    submit.add_argument("--wait", action="store_true", help="follow the job to its end")
    add_client_args(submit)
    add_json_flag(submit)
    submit.add_argument("--server-paths", action="store_true",
                        help="send paths as written, to resolve in the server's roots")
    submit.add_argument("--idempotency-key", default=None,
                        help="resubmitting with the same key returns the first job")
    add_progress_flag(submit)


def add_pipeline(sub) -> None:
    pipe = add_group(sub, "pipeline", help="nightly merge pipelines on an hmaopt server",
                     description="Manage pipelines over the REST API (--server, --token as for "
                     "submit).")

    def command(name, handler, help):
        return add_json_flag(add_client_args(add_command(pipe, name, handler, help=help)))

    create = command("create", pipeline_create_command, "create a pipeline from a spec file")
    create.add_argument("spec", help="pipeline spec file (YAML or JSON); paths are the server's")
    command("list", pipeline_list_command, "pipelines, their schedule and champion")
    trigger = command("trigger", pipeline_trigger_command, "start a run now")
    trigger.add_argument("name")
    trigger.add_argument("--wait", action="store_true", help="follow the run to its end")
    trigger.add_argument("--timeout", type=float, default=24 * 3600, help="give up after (s)")
    runs = command("runs", pipeline_runs_command, "a pipeline's runs, newest first")
    runs.add_argument("name")
    rollback = command("rollback", pipeline_rollback_command,
                       "switch `current` back to the previous champion")
    rollback.add_argument("name")
    rollback.add_argument("--timeout", type=float, default=120,
                          help="seconds to wait for the scheduler to switch the alias")


def submit_command(args: argparse.Namespace) -> int:
    """Submit a job over the REST API and print its id (--json: the job) and its dashboard
    page. Relative paths in the spec resolve against the spec's folder (--server-paths: sent
    as written, resolved in the server's roots). With --wait, follow it: exit 0 when a
    feasible merge was found, 10 when none was, 11 when the job failed, 12 when it was
    cancelled; errors exit with their group's code (2 invalid spec, 5 token, 6 server
    unreachable: the README's table)."""
    spec = read_spec_for_submit(args.spec, args.server_paths)
    with client_for(args) as client:
        job = client.submit(spec, idempotency_key=args.idempotency_key)
        note(f"job {job['id']} {job['status']}")
        print_dashboard(client, job["id"])
        if not args.wait:
            emit(args, job, job["id"])
            return 0
        return report(follow_job(client, job, progress=show_progress(args)),
                      as_json=wants_json(args))


def pipeline_create_command(args: argparse.Namespace) -> int:
    try:
        raw = yaml.safe_load(Path(args.spec).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError(f"cannot read the pipeline spec {args.spec}: {exc}") from None
    with client_for(args) as client:
        p = client.request("POST", "/v1/pipelines", json=raw)
    note(f"pipeline {p['name']} ({p['id']}): next run {p['next_due_at']}")
    if not wants_json(args):
        for url, secret in p.get("webhook_secrets", {}).items():  # shown once: keep it
            note(f"webhook secret for {url} (shown once): {secret}")
    emit(args, p, p["name"])
    return 0


def pipeline_list_command(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        page = client.request("GET", "/v1/pipelines")
    rows = page["data"]

    def text() -> str:
        out = []
        for p in rows:
            sched = p["spec"]["schedule"]
            out.append(f"{p['name']:<24} {'paused' if p['paused'] else 'active':<7} "
                       f"{sched['cron']} {sched['timezone']:<16} next {p['next_due_at']}  "
                       f"champion {p['champion_run_id'] or '-'}")
        return "\n".join(out)
    emit(args, page, text if rows else None)
    if not rows and not wants_json(args):
        note("no pipelines")
    return 0


def _run_line(r: dict) -> str:
    fig = (f"reward {r['reward']:.4g} tax {r['tax']:.4g}" if r["reward"] is not None else "")
    return (f"{r['id']} {r['scheduled_for']} {r['trigger']:<8} {r['status']:<9} "
            f"{r['decision'] or '':<8} {fig} {r['reason'] or ''}").rstrip()


def pipeline_trigger_command(args: argparse.Namespace) -> int:
    """Start a run now. Exit code with --wait: 0 when the run's search found a feasible merge
    (promoted or not: the output says), 10 when none was feasible, 11 when the run failed,
    12 when it was skipped (nothing to search); errors exit with their group's code."""
    with client_for(args) as client:
        run = client.request("POST", f"/v1/pipelines/{args.name}/trigger")
        note(f"run {run['id']} of pipeline {args.name} started")
        if not args.wait:
            emit(args, run, run["id"])
            return 0
        run = poll_until(
            lambda: client.request("GET", f"/v1/pipelines/{args.name}/runs/{run['id']}"),
            lambda r: PipelineRunStatus(r["status"]).done, first=run,
            timeout=args.timeout, every=2,
            late=lambda r: f"run {r['id']} still {r['status']} after {args.timeout:.0f} s (is "
            "a scheduler running? `hmaopt scheduler`, or the embedded `hmaopt serve`)")
    promoted = run["status"] == PipelineRunStatus.SUCCEEDED and run["reward"] is not None
    emit(args, run, lambda: _run_line(run) + ("\npromoted: " + (
        run["promoted_dir"] if run["decision"] == "promoted" else f"no ({run['reason']})")
        if promoted else ""))
    what = f"run {run['id']} of pipeline {args.name}"
    if run["status"] == PipelineRunStatus.FAILED:
        raise JobFailedError(f"{what} failed: {run['reason'] or 'no reason given'}")
    if run["status"] == PipelineRunStatus.SKIPPED:
        raise NoResultError(f"{what} was skipped: {run['reason'] or 'no reason given'}")
    if run["reward"] is None:
        raise NoFeasibleMergeError(f"{what}: its search (job {run['job_id']}) found no merge "
                                   f"within the tax budget ({run['reason'] or 'no reason given'})")
    return 0


def pipeline_runs_command(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        page = client.request("GET", f"/v1/pipelines/{args.name}/runs")
    emit(args, page, "\n".join(_run_line(r) for r in page["data"]) if page["data"] else None)
    return 0


def pipeline_rollback_command(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        out = client.request("POST", f"/v1/pipelines/{args.name}/rollback")
        poll_until(
            lambda: client.request("GET", f"/v1/pipelines/{args.name}"),
            lambda p: p["champion_run_id"] == out["champion_run"], first=None,
            timeout=args.timeout, every=1,
            late=lambda _: f"the rollback of {args.name} is requested but not done after "
            f"{args.timeout:.0f} s: is a scheduler running? (`hmaopt scheduler`, or the "
            "embedded `hmaopt serve`)")
    emit(args, out, f"pipeline {out['pipeline']}: current -> {out['dir']} (run "
         f"{out['champion_run']}, replacing run {out['replaced_run']})")
    return 0
