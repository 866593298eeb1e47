"""The REST API against a real database (SQLite and PostgreSQL) and a real Redis.

No worker runs here: these tests cover what the API itself decides (auth, validation, roots,
idempotency, cancel of a queued job, limits, probes). tests/service/test_e2e.py runs workers.
"""

from __future__ import annotations

import json
import os

import pytest


def test_submit_get_list_and_queue(stack, tiny_spec):
    import redis
    from rq import Queue

    with stack.client() as c:
        r = c.post("/v1/jobs", json=tiny_spec)
        assert r.status_code == 201, r.text
        job = r.json()
        assert job["status"] == "queued" and job["submitted_by"] == "test-operator"
        assert r.headers["location"] == f"/v1/jobs/{job['id']}"
        assert job["progress"] == {"trials_finished": 0, "trials_pruned": 0, "n_trials": 6,
                                   "fraction": 0.0}
        # paths are stored resolved
        assert job["spec"]["base_model"] == os.path.realpath(tiny_spec["base_model"])
        got = c.get(f"/v1/jobs/{job['id']}").json()
        assert got["id"] == job["id"] and got["best"] is None and got["gain"] is None
        listed = c.get("/v1/jobs", params={"status": "queued"}).json()
        assert listed["count"] == 1 and listed["data"][0]["id"] == job["id"]
        assert c.get("/v1/jobs", params={"status": "running"}).json()["count"] == 0
        assert c.get("/v1/jobs", params={"q": "tin"}).json()["count"] == 1
        assert c.get("/v1/jobs", params={"q": "nope"}).json()["count"] == 0
        assert c.get(f"/v1/jobs/{job['id']}/trials").json() == {"data": [], "count": 0}
        best = c.get(f"/v1/jobs/{job['id']}/best")
        assert best.status_code == 404 and "no feasible trial" in best.json()["message"]
    # the run is in the RQ queue under its id
    q = Queue(stack.settings.queue_name, connection=redis.Redis.from_url(stack.settings.redis_url))
    assert q.job_ids == [f"{job['id']}-1"]


def test_paging_of_jobs(stack, tiny_spec):
    with stack.client() as c:
        ids = [c.post("/v1/jobs", json={**tiny_spec, "name": f"job{i}"}).json()["id"]
               for i in range(5)]
        page1 = c.get("/v1/jobs", params={"limit": 2}).json()
        page3 = c.get("/v1/jobs", params={"limit": 2, "offset": 4}).json()
    assert page1["count"] == 5 and len(page1["data"]) == 2 and len(page3["data"]) == 1
    seen = [j["id"] for j in page1["data"]] + [j["id"] for j in page3["data"]]
    assert seen[0] == ids[-1] and seen[-1] == ids[0]  # newest first


@pytest.mark.parametrize("role,method,path,code", [
    (None, "GET", "/v1/jobs", 401),
    (None, "POST", "/v1/jobs", 401),
    ("viewer", "POST", "/v1/jobs", 403),
    ("viewer", "POST", "/v1/jobs/x/cancel", 403),
    ("viewer", "POST", "/v1/jobs/x/export", 403),
    ("viewer", "GET", "/v1/jobs", 200),
    ("operator", "GET", "/v1/jobs/x", 404),
])
def test_auth_roles(stack, tiny_spec, role, method, path, code):
    with stack.client(role) as c:
        r = c.request(method, path, json=tiny_spec if method == "POST" else None)
    assert r.status_code == code, r.text
    if code in (401, 403):
        body = r.json()
        assert body["error"] in ("unauthenticated", "forbidden") and body["message"]
        if code == 403:
            assert "operator role" in body["message"]


