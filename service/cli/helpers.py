"""What several command families share: argument types, the parser class, progress bars,
following a job over REST, waiting on the server, and printing a job's result (its outcome
as the exit code: service/errors.py, ``ExitCode``).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable

from tqdm.auto import tqdm

from service.cli.output import dumps
from service.errors import (DependencyUnavailableError, NoFeasibleMergeError, NoResultError,
                            JobFailedError, UsageError)
from service.spec import load_spec
from service.status import JobStatus, TrialStatus

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"512MiB"`` -> 536_870_912, ``"1000"`` -> 1000 bytes."""
    m = _SIZE.match(text)
    unit = (m.group(2) or "").lower() if m else None
    if not m or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GB, 500MB, 512MiB)")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return size


def parse_ratios(text: str) -> list[float]:
    try:
        return [float(r) for r in text.split(",") if r.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"ratios must be comma-separated numbers, got {text!r}") from exc


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        """argparse's usage errors are SpecErrors (exit 2), printed by ``main`` like any
        other error (as JSON with --json)."""
        raise UsageError(message, usage=self.format_usage())


def add_command(sub, name: str, handler, *, help: str) -> argparse.ArgumentParser:
    """Add ``hmaopt ... NAME``, run by ``handler``. The handler's docstring, if it has one, is
    the command's description (``hmaopt ... NAME --help``), as in click."""
    parser = sub.add_parser(name, help=help, description=handler.__doc__)
    parser.set_defaults(handler=handler)
    return parser


def add_group(sub, name: str, **kwargs):
    """Add ``hmaopt NAME``, a group of subcommands (``hmaopt db upgrade``): returns the
    subparsers to add them to; the one chosen is ``args.<NAME>_command``."""
    return sub.add_parser(name, **kwargs).add_subparsers(dest=f"{name}_command", required=True)


def add_progress_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def show_progress(args: argparse.Namespace) -> bool:
    """A bar only when asked for (no --no-progress) and stderr is a terminal."""
    return not args.no_progress and sys.stderr.isatty()


def read_spec_for_submit(path: str, server_paths: bool) -> dict:
    spec = load_spec(path, resolve=not server_paths)  # validated, cross-field checks too
    return spec.model_dump(mode="json", exclude_unset=False)


def follow_job(client, job: dict, *, progress: bool) -> dict:
    """Show a job's progress until it ends; returns the final job."""
    bar = None
    if progress:
        bar = tqdm(total=job["progress"]["n_trials"], initial=job["progress"]["trials_finished"],
                   desc="trials", unit="trial", dynamic_ncols=True)

    def on_event(event: str, data: dict) -> None:
        if event == "trial":
            if bar is not None:
                bar.n = data["trials_finished"]
                best = data.get("best_reward")
                bar.set_postfix_str("none feasible" if best is None else
                                    f"best {best:.4g} @ tax {data['best_tax']:.3f}", refresh=True)
            else:
                reward = ("pruned" if data["state"] == TrialStatus.PRUNED else
                          f"reward {data['reward']:.4g}")
                print(f"trial {data['number']:>3} {data['kind']:<7} {reward:<14} tax "
                      f"{data['tax']:.4f}  ({data['trials_finished']}/{data['n_trials']})",
                      file=sys.stderr)
        elif event in ("status", "worker_lost", "export"):
            msg = data.get("status") or f"worker {data.get('worker')} lost"
            if bar is not None:
                bar.write(f"{event}: {msg}")
            else:
                print(f"{event}: {msg}", file=sys.stderr)

    try:
        return client.wait(job["id"], on_event)
    finally:
        if bar is not None:
            bar.close()


def report(job: dict, *, as_json: bool = False) -> int:
    """Print a finished job (its summary, or with ``as_json`` the job as JSON); 0 when it found
    a feasible merge, else the outcome's error: NoFeasibleMergeError, JobFailedError,
    NoResultError (a cancelled job)."""
    result = job.get("result")
    if as_json:
        print(dumps(job))
    elif job["status"] == JobStatus.SUCCEEDED and result:
        print(format_summary(result))
    if job["status"] == JobStatus.FAILED:
        raise JobFailedError(f"job {job['id']} failed: {job['error']}")
    if job["status"] != JobStatus.SUCCEEDED or not result:
        raise NoResultError(f"job {job['id']} ended {job['status']} without a result")
    if not result["feasible"]:
        raise NoFeasibleMergeError(no_feasible_message(f"job {job['id']}", result["budget"]))
    return 0


def no_feasible_message(what: str, budget: float) -> str:
    return (f"{what}: no merge within the tax budget {budget:g} (every trial's tax exceeds "
            "it): raise tax.budget, or lower ratio_bounds")


