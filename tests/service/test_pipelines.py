"""Nightly pipelines: checkpoint sources, claims by two schedulers, decisions, promotion and
rollback, signed webhooks with retries, the REST errors; one run end to end with a worker."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

NIGHTLY = {"cron": "0 2 * * *", "timezone": "Europe/Paris"}


def _old(folder: Path, seconds: float = 3600) -> None:
    """Age every file of a checkpoint (it settled long ago)."""
    t = time.time() - seconds
    for p in folder.iterdir():
        os.utime(p, (t, t))


def _checkpoint(src: Path, dst: Path, *, age: float = 3600) -> Path:
    shutil.copytree(src, dst)
    _old(dst, age)
    return dst


def _pipeline(tiny_spec: dict, roots, name: str = "nightly", **extra) -> dict:
    models, _ = roots
    (models / "rlhf").mkdir(exist_ok=True)
    return {"name": name, "job": {**tiny_spec, "export": None},
            "schedule": NIGHTLY, "aligned": {"dir": str(models / "rlhf"), "settle_seconds": 60},
            "promote": {"dir": str(models / "promoted" / name), "margin": 0.0}, **extra}


# ------------------------------------------------------------------ sources

def test_newest_complete_checkpoint_never_takes_a_half_written_one(tmp_path, tiny_spec, roots):
    from service.pipelines.sources import newest_complete
    from service.pipelines.spec import Source
    from service.settings import Settings

    models, _ = roots
    aligned = Path(tiny_spec["aligned_model"])
    folder = models / "rlhf"
    first = _checkpoint(aligned, folder / "ckpt-1", age=7200)
    settings = Settings(model_roots=[models], data_roots=[tmp_path])
    source = Source(dir=str(folder), settle_seconds=60)
    found, _ = newest_complete(source, settings, "aligned")
    assert found.path == str(first)
    # a newer one being written: truncated weights, then fresh files, then no marker
    second = _checkpoint(aligned, folder / "ckpt-2", age=60 * 10)
    weights = second / "model.safetensors"
    full = weights.read_bytes()
    weights.write_bytes(full[: len(full) // 2])
    _old(second, 600)
    found, passed = newest_complete(source, settings, "aligned")
    assert found.path == str(first) and "truncated" in passed[0]
    weights.write_bytes(full)  # complete now, but just written
    found, passed = newest_complete(source, settings, "aligned")
    assert found.path == str(first) and "settles after 60 s" in passed[0]
    _old(second, 600)
    found, _ = newest_complete(source, settings, "aligned")
    assert found.path == str(second)
    marked = Source(dir=str(folder), marker="COMPLETE", settle_seconds=0)
    assert newest_complete(marked, settings, "aligned")[0] is None
    (first / "COMPLETE").touch()
    assert newest_complete(marked, settings, "aligned")[0].path == str(first)
    (second / "config.json").unlink()
    found, passed = newest_complete(source, settings, "aligned")
    assert found is None  # ckpt-1 just got its marker: it settles first
    assert "ckpt-2: no config.json" in passed


def test_warm_start_scales_the_previous_best_and_adds_its_uniform_alpha(tiny_spec):
    from service.pipelines.spec import apply_warm_start

    job = {**tiny_spec, "search": {**tiny_spec["search"], "warm_start": [{"block0": 0.1,
                                                                          "block1": 0.1}]}}
    out = apply_warm_start(job, {"block0": 0.5, "block1": 0.8}, 0.25, [1.0, 0.9, 0.9], 2)
    assert out["search"]["warm_start_refine"] == 2
    assert out["search"]["warm_start"] == [{"block0": 0.5, "block1": 0.8},
                                           {"block0": 0.45, "block1": 0.72},
                                           {"block0": 0.1, "block1": 0.1}]
    assert out["search"]["uniform_grid"] == [0.0, 0.25, 0.5, 1.0]  # tiny grid + 0.25
    assert job["search"]["warm_start"] == [{"block0": 0.1, "block1": 0.1}]  # not changed
    same = apply_warm_start(job, {"block0": 0.5, "block1": 0.5}, 0.5, [1.0])
    assert same["search"]["uniform_grid"] == [0.0, 0.5, 1.0]  # 0.5 is on the grid already


# ------------------------------------------------------------------ REST and errors

def test_rest_errors_are_clear(stack, tiny_spec, roots):
    spec = _pipeline(tiny_spec, roots)
    with stack.client() as api:
        bad_cron = api.post("/v1/pipelines", json={**spec, "schedule": {"cron": "0 25 * * *"}})
        assert bad_cron.status_code == 422 and bad_cron.json()["field"] == "schedule.cron"
        assert "not a valid five-field cron" in bad_cron.json()["message"]
        bad_tz = api.post("/v1/pipelines", json={**spec, "schedule": {**NIGHTLY,
                                                                        "timezone": "Mars/X"}})
        assert bad_tz.status_code == 422 and "unknown time zone" in bad_tz.json()["message"]
        outside = api.post("/v1/pipelines", json={**spec, "aligned": {"dir": "/etc"}})
        assert outside.status_code == 403
        assert outside.json()["message"].startswith("aligned.dir: /etc resolves outside the allowed model roots")
        promote_out = api.post("/v1/pipelines", json={**spec, "promote": {"dir": "/tmp/x"}})
        assert promote_out.status_code == 403
        assert promote_out.json()["message"].startswith("promote.dir: /tmp/x resolves outside")
        inside = api.post("/v1/pipelines", json={**spec, "promote": {
            "dir": spec["aligned"]["dir"] + "/promoted"}})
        assert inside.status_code == 403 and "lies in the aligned source folder" in inside.text
        hooks_bad = api.post("/v1/pipelines", json={**spec, "webhooks": 5})
        assert hooks_bad.status_code == 422 and hooks_bad.json()["field"] == "webhooks"
        assert api.get("/v1/pipelines/nope").status_code == 404
        assert api.post("/v1/pipelines/nope/trigger").status_code == 404
        hooked = {**spec, "webhooks": [{"url": "http://127.0.0.1:9/hook"}]}
        created = api.post("/v1/pipelines", json=hooked)
        assert created.status_code == 201, created.text
        body = created.json()
        assert body["spec"]["webhooks"][0] == {"url": "http://127.0.0.1:9/hook", "has_secret": True,
                                              "events": body["spec"]["webhooks"][0]["events"]}
        shown = body.pop("webhook_secrets")  # a generated secret is shown once, here
        assert list(shown) == ["http://127.0.0.1:9/hook"] and shown[body["spec"]["webhooks"][0]["url"]].startswith("whsec_")
        assert "whsec_" not in json.dumps(body) and '"secret"' not in json.dumps(body)
        assert "whsec_" not in api.get("/v1/pipelines/nightly").text
        assert api.post("/v1/pipelines", json=hooked).status_code == 409
        # 02:00 in Paris is 01:00 UTC in winter
        due = datetime.fromisoformat(body["next_due_at"])
        assert (due.hour, due.minute) == (1, 0) and due > datetime.now(UTC)
    with stack.client("viewer") as viewer:
        assert viewer.get("/v1/pipelines").json()["count"] == 1
        assert viewer.post("/v1/pipelines/nightly/trigger").status_code == 403
    from service.db import pipelines as pipe_db
    from service.db import session_scope

    with session_scope(stack.settings.database()) as s:  # the secret is stored
        assert pipe_db.get_pipeline(s, "nightly").spec["webhooks"][0]["secret"].startswith("whsec_")
    with stack.client() as api:  # an update without the secret keeps it
        kept = api.put("/v1/pipelines/nightly", json={**hooked, "promote": {
            "dir": spec["promote"]["dir"], "margin": 0.5}})
        assert kept.status_code == 200 and kept.json()["spec"]["promote"]["margin"] == 0.5
    with session_scope(stack.settings.database()) as s:
        assert pipe_db.get_pipeline(s, "nightly").spec["webhooks"][0]["secret"].startswith("whsec_")


# ------------------------------------------------------------------ scheduling

def test_two_schedulers_start_a_due_run_exactly_once(pg_stack, tiny_spec, roots):
    import time_machine

    from service.db import pipelines as pipe_db
    from service.db import session_scope
    from service.pipelines.scheduler import Scheduler

    stack = pg_stack
    with stack.client() as api:
        created = api.post("/v1/pipelines", json=_pipeline(tiny_spec, roots))
        assert created.status_code == 201, created.text
    due = datetime.fromisoformat(created.json()["next_due_at"])
    schedulers = [Scheduler(stack.settings), Scheduler(stack.settings)]
    with time_machine.travel(due + timedelta(seconds=20), tick=False):
        now = datetime.now(UTC)
        assert schedulers[0].claim_due(now - timedelta(seconds=40)) == []  # not yet due
        barrier = threading.Barrier(2)
        claimed: list[list[str]] = []

        def go(s):
            barrier.wait()
            claimed.append(s.claim_due(now))

        threads = [threading.Thread(target=go, args=(s,)) for s in schedulers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(len(c) for c in claimed) == [0, 1]
        assert schedulers[0].claim_due(now) == [] and schedulers[1].claim_due(now) == []
    with session_scope(stack.settings.database()) as s:
        p = pipe_db.get_pipeline(s, "nightly")
        runs = pipe_db.list_runs(s, p.id)
        assert [(r.scheduled_for, r.trigger, r.status) for r in runs] == [
            (due, "schedule", "pending")]
        assert p.next_due_at == due + timedelta(days=1)
    # no complete checkpoint yet: the run is skipped, with the reason
    schedulers[1].start(runs[0].id, now)
    with session_scope(stack.settings.database()) as s:
        run = pipe_db.get_run(s, runs[0].id)
        assert run.status == "skipped" and "no complete checkpoint" in run.reason
    # a scheduler starts after three days without one: run_once runs the latest missed time
    with time_machine.travel(due + timedelta(days=3, hours=5), tick=False):
        now = datetime.now(UTC)
        [run_id] = Scheduler(stack.settings).claim_due(now)
    with session_scope(stack.settings.database()) as s:
        run = pipe_db.get_run(s, run_id)
        assert (run.scheduled_for, run.trigger, run.status) == (
            due + timedelta(days=3), "catch_up", "pending")
        p = pipe_db.get_pipeline(s, "nightly")
        p.spec = {**p.spec, "schedule": {**NIGHTLY, "missed": "skip"}}
    with time_machine.travel(due + timedelta(days=6, hours=5), tick=False):
        [run_id] = Scheduler(stack.settings).claim_due(datetime.now(UTC))
    with session_scope(stack.settings.database()) as s:
        run = pipe_db.get_run(s, run_id)
        assert run.status == "skipped" and run.reason.startswith("missed")
    # a running scheduler whose pass came late (slow webhooks, say) has missed nothing
    late = Scheduler(stack.settings)
    with time_machine.travel(due + timedelta(days=7, hours=2), tick=False):
        late.started = datetime.now(UTC) - timedelta(days=1)  # it has run all along
        [run_id] = late.claim_due(datetime.now(UTC))
    with session_scope(stack.settings.database()) as s:
        assert pipe_db.get_run(s, run_id).trigger == "schedule"
    # a run its scheduler left mid-step is failed after a while, with the reason
    with session_scope(stack.settings.database()) as s:
        assert pipe_db.move_run(s, run_id, "pending", "starting")
        pipe_db.get_run(s, run_id).status_changed_at = datetime.now(UTC) - timedelta(hours=1)
    assert late.reap(datetime.now(UTC)) == [run_id]
    with session_scope(stack.settings.database()) as s:
        run = pipe_db.get_run(s, run_id)
        assert run.status == "failed" and "stopped while the run was starting" in run.reason


# ------------------------------------------------------------------ decisions

def _finished_run(settings, pipeline_id: str, *, reward, tax, holdout_tax=None, spec=None,
                  status="succeeded", at=None, holdout_rewards=None, holdout_tax_se=None):
    """A run whose job has ended (the job row and result a worker writes)."""
    from service.db import jobs as job_db
    from service.db import pipelines as pipe_db
    from service.db import session_scope
    from service.status import JobStatus

    with session_scope(settings.database()) as s:
        job, _ = job_db.create_job(s, spec, n_trials=6)
        job_db.set_status(s, job.id, JobStatus.RUNNING)
        best = None if reward is None else {
            "trial": 3, "ratios": {"block0": 0.3, "block1": 0.8}, "reward": reward, "tax": tax,
            "holdout": {"reward": reward, "tax": holdout_tax if holdout_tax is not None else tax,
                        "tax_se": holdout_tax_se}}
        job.result = {"best": best, "best_uniform": {"ratio": 0.5, "reward": 0.0}, "gain": 0.1}
        if holdout_rewards is not None:  # the answer's holdout reward per prompt
            job.result["per_record"] = {"best": {"holdout_reward": holdout_rewards}}
        job.best_ratios = best and best["ratios"]
        job_db.set_status(s, job.id, JobStatus(status))
        run = pipe_db.claim_run(s, pipeline_id, at or datetime.now(UTC), "manual", "running")
        run.job_id = job.id
        return run.id, job.id


def _decided_run(settings, sched, pipeline_id: str, **kw) -> tuple:
    """A finished run (:func:`_finished_run`) through the scheduler's decision, its export
    done when it promotes: (id, status, decision, reason)."""
    from service.db import pipelines as pipe_db
    from service.db import session_scope

    run_id, job_id = _finished_run(settings, pipeline_id, **kw)
    sched.tick()
    with session_scope(settings.database()) as s:
        if pipe_db.get_run(s, run_id).status == "promoting":
            _export_done(settings, job_id)
    sched.tick()
    with session_scope(settings.database()) as s:
        r = pipe_db.get_run(s, run_id)
        return r.id, r.status, r.decision, r.reason


def _export_done(settings, job_id: str) -> None:
    """What the worker's export leaves: the folder and the job's export state."""
    from service.db import session_scope
    from service.db.models import Job

    with session_scope(settings.database()) as s:
        job = s.get(Job, job_id)
        Path(job.export_dir).mkdir(parents=True)
        (Path(job.export_dir) / "hma_manifest.json").write_text("{}")
        job.export_status = "succeeded"


def test_an_insignificant_paired_gain_over_the_champion_is_not_promoted(stack, tiny_spec,
                                                                          roots):
    """With per-record holdout rewards on both sides, the run must beat the champion prompt by
    prompt: its paired gain's lower bound (95 %, one-sided) must clear the margin."""
    from service.pipelines.scheduler import Scheduler

    spec = _pipeline(tiny_spec, roots, promote={"dir": str(roots[0] / "promoted" / "q")})
    with stack.client() as api:
        pid = api.post("/v1/pipelines", json=spec).json()["id"]
    settings, sched = stack.settings, Scheduler(stack.settings)
    job_spec = {**tiny_spec, "export": None}
    t0 = datetime.now(UTC)
    champion = [0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]

    def run(reward, rewards, minutes):
        r = _decided_run(settings, sched, pid, reward=reward, tax=0.1, spec=job_spec,
                         at=t0 + timedelta(minutes=minutes), holdout_rewards=rewards)
        return r[2:]

    assert run(1.0, champion, 1)[0] == "promoted"
    # a higher search reward, but on the holdout it wins two prompts and loses one: noise
    noisy = run(2.0, [1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0], 2)
    assert noisy[0] == "kept" and "lower bound" in noisy[1] and "paired over 8 prompts" in noisy[1]
    # better on every prompt: promoted, with the paired figures in its reason
    clear = run(2.0, [v + 1.0 for v in champion], 3)
    assert clear[0] == "promoted" and "holdout gain over the champion" in clear[1]
    assert "+1" in clear[1]


