"""Redis/Valkey outages and shutdowns against real servers (issue 20).

A private Redis (``redis-server`` on a free port, never the shared one) or Valkey
(service/valkey.py) is killed mid-job and started again: the job completes with every
finished trial kept, on the embedded default (SQLite + Valkey) and on PostgreSQL + Redis; a
submission during the outage is stored and runs later; the embedded ``hmaopt serve``
restarts its Valkey; SIGTERM stops a trial at its next batch and puts the job back; ``serve``
and ``demo --serve`` leave no process behind on SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.service.conftest import make_settings, start_stack
from tests.service.test_e2e import (_free_port, _start_redis, _states, _study, _trials,
                                    _wait_trials, slow_spec)

#: short backoff, so that a test waits seconds, not the production half minute
FAST = {"redis_retry_seconds": 0.2, "redis_retry_max_seconds": 1.0}


class Server:
    """A private Redis or Valkey on a fixed port that a test may kill and start again."""

    def __init__(self, kind: str, folder: Path) -> None:
        self.kind, self.folder = kind, folder
        if kind == "valkey":
            from service.valkey import ValkeyProcess

            self.valkey = ValkeyProcess(folder / "valkey")
            self.valkey.start()
            self.port = self.valkey.port
        else:
            self.port = _free_port()
            self.proc = _start_redis(self.port, folder)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def kill(self) -> None:
        if self.kind == "valkey":
            self.valkey.kill()
        else:
            self.proc.kill()
            self.proc.wait()

    def start(self) -> None:
        if self.kind == "valkey":
            self.valkey.start()
        else:
            self.proc = _start_redis(self.port, self.folder)


@pytest.fixture(params=[("sqlite", "valkey"), ("postgresql", "redis")],
                ids=["sqlite-valkey", "postgresql-redis"])
def outage_stack(request, tmp_path, roots):
    """The API and its settings on a private Redis/Valkey (the server is ``stack.server``)."""
    db, kind = request.param
    if db == "sqlite":
        url = f"sqlite:///{tmp_path / 'hmaopt.db'}"
        gen = None
    else:
        from tests.service.conftest import _pg_database

        gen = _pg_database()
        url = next(gen)
    server = Server(kind, tmp_path)
    stack = start_stack(make_settings(url, server.url, tmp_path / "home", roots,
                                      cache_dir=tmp_path / "cache", **FAST))
    stack.server = server
    try:
        yield stack
    finally:
        stack.stop_workers()
        stack.api.stop()
        server.kill()
        from service.db.session import dispose_engines

        dispose_engines()
        if gen is not None:
            gen.close()


def _job(stack, job_id: str) -> dict:
    with stack.client("viewer") as c:
        return c.get(f"/v1/jobs/{job_id}").json()


def _check_complete(stack, job_id: str, n: int, before: dict[int, dict]) -> None:
    """Every trial finished before the outage kept as it was, none twice, the cap kept."""
    after = {t["number"]: t for t in _trials(stack, job_id)}
    assert all(after[k]["reward"] == t["reward"] and after[k]["tax"] == t["tax"]
               for k, t in before.items()), "a finished trial was lost or changed"
    states = _states(_study(stack.settings, job_id))
    finished = sorted(states.get("COMPLETE", []) + states.get("PRUNED", []))
    assert finished == sorted(after) and len(finished) == n, (finished, sorted(after))


def test_a_redis_outage_mid_job_fails_nothing(outage_stack, tiny_spec):
    """Issue 20 item 1: Redis killed mid-job for a few seconds, then started again (empty):
    the job completes with every finished trial kept and the worker never exits."""
    stack = outage_stack
    spec = slow_spec(tiny_spec, stack.settings.data_roots[0], records=60)
    spec["search"]["n_trials"] = 8
    spec["search"]["pruning"] = False
    worker = stack.start_worker()
    with stack.client() as c:
        job = c.post("/v1/jobs", json=spec).json()
    _wait_trials(stack, job["id"], 2)
    before = {t["number"]: t for t in _trials(stack, job["id"])}
    stack.server.kill()
    time.sleep(4)  # the trial in hand ends; the next ask waits for its lock
    assert _job(stack, job["id"])["status"] == "running"
    assert worker.poll() is None, stack.worker_log()[-3000:]
    stack.server.start()
    final = stack.wait_job(job["id"], timeout=240)
    assert final["status"] == "succeeded", (final["error"], stack.worker_log()[-4000:])
    assert worker.poll() is None, "the worker exited"
    _check_complete(stack, job["id"], 8, before)
    assert "Redis unreachable" in stack.worker_log()


def test_a_submission_during_an_outage_is_stored_and_runs_later(outage_stack, tiny_spec):
    """Issue 20 item 3: while Redis is away a submission is 202 with ``enqueue_deferred``;
    a retry without Idempotency-Key makes a second job only because the first answer said
    the first was created; with a key, never; the jobs run once Redis is back."""
    stack = outage_stack
    stack.server.kill()
    with stack.client() as c:
        first = c.post("/v1/jobs", json=tiny_spec)
        assert first.status_code == 202, first.text
        assert first.json()["enqueue_deferred"] is True
        assert first.json()["status"] == "queued"
        keyed = [c.post("/v1/jobs", json=tiny_spec, headers={"Idempotency-Key": "k1"})
                 for _ in range(2)]
        assert [r.status_code for r in keyed] == [202, 200]
        assert keyed[0].json()["id"] == keyed[1].json()["id"]
        assert keyed[1].json()["enqueue_deferred"] is False
        listed = c.get("/v1/jobs").json()
    # one job per answer that said "created" (201/202), none more
    created = [r for r in (first, *keyed) if r.status_code in (201, 202)]
    assert listed["count"] == len(created) == 2
    stack.start_worker()
    time.sleep(2)  # the worker waits for Redis too
    stack.server.start()
    for r in created:
        final = stack.wait_job(r.json()["id"], timeout=240)
        assert final["status"] == "succeeded", (final["error"], stack.worker_log()[-3000:])
    with stack.client() as c:
        ok = c.post("/v1/jobs", json=tiny_spec)
    assert ok.status_code == 201 and ok.json()["enqueue_deferred"] is False


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the embedded default
def test_sigterm_mid_trial_puts_the_job_back(stack, tiny_spec):
    """Issue 20 item 9: SIGTERM stops the trial in hand at its next evaluation batch (the
    worker exits in seconds, not after its trial) and the job goes back to the queue; a new
    worker finishes it with no trial lost or counted twice."""
    spec = slow_spec(tiny_spec, stack.settings.data_roots[0], records=150)
    spec["search"]["n_trials"] = 6
    spec["search"]["pruning"] = False
    w1 = stack.start_worker("w1")
    with stack.client() as c:
        job = c.post("/v1/jobs", json=spec).json()
    _wait_trials(stack, job["id"], 1, timeout=240, worker="w1")
    study = _study(stack.settings, job["id"])
    while not _states(study).get("RUNNING"):
        time.sleep(0.02)
    running = _states(study)["RUNNING"]
    before = {t["number"]: t for t in _trials(stack, job["id"])}
    t0 = time.monotonic()
    w1.send_signal(signal.SIGTERM)
    assert w1.wait(timeout=60) == 0, stack.worker_log("w1")[-3000:]
    stopped = time.monotonic() - t0
    states = _states(_study(stack.settings, job["id"]))
    assert set(running) <= set(states.get("FAIL", [])), "the trial in hand was not stopped"
    assert _job(stack, job["id"])["status"] == "queued"
    assert "next evaluation batch" in stack.worker_log("w1")
    eval_seconds = max(t["eval_seconds"] for t in before.values())
    assert stopped < max(eval_seconds, 1.0) + 5, (stopped, eval_seconds)
    stack.start_worker("w2")
    final = stack.wait_job(job["id"], timeout=300, worker="w2")
    assert final["status"] == "succeeded", final["error"]
    _check_complete(stack, job["id"], 6, before)


# ----------------------------------------------------------------- the embedded stack

def _serve_env(tmp_path: Path, roots) -> dict[str, str]:
    models, data = roots
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("HMAOPT_") and k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(HMAOPT_HOME=str(tmp_path / "home"), HMAOPT_MODEL_ROOTS=str(models),
               HMAOPT_DATA_ROOTS=str(data), HMAOPT_CACHE_DIR=str(tmp_path / "cache"),
               HF_HUB_OFFLINE="1", HMAOPT_REDIS_RETRY_SECONDS="0.2",
               HMAOPT_REDIS_RETRY_MAX_SECONDS="1", HMAOPT_HEARTBEAT_SECONDS="0.5",
               HMAOPT_WORKER_STALE_SECONDS="4", HMAOPT_MAINTENANCE_SECONDS="1",
               HMAOPT_LOG_LEVEL="INFO")
    return env


def _children(pid: int) -> dict[int, str]:
    """The processes ``pid`` started (directly), by pid: their command names."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                found[int(child)] = Path(f"/proc/{child}/comm").read_text().strip()
            except OSError:
                pass
    return found