def poll_until(fetch: Callable[[], dict], done: Callable[[dict], bool], *,
               first: dict | None, timeout: float, every: float,
               late: Callable[[dict], str]) -> dict:
    """Poll ``fetch`` every ``every`` seconds (starting from ``first``, or a first fetch)
    until ``done``; past ``timeout`` s, DependencyUnavailableError with the message
    ``late(value)`` (a scheduler or a worker does this work: it should ask whether one
    runs)."""
    deadline = time.monotonic() + timeout
    value = fetch() if first is None else first
    while not done(value):
        if time.monotonic() > deadline:
            raise DependencyUnavailableError(late(value))
        time.sleep(every)
        value = fetch()
    return value


def format_summary(r: dict) -> str:
    """The human summary of a search result (the dict of SearchResult.to_dict): every figure
    with its standard error and records (n), the gains with their 95 % intervals, and the
    flags that say where the result does not hold."""
    def fig(x, fmt=".4g"):
        return "n/a" if x is None else format(x, fmt)

    def line(label: str, d: dict | None) -> str:
        if not d:
            return ""
        reward = fig(d.get("reward"))
        if d.get("reward_se") is not None:
            reward += f" ± {d['reward_se']:.2g}"
        tax = fig(d.get("tax"), ".4f")
        if d.get("tax_se") is not None:
            tax += f" ± {d['tax_se']:.2g}"
        n = f"  (n {d['n_reward']} prompts, {d['n_tax']} items)" if d.get("n_reward") else ""
        over = "" if d.get("feasible", True) else "  OVER BUDGET"
        if d.get("held_out") is False:  # lm-eval tasks and sets too small are not split
            over += f"  (search data: {', '.join(d.get('from_search_data') or ['some sets'])})"
        return f"  {label:<14}reward {reward}  tax {tax}{n}{over}"

    def interval(ci) -> str:
        return f" [{ci[0]:+.4g}, {ci[1]:+.4g}]" if ci else ""

    lines = [f"study {r['study']} ({r['mode']}, tax budget {r['budget']:g}; "
             "ratio = weight on the ALIGNED model; ± one standard error)"]
    best, uni = r["best"], r["best_uniform"]
    if best is None:
        lines.append("no feasible merge: every trial's tax exceeds the budget")
    else:
        ratios = ", ".join(f"{k}={v:.3f}" for k, v in best["ratios"].items())
        chosen = " on the validation data" if best.get("chosen_by") == "validation" else ""
        lines.append(f"best ratios     {ratios}  (trial {best['trial']}, chosen{chosen})")
        lines += [x for x in (line("search", best), line("validation", best.get("validation")),
                              line("holdout", best.get("holdout"))) if x]
    if uni is None:
        lines.append("best uniform    none feasible")
    else:
        lines.append(f"best uniform    alpha={uni['ratio']:g}  (trial {uni['trial']})")
        lines += [x for x in (line("search", uni), line("validation", uni.get("validation")),
                              line("holdout", uni.get("holdout"))) if x]
    lines.append(f"gain            {fig(r['gain'], '+.4g')}{interval(r.get('gain_ci95'))} reward "
                 "over the best uniform alpha (95 % interval, paired by prompt)")
    if r.get("holdout_gain") is not None:
        lines.append(f"  holdout       {fig(r['holdout_gain'], '+.4g')}"
                     f"{interval(r.get('holdout_gain_ci95'))}")
    for flag in r.get("flags") or []:
        lines.append(f"WARNING         {flag['message']}")
    t, s = r["trials"], r["seconds"]
    lines.append(f"trials          {t['finished']} finished ({t['uniform']} uniform baseline), "
                 f"{t['pruned']} pruned")
    if r.get("stages"):  # which stage found the answer, and what each stage spent
        spent = ", ".join(f"{kind} {st['evaluations']}" for kind, st in r["stages"].items())
        grad = r.get("gradient") or {}
        if grad.get("eval_equivalents") is not None:
            spent += (f" (+ gradient stage {grad['seconds']:.1f} s = "
                      f"{grad['eval_equivalents']:.1f} evaluations)")
        found = (f"found by {r['found_by']}" if r.get("found_by")
                 else "no feasible answer")
        lines.append(f"stages          {found}; evaluations: {spent}")
    lines.append(f"time per trial  {fig(s['per_trial'], '.2f')} s (merge "
                 f"{fig(s['merge_per_trial'], '.3f')} s, evaluation {fig(s['eval_per_trial'], '.2f')}"
                 f" s); total {s['total']:.1f} s")
    if r["mode"] == "pareto":
        lines.append(f"pareto front    {len(r['pareto'])} feasible trials: "
                     + ", ".join(f"#{p['trial']} ({fig(p['reward'])}, {fig(p['tax'], '.3f')})"
                                 for p in r["pareto"]))
    return "\n".join(lines)