def test_promote_only_when_better_and_feasible_then_roll_back(stack, tiny_spec, roots):
    from service.db import pipelines as pipe_db
    from service.db import session_scope
    from service.pipelines.scheduler import Scheduler

    spec = _pipeline(tiny_spec, roots, promote={"dir": str(roots[0] / "promoted" / "p"),
                                                "margin": 0.1})
    with stack.client() as api:
        pid = api.post("/v1/pipelines", json=spec).json()["id"]
    settings, sched = stack.settings, Scheduler(stack.settings)
    job_spec = {**tiny_spec, "export": None}
    t0 = datetime.now(UTC)

    def run(reward, tax, minutes, **kw):
        return _decided_run(settings, sched, pid, reward=reward, tax=tax, spec=job_spec,
                            at=t0 + timedelta(minutes=minutes), **kw)

    alias = roots[0] / "promoted" / "p" / "current"
    first = run(1.0, 0.1, 1)
    assert first[1:] == ("succeeded", "promoted", "no champion yet")
    assert alias.resolve() == (roots[0] / "promoted" / "p" / first[0]).resolve()
    worse = run(1.05, 0.1, 2)  # better, but not by the margin
    assert worse[2] == "kept" and "does not beat the champion's 1" in worse[3]
    infeasible = run(None, None, 3)
    assert infeasible[2] == "kept" and "no feasible merge" in infeasible[3]
    holdout_over = run(5.0, 0.1, 4, holdout_tax=0.9)
    assert holdout_over[2] == "kept" and "holdout tax 0.9 is over the budget" in holdout_over[3]
    # over the budget 0.5 by more than its noise: 0.6 - 1.645 * 0.05 = 0.518 at 95 %
    beyond = run(5.0, 0.1, 4.5, holdout_tax=0.6, holdout_tax_se=0.05)
    assert beyond[2] == "kept" and "beyond its noise (SE 0.05, lower bound 0.5178" in beyond[3]
    failed = run(5.0, 0.1, 5, status="failed")
    assert failed[1] == "failed" and failed[2] is None
    # a little over the budget, within its noise (0.51 - 1.645 * 0.015 < 0.5): the search's
    # feasibility is not refuted, so it is promoted
    second = run(1.5, 0.1, 6, holdout_tax=0.51, holdout_tax_se=0.015)
    assert second[1:3] == ("succeeded", "promoted")
    assert alias.resolve().name == second[0]
    with stack.client() as api:
        promos = api.get("/v1/pipelines/nightly/promotions").json()["data"]
        assert [(p["run_id"], p["action"], p["previous_run_id"]) for p in promos] == [
            (second[0], "promote", first[0]), (first[0], "promote", None)]
        back = api.post("/v1/pipelines/nightly/rollback")
        assert back.status_code == 202 and back.json()["champion_run"] == first[0]
        assert alias.resolve().name == second[0]  # the scheduler switches it
        sched.tick()
        assert alias.resolve().name == first[0]
        assert api.get("/v1/pipelines/nightly").json()["champion_run_id"] == first[0]
        again = api.post("/v1/pipelines/nightly/rollback")
        assert again.status_code == 409 and "first champion" in again.json()["message"]
        runs = api.get("/v1/pipelines/nightly/runs").json()["data"]
        assert [r["decision"] for r in runs] == ["promoted", None, "kept", "kept", "kept", "kept",
                                                 "promoted"]
    # a better run whose export worker died (the recovery marks the export failed): the run
    # fails with that reason instead of staying promoting, and the alias stays
    lost_id, lost_job = _finished_run(settings, pid, reward=9.0, tax=0.1, spec=job_spec,
                                      at=t0 + timedelta(minutes=20))
    sched.tick()
    from service.db.models import Job

    with session_scope(settings.database()) as s:
        assert pipe_db.get_run(s, lost_id).status == "promoting"
        job = s.get(Job, lost_job)
        job.export_status, job.export_error = "failed", "the worker exporting it (w) died"
    sched.tick()
    with session_scope(settings.database()) as s:
        lost = pipe_db.get_run(s, lost_id)
        assert lost.status == "failed" and "the worker exporting it (w) died" in lost.reason
    assert alias.resolve().name == first[0]
    # two runs decided against the same champion: the second to switch must beat the first
    a_id, a_job = _finished_run(settings, pid, reward=3.0, tax=0.1, spec=job_spec,
                                at=t0 + timedelta(minutes=8))
    b_id, b_job = _finished_run(settings, pid, reward=2.5, tax=0.1, spec=job_spec,
                                at=t0 + timedelta(minutes=9))
    sched.tick()  # both promoting
    _export_done(settings, a_job)
    _export_done(settings, b_job)
    sched.tick()
    with session_scope(settings.database()) as s:
        a, b = pipe_db.get_run(s, a_id), pipe_db.get_run(s, b_id)
        assert a.decision == "promoted" and b.decision == "kept"
        assert f"run {a_id} was promoted while this one was exported" in b.reason
    assert alias.resolve().name == a_id
    # the tax data changed (another budget): the champion is re-measured on the new data
    from service.db import jobs as job_db
    from service.status import JobStatus

    changed = {**job_spec, "tax": {**job_spec["tax"], "budget": 0.6}}
    run_id, job_id = _finished_run(settings, pid, reward=1.2, tax=0.1, spec=changed,
                                   at=t0 + timedelta(minutes=7))
    sched.tick()
    with session_scope(settings.database()) as s:
        run = pipe_db.get_run(s, run_id)
        assert run.status == "remeasuring"
        champ = job_db.get_job(s, run.champion_job_id)
        assert champ.spec["aligned_model"] == str(roots[0] / "promoted" / "p" / a_id)
        assert champ.spec["search"]["uniform_grid"] == [1.0] and champ.spec["tax"]["budget"] == 0.6
        # what a worker leaves: the α = 1 point (the champion's merge itself) on the new data
        job_db.set_status(s, champ.id, JobStatus.RUNNING)
        job_db.add_trial(s, champ.id, number=0, kind="uniform", state="complete",
                         ratios={"block0": 1.0, "block1": 1.0}, reward=1.15, tax=0.2,
                         feasible=True, stage=2, metrics={}, task_tax={}, uniform_ratio=1.0,
                         merge_seconds=0.0, eval_seconds=0.0)
        job_db.set_status(s, champ.id, JobStatus.SUCCEEDED)
    sched.tick()  # 1.2 does not beat 1.15 by more than 0.1
    with session_scope(settings.database()) as s:
        run = pipe_db.get_run(s, run_id)
        assert (run.decision, run.champion_reward) == ("kept", 1.15)
        assert "re-measured on this data" in run.reason