def test_wrong_and_revoked_tokens(stack):
    from service.db import session_scope
    from service.db.models import Token
    from service.db.tokens import revoke_token
    from sqlalchemy import select

    import httpx

    r = httpx.get(f"{stack.url}/v1/jobs", headers={"Authorization": "Bearer hmaopt_wrong"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    with session_scope(stack.settings.database()) as s:
        row = s.scalar(select(Token).where(Token.name == "test-viewer"))
        assert row.token_hash != stack.tokens["viewer"]  # stored hashed
        revoke_token(s, row.id)
    with stack.client("viewer") as c:
        assert c.get("/v1/jobs").status_code == 401


@pytest.mark.parametrize("edit,field,fragment", [
    (lambda s: s["tax"].update(budget=-1), "tax.budget", "greater than or equal to 0"),
    (lambda s: s["search"].update(sampler="annealing"), "search.sampler", "annealing"),
    (lambda s: s.pop("reward"), "reward", "field required"),
    (lambda s: s.update(colour="red"), "colour", "Extra inputs"),
    (lambda s: s["search"].update(n_trials=3), "search.n_trials", "must exceed"),
    (lambda s: s.update(base_model="nope/base"), "base_model", "does not exist"),
])
def test_bad_spec_gets_422_naming_the_field(stack, tiny_spec, edit, field, fragment):
    edit(tiny_spec)
    with stack.client() as c:
        r = c.post("/v1/jobs", json=tiny_spec)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["field"] == field and fragment in body["message"], body


def test_paths_outside_roots_are_refused(stack, tiny_spec, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.jsonl").write_text('{"prompt": "x"}\n')
    models, data = stack.settings.model_roots[0], stack.settings.data_roots[0]
    cases = [
        ("base_model", str(outside)),                                   # absolute, outside
        ("base_model", "../elsewhere"),                                 # relative escape
        ("reward.data", str(models / "base" / "config.json")),          # a model root is not a data root
    ]
    link = data / "link"
    link.symlink_to(outside)                                            # a symlink out of the root
    cases.append(("reward.data", str(link / "secret.jsonl")))
    with stack.client() as c:
        for field, value in cases:
            spec = json.loads(json.dumps(tiny_spec))
            if field == "base_model":
                spec["base_model"] = value
            else:
                spec["reward"]["data"] = value
            r = c.post("/v1/jobs", json=spec)
            assert r.status_code == 403, (field, value, r.text)
            message = r.json()["message"]
            assert field in message and ("outside the allowed" in message
                                         or "climbs out" in message), message
            assert str(outside) not in message or value == str(outside)  # no disclosure
        spec = json.loads(json.dumps(tiny_spec))
        spec["export"] = {"dir": str(outside / "out")}
        r = c.post("/v1/jobs", json=spec)
        assert r.status_code == 403 and "export.dir" in r.json()["message"]
        for bad in (str(models), str(models / "base"), str(models / "base" / "sub")):
            spec["export"] = {"dir": bad}  # a root itself, or an input model: never
            r = c.post("/v1/jobs", json=spec)
            assert r.status_code == 403 and "export.dir" in r.json()["message"], (bad, r.text)
        # a model folder whose files are links: inside the roots is fine, one outside is not
        linked = models / "linked"
        linked.mkdir()
        for f in (models / "base").iterdir():
            (linked / f.name).symlink_to(f)
        spec = json.loads(json.dumps(tiny_spec))
        spec["base_model"] = str(linked)
        assert c.post("/v1/jobs", json=spec).status_code == 201
        (linked / "config.json").unlink()
        (outside / "config.json").write_text((models / "base" / "config.json").read_text())
        (linked / "config.json").symlink_to(outside / "config.json")
        r = c.post("/v1/jobs", json=spec)
        assert r.status_code == 403, r.text
        message = r.json()["message"]
        assert message.startswith("base_model: ") and "linked/config.json is a link" in message
        assert str(outside) not in message, message
        # a linked folder inside the roots is walked too, and a weight index may name plain
        # file names only (a shard path is joined onto the folder when loaded)
        (linked / "config.json").unlink()
        (linked / "config.json").symlink_to(models / "base" / "config.json")
        hidden = models / "hidden"
        hidden.mkdir()
        (hidden / "secret.json").symlink_to(outside / "config.json")
        (linked / "extra").symlink_to(hidden)
        r = c.post("/v1/jobs", json=spec)
        assert r.status_code == 403 and "linked/extra/secret.json is a link" in r.text, r.text
        (linked / "extra").unlink()
        index = {"metadata": {}, "weight_map": {"lm_head.weight": "../elsewhere/x.safetensors"}}
        (linked / "model.safetensors.index.json").write_text(json.dumps(index))
        r = c.post("/v1/jobs", json=spec)
        assert r.status_code == 403 and "names shards outside its folder" in r.text, r.text
        # a relative path inside the roots resolves there
        spec = json.loads(json.dumps(tiny_spec))
        spec["base_model"] = "base"
        r = c.post("/v1/jobs", json=spec)
        assert r.status_code == 201, r.text
        assert r.json()["spec"]["base_model"] == os.path.realpath(models / "base")


def test_python_reward_needs_the_admin_setting(stack, tiny_spec):
    tiny_spec["reward"] = {"type": "python", "function": "os:getcwd"}
    with stack.client() as c:
        r = c.post("/v1/jobs", json=tiny_spec)
    assert r.status_code == 403 and "HMAOPT_ALLOW_PYTHON_REWARD" in r.json()["message"]


def test_idempotent_resubmission(stack, tiny_spec):
    with stack.client() as c:
        first = c.post("/v1/jobs", json=tiny_spec, headers={"Idempotency-Key": "k1"})
        again = c.post("/v1/jobs", json=tiny_spec, headers={"Idempotency-Key": "k1"})
        other = c.post("/v1/jobs", json={**tiny_spec, "name": "other"},
                       headers={"Idempotency-Key": "k1"})
        fresh = c.post("/v1/jobs", json=tiny_spec, headers={"Idempotency-Key": "k2"})
        assert c.get("/v1/jobs").json()["count"] == 2
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert other.status_code == 409 and "Idempotency-Key" in other.json()["message"]
    assert fresh.status_code == 201 and fresh.json()["id"] != first.json()["id"]


def test_cancel_a_queued_job(stack, tiny_spec):
    with stack.client() as c:
        job = c.post("/v1/jobs", json=tiny_spec).json()
        r = c.post(f"/v1/jobs/{job['id']}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        assert r.json()["finished_at"] is not None
        again = c.post(f"/v1/jobs/{job['id']}/cancel")
        assert again.status_code == 409 and "already cancelled" in again.json()["message"]


def test_export_needs_a_feasible_trial(stack, tiny_spec):
    with stack.client() as c:
        job = c.post("/v1/jobs", json=tiny_spec).json()
        r = c.post(f"/v1/jobs/{job['id']}/export", json={"dir": "out"})
        assert r.status_code == 409 and "no feasible trial" in r.json()["message"]
        r = c.post(f"/v1/jobs/{job['id']}/export")
        assert r.status_code == 422 and r.json()["field"] == "dir"


def test_request_size_limit(stack, tiny_spec):
    tiny_spec["name"] = "x" * 100
    tiny_spec["padding"] = "y" * (stack.settings.max_request_bytes + 10)
    with stack.client() as c:
        r = c.post("/v1/jobs", json=tiny_spec)
        assert r.status_code == 413 and "HMAOPT_MAX_REQUEST_BYTES" in r.json()["message"]
        body = json.dumps(tiny_spec).encode()
        chunked = c.post("/v1/jobs", content=(body[i:i + 65536]  # no Content-Length
                                              for i in range(0, len(body), 65536)),
                         headers={"Content-Type": "application/json"})
        assert chunked.status_code == 413, chunked.text


def test_probes_metrics_and_openapi(stack, tiny_spec):
    import httpx

    assert httpx.get(f"{stack.url}/healthz").json()["status"] == "ok"
    ready = httpx.get(f"{stack.url}/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "redis": "ok"}
    with stack.client() as c:
        c.post("/v1/jobs", json=tiny_spec)
        c.get("/v1/jobs")
    text = httpx.get(f"{stack.url}/metrics").text
    assert 'hmaopt_jobs{status="queued"} 1.0' in text
    assert 'hmaopt_http_requests_total{method="POST",route="/v1/jobs",status="201"} 1.0' in text
    assert "hmaopt_queue_length 1.0" in text
    doc = httpx.get(f"{stack.url}/openapi.json").json()
    for path in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel",
                 "/v1/jobs/{job_id}/trials", "/v1/jobs/{job_id}/best", "/v1/jobs/{job_id}/pareto",
                 "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/export", "/healthz", "/readyz",
                 "/metrics"):
        assert path in doc["paths"], path
    assert doc["components"]["schemas"]["JobSpec"].get("examples"), "JobSpec has no example"
    assert "weight on the ALIGNED" in doc["info"]["description"]


def test_readyz_reports_an_old_schema(db_url, redis_url, tmp_path, roots):
    import httpx

    from service.api.app import create_app
    from service.db.migrate import upgrade
    from service.embedded import ApiThread
    from tests.service.conftest import make_settings

    settings = make_settings(db_url, redis_url, tmp_path / "home", roots)
    with pytest.raises(Exception, match="hmaopt db upgrade"):
        ApiThread(create_app(settings, maintenance=False)).start(timeout=10)
    upgrade(settings.database())
    api = ApiThread(create_app(settings, maintenance=False))
    url = api.start()
    try:
        assert httpx.get(f"{url}/readyz").status_code == 200
        from sqlalchemy import text

        from service.db.session import get_engine

        with get_engine(settings.database()).begin() as conn:  # as if an older release
            conn.execute(text("DELETE FROM hmaopt_alembic_version"))
        r = httpx.get(f"{url}/readyz")
        assert r.status_code == 503 and r.json()["status"] == "unavailable"
        assert "hmaopt db upgrade" in r.json()["checks"]["database"]
        assert r.json()["checks"]["redis"] == "ok"
    finally:
        api.stop()


def test_events_errors_come_before_the_stream(stack, tiny_spec):
    with stack.client("viewer") as c:
        r = c.get("/v1/jobs/nope/events")
        assert r.status_code == 404 and r.json()["error"] == "not_found"
    with stack.client() as c:
        job = c.post("/v1/jobs", json=tiny_spec).json()
        r = c.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "garbage"})
        assert r.status_code == 422 and r.json()["field"] == "Last-Event-ID"
        c.post(f"/v1/jobs/{job['id']}/cancel")
        with c.stream("GET", f"/v1/jobs/{job['id']}/events") as r:  # a final job: snapshot
            assert r.status_code == 200
            body = r.read().decode()
    assert body.startswith("event: job") and '"status":"cancelled"' in body.replace(" ", "")


def test_the_api_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, service.api.app, service.cli, service.queue, service.embedded;"
            "print(sorted(m for m in ('torch', 'transformers', 'optuna') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_openapi_lists_the_state_enums(stack):
    import httpx

    from service.status import (DeliveryStatus, ExportStatus, JobStatus, PipelineRunStatus,
                                TrialStatus, WorkerState)

    schemas = httpx.get(f"{stack.url}/openapi.json").json()["components"]["schemas"]
    for enum in (JobStatus, PipelineRunStatus, ExportStatus, WorkerState, TrialStatus,
                 DeliveryStatus):
        assert schemas[enum.__name__]["enum"] == [e.value for e in enum], enum.__name__
    used = {("JobSummary", "status"): "JobStatus", ("RunOut", "status"): "PipelineRunStatus",
            ("WorkerPublic", "state"): "WorkerState", ("TrialPublic", "state"): "TrialStatus",
            ("DeliveryOut", "status"): "DeliveryStatus"}
    for (shape, field), enum_name in used.items():
        prop = schemas[shape]["properties"][field]
        assert prop.get("$ref", "").endswith(f"/{enum_name}"), (shape, field, prop)
    export = schemas["ExportState"]["properties"]["status"]["anyOf"]
    assert {"$ref": "#/components/schemas/ExportStatus"} in export
