"""``hmaopt jobs list|show|cancel|export|trials``: a server's jobs over the REST API (the
endpoints of service/api/routes/jobs.py), as a human table or, with --json, the API's own
JSON. ``list`` and ``trials`` page like the API (``--limit``, ``--offset``; ``--all`` fetches
every page).
"""

from __future__ import annotations

import argparse

from service.cli.helpers import add_command, add_group, format_summary, poll_until
from service.cli.output import add_json_flag, emit, fixed, note, table, wants_json
from service.cli.remote import add_client_args, client_for
from service.errors import JobFailedError
from service.status import ExportStatus, JobStatus

#: the trial kinds the API filters on (GET /v1/jobs/{id}/trials ``kind``)
TRIAL_KINDS = ("uniform", "warm", "search")
TRIAL_SORTS = ("number", "reward", "tax", "eval_seconds", "merge_seconds")


def add_jobs(sub) -> None:
    jobs = add_group(sub, "jobs", help="a server's jobs: list, show, cancel, export, trials",
                     description="The jobs of an hmaopt server over its REST API (--server, "
                     "--token as for submit; --json for machine-readable output).")

    def command(name, handler, help):
        return add_json_flag(add_client_args(add_command(jobs, name, handler, help=help)))

    lst = command("list", jobs_list_command, "jobs, newest first")
    lst.add_argument("--status", action="append", choices=[s.value for s in JobStatus],
                     help="only jobs in this status (repeatable)")
    lst.add_argument("--name", default=None, help="only jobs of this exact name")
    lst.add_argument("-q", "--query", default=None, help="text in the name, id or submitter")
    _add_paging(lst, 50, 500)

    show = command("show", jobs_show_command,
                   "a job: status, progress, best, baseline, gain, result, export")
    show.add_argument("id")

    cancel = command("cancel", jobs_cancel_command,
                     "cancel a job (a running one stops within seconds)")
    cancel.add_argument("id")

    export = command("export", jobs_export_command,
                     "write a job's best merge as a checkpoint (a worker does it)")
    export.add_argument("id")
    export.add_argument("--dir", default=None,
                        help="output folder inside the server's model roots (default: the "
                        "spec's export.dir)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace a previous export in that folder")
    export.add_argument("--wait", action="store_true", help="wait until the export is done")
    export.add_argument("--timeout", type=float, default=3600,
                        help="with --wait, give up after this many seconds (default 3600)")

    trials = command("trials", jobs_trials_command, "a job's finished trials, paged")
    trials.add_argument("id")
    trials.add_argument("--sort", choices=TRIAL_SORTS, default="number")
    trials.add_argument("--desc", action="store_true", help="descending order")
    trials.add_argument("--kind", choices=TRIAL_KINDS, default=None)
    trials.add_argument("--feasible", action=argparse.BooleanOptionalAction, default=None,
                        help="only feasible (--feasible) or infeasible (--no-feasible) trials")
    _add_paging(trials, 100, 1000)


def _add_paging(parser: argparse.ArgumentParser, default: int, most: int) -> None:
    parser.add_argument("--limit", type=int, default=default,
                        help=f"rows per page, 1 to {most} (default {default})")
    parser.add_argument("--offset", type=int, default=0, help="rows to skip (default 0)")
    parser.add_argument("--all", action="store_true", help="every page, from --offset on")


def _pages(fetch, args: argparse.Namespace) -> dict:
    """One page (``{"data", "count"}``), or with --all every page from --offset on."""
    page = fetch(args.limit, args.offset)
    if args.all:
        rows = list(page["data"])
        while page["data"] and args.offset + len(rows) < page["count"]:
            page = fetch(args.limit, args.offset + len(rows))
            rows += page["data"]
        page = {"data": rows, "count": page["count"]}
    return page


def _page_note(args: argparse.Namespace, page: dict, noun: str) -> None:
    shown, total = len(page["data"]), page["count"]
    if not shown:
        note(f"no {noun}" + (f" at offset {args.offset} (of {total})" if total else ""))
        return
    first, last = args.offset + 1, args.offset + shown
    more = (f"; next page: --offset {last}" if last < total else "")
    note(f"{noun} {first}-{last} of {total}{more}")


def jobs_list_command(args: argparse.Namespace) -> int:
    """Jobs, newest first: status, trials finished, the best feasible reward and its tax, the
    gain over the best uniform ratio (vanilla averaging) at the same budget."""
    with client_for(args) as client:
        page = _pages(lambda limit, offset: client.jobs(
            status=args.status, name=args.name, q=args.query, limit=limit, offset=offset), args)
    rows = [(j["id"], j["name"], j["status"],
             f"{j['progress']['trials_finished']}/{j['progress']['n_trials']}",
             fixed((j["best"] or {}).get("reward")), fixed((j["best"] or {}).get("tax")),
             fixed(j["budget"]), "-" if j["gain"] is None else f"{j['gain']:+.4f}",
             j["created_at"][:19].replace("T", " ")) for j in page["data"]]
    emit(args, page, table(rows, ("ID", "NAME", "STATUS", "TRIALS", "BEST REWARD", "TAX",
                                  "BUDGET", "GAIN", "CREATED (UTC)"),
                           right=(False, False, False, True, True, True, True, True, False))
         if rows else None)
    if not wants_json(args):
        _page_note(args, page, "jobs")
    return 0