# ------------------------------------------------------------------ webhooks

class _Receiver:
    """A local HTTP receiver that fails the first ``fail`` deliveries of each message."""

    def __init__(self, fail: int = 0):
        self.got: list[tuple[dict, bytes]] = []
        self.fail, self.seen = fail, {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                n = outer.seen[headers["webhook-id"]] = outer.seen.get(headers["webhook-id"], 0) + 1
                outer.got.append((headers, body))
                self.send_response(500 if n <= outer.fail else 204)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"


def test_webhooks_are_signed_and_retried(stack, tiny_spec, roots):
    from standardwebhooks.webhooks import Webhook

    from service.db import pipelines as pipe_db
    from service.db import session_scope
    from service.pipelines import webhooks
    from service.pipelines.scheduler import Scheduler

    ok, flaky = _Receiver(), _Receiver(fail=2)
    spec = _pipeline(tiny_spec, roots, webhooks=[
        {"url": ok.url}, {"url": flaky.url, "events": ["run.skipped"]}])
    with stack.client() as api:
        api.post("/v1/pipelines", json=spec).raise_for_status()
        api.post("/v1/pipelines/nightly/trigger").raise_for_status()
    settings = stack.settings.model_copy(update={"webhook_backoff_seconds": [0.2, 0.2]})
    sched = Scheduler(settings)
    sched.tick()  # no checkpoint in rlhf/: skipped -> run.skipped to both hooks
    with session_scope(settings.database()) as s:
        secrets = {h["url"]: h["secret"] for h in pipe_db.get_pipeline(s, "nightly").spec["webhooks"]}
    assert len(ok.got) == 1 and len(flaky.got) == 1
    headers, body = ok.got[0]
    payload = Webhook(secrets[ok.url]).verify(body, headers)  # raises on a bad signature
    assert payload["type"] == "run.skipped" and payload["data"]["pipeline"] == "nightly"
    assert "no complete checkpoint" in payload["data"]["reason"]
    for _ in range(2):  # the two retries, after their backoff
        time.sleep(0.3)
        webhooks.deliver_due(settings)
    assert len(flaky.got) == 3 and len({h["webhook-id"] for h, _ in flaky.got}) == 1
    Webhook(secrets[flaky.url]).verify(flaky.got[2][1], flaky.got[2][0])
    with stack.client() as api:
        log = api.get("/v1/pipelines/nightly/deliveries").json()["data"]
    by_url = {d["url"]: d for d in log}
    assert by_url[flaky.url]["status"] == "delivered" and by_url[flaky.url]["attempts"] == 3
    assert by_url[ok.url]["attempts"] == 1 and "secret" not in json.dumps(log)


# ------------------------------------------------------------------ end to end

def _world_job(world: Path, roots) -> dict:
    """The reference world's job with its models and data copied into the test roots (the
    aligned model stays out: the pipeline's source provides it), 15 trials."""
    from service.spec import load_spec

    models, data = roots
    for name in ("base", "reward"):
        shutil.copytree(world / "models" / name, models / name)
    shutil.copytree(world / "data", data / "world")
    spec = load_spec(world / "spec.yaml", resolve=False).model_dump(mode="json")
    spec.update(base_model=str(models / "base"), aligned_model=str(models / "base"), export=None)
    spec["reward"].update(model=str(models / "reward"),
                          prompts=spec["reward"]["prompts"].replace("data/", f"{data}/world/"))
    for task in spec["tax"]["tasks"]:
        task["data"] = task["data"].replace("data/", f"{data}/world/")
    spec["search"]["n_trials"] = 15  # 11 uniform points, then 4 (or 3 warm + 1 more)
    return spec


def test_nightly_run_end_to_end_with_a_worker(pg_stack, world, roots):
    """A checkpoint of the reference world appears in the source folder; the run searches
    it with a real worker and is promoted; the same checkpoint next night is skipped; a new
    checkpoint's run (triggered from the CLI) is warm started with the first run's best."""
    import time_machine

    from service.db import jobs as job_db
    from service.db import pipelines as pipe_db
    from service.db import session_scope
    from service.pipelines.scheduler import Scheduler, start_thread

    stack = pg_stack
    models, _ = roots
    job = _world_job(world, roots)
    with stack.client() as api:
        made = api.post("/v1/pipelines", json=_pipeline(job, roots))
        assert made.status_code == 201, made.text
        created = made.json()
    due = datetime.fromisoformat(created["next_due_at"])
    first = _checkpoint(world / "models" / "aligned", models / "rlhf" / "ckpt-1")
    stack.start_worker()
    sched = Scheduler(stack.settings)

    def night(at: datetime) -> dict:
        with time_machine.travel(at, tick=True):
            [run_id] = sched.claim_due(datetime.now(UTC))
        deadline = time.monotonic() + 240
        while True:
            sched.tick()
            with session_scope(stack.settings.database()) as s:
                run = pipe_db.get_run(s, run_id)
                if run.status in ("succeeded", "skipped", "failed"):
                    return {c.name: getattr(run, c.name) for c in run.__table__.columns}
            assert time.monotonic() < deadline, stack.worker_log()[-3000:]
            time.sleep(0.5)

    one = night(due + timedelta(seconds=5))
    assert one["status"] == "succeeded", (one, stack.worker_log()[-3000:])
    assert one["checkpoint"] == str(first) and one["warm_start"] is None
    assert one["decision"] == "promoted", one["reason"]
    current = models / "promoted" / "nightly" / "current"
    assert (current / "hma_manifest.json").is_file() and (current / "config.json").is_file()
    # the same checkpoint next night: skipped
    two = night(due + timedelta(days=1, seconds=5))
    assert two["status"] == "skipped" and "already processed" in two["reason"]
    # a new checkpoint, run by hand from the CLI while a scheduler runs: warm started with
    # the first run's best ratios; exit 0 (a feasible merge), and whether it was promoted
    _checkpoint(first, models / "rlhf" / "ckpt-2", age=1800)
    stop = threading.Event()
    start_thread(stack.settings.model_copy(update={"scheduler_seconds": 0.3}), stop)
    try:
        out = _cli(stack, "pipeline", "trigger", "nightly", "--wait", timeout=240)
    finally:
        stop.set()
    assert out.returncode == 0, (out.stdout, out.stderr, stack.worker_log()[-2000:])
    assert "promoted: " in out.stdout
    with session_scope(stack.settings.database()) as s:
        p = pipe_db.get_pipeline(s, "nightly")
        [three] = [r for r in pipe_db.list_runs(s, p.id) if r.trigger == "manual"]
        three = {c.name: getattr(three, c.name) for c in three.__table__.columns}
    assert three["status"] == "succeeded" and three["warm_start"]["from_run"] == one["id"]
    assert three["checkpoint"].endswith("ckpt-2")
    with session_scope(stack.settings.database()) as s:
        job1 = job_db.get_job(s, one["job_id"])
        job3 = job_db.get_job(s, three["job_id"])
        best1 = job1.result["best"]["ratios"]
        expected = [{k: pytest.approx(v * scale, abs=1e-6) for k, v in best1.items()}
                    for scale in (1.0, 0.95, 0.9)]
        assert job3.spec["search"]["warm_start"] == expected
        assert job3.spec["search"]["warm_start_refine"] == 3  # the pipelines' default
        warm = sorted((t for t in job_db.list_trials(s, job3.id, limit=100)[0]
                       if t.kind == "warm"), key=lambda t: t.number)
        assert [t.ratios for t in warm[:3]] == expected
        slot = next(k for k, v in best1.items() if v > 0)
        for t in warm[3:]:  # steps along the previous best's ray toward the budget
            scale = t.ratios[slot] / best1[slot]
            assert t.ratios == {k: pytest.approx(v * scale, abs=1e-6) for k, v in best1.items()}


def _cli(stack, *argv: str, timeout: float = 60):
    import subprocess
    import sys

    from tests.service.conftest import settings_env

    return subprocess.run([sys.executable, "-m", "service.cli", *argv, "--server", stack.url,
                           "--token", stack.tokens["operator"]], env=settings_env(stack.settings),
                          capture_output=True, text=True, timeout=timeout)


def test_pipeline_cli(stack, tiny_spec, roots, tmp_path):
    import yaml

    from service.pipelines.scheduler import start_thread

    spec_file = tmp_path / "pipeline.yaml"
    spec_file.write_text(yaml.safe_dump(_pipeline(tiny_spec, roots)))
    made = _cli(stack, "pipeline", "create", str(spec_file))
    assert made.returncode == 0 and made.stdout.strip() == "nightly", made.stderr
    listed = _cli(stack, "pipeline", "list")
    assert listed.returncode == 0 and "nightly" in listed.stdout and "0 2 * * *" in listed.stdout
    stop = threading.Event()
    start_thread(stack.settings.model_copy(update={"scheduler_seconds": 0.3}), stop)
    try:  # no checkpoint yet: the run is skipped, exit 12 (no result)
        waited = _cli(stack, "pipeline", "trigger", "nightly", "--wait")
    finally:
        stop.set()
    assert waited.returncode == 12, (waited.stdout, waited.stderr)
    assert "skipped" in waited.stdout and "no complete checkpoint" in waited.stdout
    runs = _cli(stack, "pipeline", "runs", "nightly")
    assert runs.returncode == 0 and "manual" in runs.stdout and "skipped" in runs.stdout
    back = _cli(stack, "pipeline", "rollback", "nightly")
    assert back.returncode != 0 and "has no champion to roll back" in back.stderr
    missing = _cli(stack, "pipeline", "trigger", "nope", "--wait")
    assert missing.returncode == 3 and "no pipeline 'nope'" in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**_pipeline(tiny_spec, roots, name="x"),
                                   "schedule": {"cron": "every night"}}))
    refused = _cli(stack, "pipeline", "create", str(bad))
    assert refused.returncode != 0 and "schedule.cron" in refused.stderr