def _valkey(pid: int) -> list[int]:
    return [c for c, name in _children(pid).items() if name.startswith("valkey")]


def _gone(pids: list[int], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if Path(f"/proc/{p}").exists()
                 and "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]]
        if not alive:
            return True
        time.sleep(0.1)
    return False


def _ready(port: int) -> int | None:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code
    except httpx.HTTPError:
        return None


def _wait_ready(port: int, proc, want: int = 200, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _ready(port) != want:
        assert proc.poll() is None, proc.stdout.read1().decode()
        assert time.monotonic() < deadline, f"/readyz not {want} after {timeout} s"
        time.sleep(0.2)


def _stop(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _block_restarts(valkey_dir: Path) -> Path:
    """Make the next starts of the embedded Valkey fail (its log path a folder) until the
    returned folder is removed: an outage that lasts."""
    log = valkey_dir / "valkey.log"
    log.rename(valkey_dir / "valkey.log.1")  # the running server keeps its open file
    log.mkdir()
    return log


def test_embedded_serve_restarts_its_valkey(tmp_path, roots, tiny_spec):
    """Issue 20 item 2: the embedded Valkey killed: /readyz 503 while it is down, 200 once
    the supervisor restarted it; the local worker stays up (one registration, no crash
    loop); a job submitted while it was down runs after."""
    import httpx

    home = tmp_path / "home"
    port = _free_port()
    serve = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
                             env=_serve_env(tmp_path, roots), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(port, serve)
        token = subprocess.run([sys.executable, "-m", "service.cli", "token", "create", "--role",
                                "operator"], env=_serve_env(tmp_path, roots), capture_output=True,
                               text=True, check=True).stdout.strip().splitlines()[-1]
        auth = {"Authorization": f"Bearer {token}"}
        [pid] = _valkey(serve.pid)
        blocker = _block_restarts(home / "valkey")
        os.kill(pid, signal.SIGKILL)
        try:
            time.sleep(1.5)
            assert _ready(port) == 503
            body = httpx.get(f"http://127.0.0.1:{port}/readyz").json()
            assert body["checks"]["redis"] != "ok"
            r = httpx.post(f"http://127.0.0.1:{port}/v1/jobs", json=tiny_spec, headers=auth)
            assert r.status_code == 202 and r.json()["enqueue_deferred"], r.text
            time.sleep(2)  # a worker that exits on an outage would be restarted by now
        finally:
            blocker.rmdir()
        _wait_ready(port, serve, timeout=30)
        new_pids = _valkey(serve.pid)
        assert len(new_pids) == 1 and new_pids != [pid]
        started = list(_children(serve.pid))
        job_id = r.json()["id"]
        deadline = time.monotonic() + 240
        while (job := httpx.get(f"http://127.0.0.1:{port}/v1/jobs/{job_id}",
                                headers=auth).json())["status"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, (home / "logs" / "worker-0.log").read_text()
            time.sleep(0.3)
        assert job["status"] == "succeeded", job["error"]
        workers = httpx.get(f"http://127.0.0.1:{port}/v1/workers",
                            params={"include_stopped": True}, headers=auth).json()["data"]
        assert [w["name"] for w in workers] == ["local-0"], workers  # never restarted
        log = (home / "logs" / "worker-0.log").read_text()
        assert "Redis is back" in log or "Redis back" in log, log[-3000:]
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(timeout=60)
        finally:
            _stop(serve)
    assert _gone(started), "Valkey or the worker outlived serve"
    assert not (home / "redis.url").exists()


def test_serve_sigterm_leaves_nothing_behind(tmp_path, roots):
    """Issue 20 item 10 (serve): SIGTERM stops the local worker, Valkey and redis.url."""
    home = tmp_path / "home"
    port = _free_port()
    serve = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
                             env=_serve_env(tmp_path, roots), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(port, serve)
        started = list(_children(serve.pid))
        assert len(started) == 2 and _valkey(serve.pid)  # Valkey and the local worker
        os.kill(serve.pid, signal.SIGTERM)  # the process only, not its group
        assert serve.wait(timeout=60) == 0
    finally:
        _stop(serve)
    assert _gone(started), [Path(f"/proc/{p}/cmdline").read_bytes() for p in started
                            if Path(f"/proc/{p}").exists()]
    assert not (home / "redis.url").exists()


def test_demo_serve_sigterm_leaves_nothing_behind(tmp_path, world):
    """Issue 20 item 10 (demo): `hmaopt demo --serve` stopped with SIGTERM mid-job stops its
    worker and its Valkey and removes redis.url, as Ctrl-C does."""
    import httpx

    demo = tmp_path / "demo"
    shutil.copytree(world, demo / "world")  # the cached world: no rebuild
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("HMAOPT_") and k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(HF_HUB_OFFLINE="1", HMAOPT_CACHE_DIR=str(tmp_path / "cache"),
               HMAOPT_WORKER_STOP_SECONDS="30")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "demo", "--dir", str(demo),
                             "--no-progress", "--serve", "--port", str(port)], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    home = demo / "service"
    try:
        _wait_ready(port, proc, timeout=120)
        deadline = time.monotonic() + 120
        while not (home / "logs" / "worker-0.log").is_file() or \
                "job" not in (home / "logs" / "worker-0.log").read_text():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        started = list(_children(proc.pid))
        assert len(started) == 2 and _valkey(proc.pid), started  # Valkey and the worker
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        _stop(proc)
    assert _gone(started), "a process of the demo outlived it"
    assert not (home / "redis.url").exists()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
