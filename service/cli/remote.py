"""The commands that talk to an hmaopt server over REST: ``hmaopt submit`` and
``hmaopt pipeline create|list|trigger|runs|rollback``.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from service.cli.helpers import (add_command, add_group, add_progress_flag, follow_job,
                                 print_error, read_spec_for_submit, report, show_progress)
from service.client import Client
from service.errors import DependencyUnavailableError, HmaoptError, SpecError
from service.settings import get_settings
from service.status import PipelineRunStatus


def _add_client_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--server", default=None,
                        help="server URL (default HMAOPT_SERVER_URL, http://127.0.0.1:8000)")
    parser.add_argument("--token", default=None, help="API token (default HMAOPT_TOKEN)")
    return parser


def _client(args: argparse.Namespace) -> Client:
    settings = get_settings()
    return Client(args.server or settings.server_url, args.token or settings.token)


def _errors_exit_1(command: Callable[[argparse.Namespace], int]):
    """Print any HmaoptError and exit 1: in these commands 2 means "none feasible" only."""
    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except HmaoptError as exc:
            print_error(exc)
            return 1
    return run


def add_submit(sub) -> None:
    submit = add_command(sub, "submit", submit_command,
                         help="submit a job spec to an hmaopt server")
    submit.add_argument("spec", help="job spec file (YAML or JSON)")
    submit.add_argument("--wait", action="store_true", help="follow the job to its end")
    _add_client_args(submit)
    submit.add_argument("--server-paths", action="store_true",
                        help="send paths as written, to resolve in the server's roots")
    submit.add_argument("--idempotency-key", default=None,
                        help="resubmitting with the same key returns the first job")
    add_progress_flag(submit)


def add_pipeline(sub) -> None:
    pipe = add_group(sub, "pipeline", help="nightly merge pipelines on an hmaopt server",
                     description="Manage pipelines over the REST API (--server, --token as for "
                     "submit).")
    create = _add_client_args(add_command(pipe, "create", pipeline_create_command,
                                          help="create a pipeline from a spec file"))
    create.add_argument("spec", help="pipeline spec file (YAML or JSON); paths are the server's")
    _add_client_args(add_command(pipe, "list", pipeline_list_command,
                                 help="pipelines, their schedule and champion"))
    trigger = _add_client_args(add_command(pipe, "trigger", pipeline_trigger_command,
                                           help="start a run now"))
    trigger.add_argument("name")
    trigger.add_argument("--wait", action="store_true", help="follow the run to its end")
    trigger.add_argument("--timeout", type=float, default=24 * 3600, help="give up after (s)")
    runs = _add_client_args(add_command(pipe, "runs", pipeline_runs_command,
                                        help="a pipeline's runs, newest first"))
    runs.add_argument("name")
    rollback = _add_client_args(add_command(pipe, "rollback", pipeline_rollback_command,
                                            help="switch `current` back to the previous champion"))
    rollback.add_argument("name")
    rollback.add_argument("--timeout", type=float, default=120,
                          help="seconds to wait for the scheduler to switch the alias")


@_errors_exit_1
def submit_command(args: argparse.Namespace) -> int:
    """Submit a job over the REST API. Relative paths in the spec resolve against the spec's
    folder (--server-paths: sent as written, resolved in the server's roots). Exit code with
    --wait: 0 when a feasible merge was found, 2 when none was, 1 on any error (bad spec,
    auth, failed or cancelled job)."""
    spec = read_spec_for_submit(args.spec, args.server_paths)
    client = _client(args)
    job = client.submit(spec, idempotency_key=args.idempotency_key)
    print(f"job {job['id']} {job['status']}: {client.server}/v1/jobs/{job['id']}",
          file=sys.stderr)
    if not args.wait:
        print(job["id"])
        return 0
    return report(follow_job(client, job, progress=show_progress(args)))


def pipeline_create_command(args: argparse.Namespace) -> int:
    try:
        raw = yaml.safe_load(Path(args.spec).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError(f"cannot read the pipeline spec {args.spec}: {exc}") from None
    p = _client(args).request("POST", "/v1/pipelines", json=raw)
    print(f"pipeline {p['name']} ({p['id']}): next run {p['next_due_at']}", file=sys.stderr)
    for url, secret in p.get("webhook_secrets", {}).items():  # shown once: keep it
        print(f"webhook secret for {url} (shown once): {secret}", file=sys.stderr)
    print(p["name"])
    return 0


def pipeline_list_command(args: argparse.Namespace) -> int:
    rows = _client(args).request("GET", "/v1/pipelines")["data"]
    for p in rows:
        sched = p["spec"]["schedule"]
        print(f"{p['name']:<24} {'paused' if p['paused'] else 'active':<7} "
              f"{sched['cron']} {sched['timezone']:<16} next {p['next_due_at']}  "
              f"champion {p['champion_run_id'] or '-'}")
    if not rows:
        print("no pipelines", file=sys.stderr)
    return 0


def _run_line(r: dict) -> str:
    fig = (f"reward {r['reward']:.4g} tax {r['tax']:.4g}" if r["reward"] is not None else "")
    return (f"{r['id']} {r['scheduled_for']} {r['trigger']:<8} {r['status']:<9} "
            f"{r['decision'] or '':<8} {fig} {r['reason'] or ''}").rstrip()


def _wait_for_scheduler(fetch: Callable[[], dict], done: Callable[[dict], bool], *,
                        first: dict | None, timeout: float, every: float,
                        late: Callable[[dict], str]) -> dict:
    """Poll ``fetch`` every ``every`` seconds (starting from ``first``, or a first fetch)
    until ``done``; past ``timeout`` s, DependencyUnavailableError with the message
    ``late(value)`` (the scheduler does this work: it should ask whether one runs)."""
    deadline = time.monotonic() + timeout
    value = fetch() if first is None else first
    while not done(value):
        if time.monotonic() > deadline:
            raise DependencyUnavailableError(late(value))
        time.sleep(every)
        value = fetch()
    return value


@_errors_exit_1
def pipeline_trigger_command(args: argparse.Namespace) -> int:
    """Start a run now. Exit code with --wait: 0 when the run's search found a feasible merge
    (promoted or not: the output says), 2 when none was feasible or the run was skipped, 1 on
    any error or a failed run."""
    client = _client(args)
    run = client.request("POST", f"/v1/pipelines/{args.name}/trigger")
    print(f"run {run['id']} of pipeline {args.name} started", file=sys.stderr)
    if not args.wait:
        print(run["id"])
        return 0
    run = _wait_for_scheduler(
        lambda: client.request("GET", f"/v1/pipelines/{args.name}/runs/{run['id']}"),
        lambda r: PipelineRunStatus(r["status"]).done, first=run,
        timeout=args.timeout, every=2,
        late=lambda r: f"run {r['id']} still {r['status']} after {args.timeout:.0f} s (is a "
        "scheduler running? `hmaopt scheduler`, or the embedded `hmaopt serve`)")
    print(_run_line(run))
    if run["status"] == PipelineRunStatus.FAILED:
        return 1
    if run["status"] == PipelineRunStatus.SKIPPED or run["reward"] is None:
        return 2
    print("promoted: " + (run["promoted_dir"] if run["decision"] == "promoted" else
                          f"no ({run['reason']})"))
    return 0


def pipeline_runs_command(args: argparse.Namespace) -> int:
    for r in _client(args).request("GET", f"/v1/pipelines/{args.name}/runs")["data"]:
        print(_run_line(r))
    return 0


def pipeline_rollback_command(args: argparse.Namespace) -> int:
    client = _client(args)
    out = client.request("POST", f"/v1/pipelines/{args.name}/rollback")
    _wait_for_scheduler(
        lambda: client.request("GET", f"/v1/pipelines/{args.name}"),
        lambda p: p["champion_run_id"] == out["champion_run"], first=None,
        timeout=args.timeout, every=1,
        late=lambda _: f"the rollback of {args.name} is requested but not done after "
        f"{args.timeout:.0f} s: is a scheduler running? (`hmaopt scheduler`, or the embedded "
        "`hmaopt serve`)")
    print(f"pipeline {out['pipeline']}: current -> {out['dir']} (run {out['champion_run']}, "
          f"replacing run {out['replaced_run']})")
    return 0