def format_job(job: dict, dashboard: str) -> str:
    """The human view of a job (GET /v1/jobs/{id})."""
    p, best, base = job["progress"], job["best"], job["baseline"]
    lines = [f"job {job['id']}  {job['name']}  {job['status']}"
             + ("  (cancel requested)" if job["cancel_requested"] and
                not JobStatus(job["status"]).terminal else ""),
             f"  models      base {job['base_model']}  ->  aligned {job['aligned_model']}",
             f"  trials      {p['trials_finished']}/{p['n_trials']} finished "
             f"({p['trials_pruned']} pruned); tax budget {job['budget']:g}"]
    if best:
        ratios = ", ".join(f"{k}={v:.3f}" for k, v in best["ratios"].items())
        lines.append(f"  best        reward {best['reward']:.4f}  tax {best['tax']:.4f}  "
                     f"(trial {best['trial']}; ratio = weight on the ALIGNED model) {ratios}")
    if base:
        alpha = "-" if base["ratio"] is None else f"{base['ratio']:g}"
        lines.append(f"  uniform     alpha={alpha}  reward {base['reward']:.4f}  tax "
                     f"{fixed(base['tax'])}")
    if job["gain"] is not None:
        lines.append(f"  gain        {job['gain']:+.4f} reward over the best uniform alpha")
    if job.get("error"):
        lines.append(f"  error       {job['error']}")
    export = job.get("export") or {}
    if export.get("status"):
        lines.append(f"  export      {export['status']} {export.get('dir') or ''}"
                     + (f": {export['error']}" if export.get("error") else ""))
    lines.append(f"  dashboard   {dashboard}")
    if job.get("result"):
        lines += ["", format_summary(job["result"])]
    return "\n".join(lines)


def jobs_show_command(args: argparse.Namespace) -> int:
    """A job: status, progress, the best feasible trial, the best uniform ratio, the gain,
    the final result (holdout figures) and the export. --json: the API's job as is."""
    with client_for(args) as client:
        job = client.job(args.id)
        emit(args, job, lambda: format_job(job, client.dashboard_url(job["id"])))
    return 0


def jobs_cancel_command(args: argparse.Namespace) -> int:
    """Cancel a job: a queued one at once, a running one within seconds (its worker stops at
    the next evaluation batch). A job that has already ended is a conflict (exit 4)."""
    with client_for(args) as client:
        job = client.cancel(args.id)
    done = job["status"] == JobStatus.CANCELLED
    emit(args, job, f"job {job['id']} " + ("cancelled" if done else
                                          f"{job['status']}: cancel requested, its worker "
                                          "stops within seconds"))
    return 0


def jobs_export_command(args: argparse.Namespace) -> int:
    """Ask a worker to write the job's best merge as a Hugging Face checkpoint with
    hma_manifest.json. With --wait, exit 0 once it is written, 11 when it failed."""
    with client_for(args) as client:
        state = client.export(args.id, args.dir, overwrite=args.overwrite)
        if not args.wait:
            emit(args, state, f"export of job {args.id} {state['status']}: {state['dir']}")
            return 0
        note(f"export of job {args.id} {state['status']}: {state['dir']}")
        job = poll_until(
            lambda: client.job(args.id),
            lambda j: not ExportStatus(j["export"]["status"]).active, first=None,
            timeout=args.timeout, every=1,
            late=lambda j: f"the export of job {args.id} is still {j['export']['status']} "
            f"after {args.timeout:.0f} s: is a worker running? (`hmaopt worker`, or the "
            "embedded `hmaopt serve`)")
    state = job["export"]
    if state["status"] == ExportStatus.FAILED:
        if wants_json(args):
            emit(args, state, None)
        error = state["error"] or "no reason given"
        if "already exists" in error and not args.overwrite:
            error += " (--overwrite replaces a previous export)"
        raise JobFailedError(f"the export of job {args.id} failed: {error}")
    emit(args, state, f"exported job {args.id} to {state['dir']}")
    return 0


def _ratios(ratios: dict) -> str:
    return ",".join(f"{v:.3f}" for v in ratios.values())


def jobs_trials_command(args: argparse.Namespace) -> int:
    """A job's finished trials (complete or pruned), sorted and paged; the ratios column
    lists the slots' ratios in slot order (weights on the ALIGNED model)."""
    with client_for(args) as client:
        page = _pages(lambda limit, offset: client.trials(
            args.id, sort=args.sort, order="desc" if args.desc else "asc", kind=args.kind,
            feasible=args.feasible, limit=limit, offset=offset), args)
    slots = ",".join(page["data"][0]["ratios"]) if page["data"] else "RATIOS"
    rows = [(t["number"], t["kind"], t["state"], fixed(t["reward"]), fixed(t["tax"]),
             "yes" if t["feasible"] else "no", _ratios(t["ratios"]),
             f"{t['eval_seconds']:.2f}") for t in page["data"]]
    emit(args, page, table(rows, ("#", "KIND", "STATE", "REWARD", "TAX", "FEASIBLE", slots,
                                  "EVAL S"),
                           right=(True, False, False, True, True, False, False, True))
         if rows else None)
    if not wants_json(args):
        _page_note(args, page, "trials")
    return 0

