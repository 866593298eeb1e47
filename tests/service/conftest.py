"""Fixtures of the service tests: real PostgreSQL and Redis, the embedded SQLite and Valkey.

- ``db_url``: every storage test runs on SQLite and on PostgreSQL (a fresh database per test,
  dropped after), like optuna's STORAGE_MODES.
- ``redis_url``: a database of the local Redis, flushed before and after each test (as rq's
  tests do).
- ``stack``: settings + an API server thread + tokens of each role; ``start_worker`` starts a
  real ``hmaopt worker`` process against it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
#: a database of the local Redis that the tests flush; HMAOPT_TEST_REDIS_DB picks another one
#: (two suites running side by side must not flush each other's)
REDIS_TEST_URL = f"redis://127.0.0.1:6379/{int(os.environ.get('HMAOPT_TEST_REDIS_DB', '13'))}"


def _pg_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            return True
    except Exception:
        return False


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'hmaopt.db'}"
        return
    yield from _pg_database()


@pytest.fixture
def pg_url() -> str:
    yield from _pg_database()


def _pg_database():
    import psycopg

    if not _pg_available():  # .ci/run starts PostgreSQL; a missing server is a failure there
        pytest.fail("PostgreSQL is not running on 127.0.0.1:5432 (scripts/services.sh starts it)")
    name = f"hmaopt_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        from service.db.session import dispose_engines

        dispose_engines()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def redis_url() -> str:
    import redis

    conn = redis.Redis.from_url(REDIS_TEST_URL)
    try:
        conn.ping()
    except redis.RedisError:
        pytest.fail("Redis is not running on 127.0.0.1:6379 (scripts/services.sh starts it)")
    conn.flushdb()
    yield REDIS_TEST_URL
    conn.flushdb()


@pytest.fixture
def roots(tmp_path) -> tuple[Path, Path]:
    models, data = tmp_path / "models", tmp_path / "data"
    models.mkdir()
    data.mkdir()
    return models, data


def make_settings(db_url: str, redis_url: str | None, home: Path, roots, **extra):
    from service.settings import Settings

    models, data = roots
    extra.setdefault("cache_dir", home / "cache")  # never the user's own cache
    return Settings(database_url=db_url, redis_url=redis_url, home=home,
                    model_roots=[models], data_roots=[data], heartbeat_seconds=0.5,
                    worker_stale_seconds=4, maintenance_seconds=1, **extra)


def settings_env(settings) -> dict[str, str]:
    """The environment that gives a subprocess these settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("HMAOPT_") and k not in ("DATABASE_URL", "REDIS_URL")}
    env.update({"DATABASE_URL": settings.database_url or settings.database(),
                "HMAOPT_HOME": str(settings.home),
                "HMAOPT_MODEL_ROOTS": ":".join(map(str, settings.model_roots)),
                "HMAOPT_DATA_ROOTS": ":".join(map(str, settings.data_roots)),
                "HMAOPT_HEARTBEAT_SECONDS": str(settings.heartbeat_seconds),
                "HMAOPT_WORKER_STALE_SECONDS": str(settings.worker_stale_seconds),
                "HMAOPT_MAINTENANCE_SECONDS": str(settings.maintenance_seconds),
                "HMAOPT_CACHE_DIR": str(settings.cache_dir),
                "HMAOPT_LOG_LEVEL": "INFO", "HF_HUB_OFFLINE": "1"})
    if settings.redis_url:
        env["REDIS_URL"] = settings.redis_url
    return env


@dataclass
class Stack:
    settings: object
    url: str
    tokens: dict[str, str]
    api: object
    workers: list = field(default_factory=list)

    def client(self, role: str | None = "operator"):
        import httpx

        headers = {"Authorization": f"Bearer {self.tokens[role]}"} if role else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def start_worker(self, name: str = "w", *extra: str) -> subprocess.Popen:
        Path(self.settings.home).mkdir(parents=True, exist_ok=True)
        log = open(Path(self.settings.home) / f"{name}.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker", "--device", "cpu", "--name", name,
             *extra], env=settings_env(self.settings), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        log.close()
        self.workers.append(proc)
        return proc

    def worker_log(self, name: str = "w") -> str:
        path = Path(self.settings.home) / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def stop_workers(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.workers.clear()

    def wait_job(self, job_id: str, statuses=("succeeded", "failed", "cancelled"),
                 timeout: float = 180, worker: str = "w") -> dict:
        deadline = time.monotonic() + timeout
        with self.client("viewer") as c:
            while True:
                job = c.get(f"/v1/jobs/{job_id}").json()
                if job["status"] in statuses:
                    return job
                if time.monotonic() > deadline:
                    raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s;"
                                         f" worker log:\n{self.worker_log(worker)[-4000:]}")
                time.sleep(0.2)


def start_stack(settings) -> Stack:
    from service.api.app import create_app
    from service.db import session_scope
    from service.db.migrate import upgrade
    from service.db.tokens import create_token
    from service.embedded import ApiThread
    from service.status import Role

    upgrade(settings.database())
    tokens = {}
    with session_scope(settings.database()) as session:
        for role in Role:
            tokens[role.value] = create_token(session, role, f"test-{role.value}")[1]
    api = ApiThread(create_app(settings))
    return Stack(settings, api.start(), tokens, api)


def _running_stack(db_url, redis_url, tmp_path, roots):
    s = start_stack(make_settings(db_url, redis_url, tmp_path / "home", roots))
    try:
        yield s
    finally:
        s.stop_workers()
        s.api.stop()
        from service.db.session import dispose_engines

        dispose_engines()


@pytest.fixture
def stack(db_url, redis_url, tmp_path, roots):
    """The API on SQLite and on PostgreSQL (parametrised), with the test Redis."""
    yield from _running_stack(db_url, redis_url, tmp_path, roots)


@pytest.fixture
def pg_stack(pg_url, redis_url, tmp_path, roots):
    """The API on PostgreSQL only (for the slow worker tests)."""
    yield from _running_stack(pg_url, redis_url, tmp_path, roots)


@pytest.fixture
def tiny_spec(roots) -> dict:
    """A tiny job whose models lie in the model root and data in the data root."""
    from tests.models import make_tiny_job

    models, data = roots
    spec = make_tiny_job(models)
    # move the data sets into the data root
    (models / "data").rename(data / "sets")
    for task in spec["tax"]["tasks"]:
        task["data"] = task["data"].replace(str(models / "data"), str(data / "sets"))
    spec["reward"]["data"] = spec["reward"]["data"].replace(str(models / "data"),
                                                            str(data / "sets"))
    return spec
