"""The dashboard's sign-in, cookies, CSRF and jobs page, over real HTTP (httpx).

Browser tests (headless Chromium) come with the job and compare pages.
"""

from __future__ import annotations

import re

import httpx


def _signin(stack, role: str) -> httpx.Client:
    c = httpx.Client(base_url=stack.url, timeout=30)
    r = c.post("/ui/signin", data={"token": stack.tokens[role], "next": "/ui/jobs"})
    assert r.status_code == 303 and r.headers["location"] == "/ui/jobs", r.text
    return c


def test_signin_cookies_and_the_jobs_page(stack, tiny_spec):
    with stack.client() as api:
        job = api.post("/v1/jobs", json=tiny_spec).json()
    anon = httpx.Client(base_url=stack.url, timeout=30)
    assert anon.get("/").headers["location"] == "/ui/jobs"
    r = anon.get("/ui/jobs")
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/signin")
    wrong = anon.post("/ui/signin", data={"token": "hmaopt_wrong"})
    assert wrong.status_code == 401 and "Unknown or revoked token" in wrong.text
    assert "hmaopt_session" not in wrong.cookies

    r = anon.post("/ui/signin", data={"token": stack.tokens["viewer"], "next": "//evil.example"})
    assert r.headers["location"] == "/ui/jobs"  # no open redirect
    cookies = r.headers.get_list("set-cookie")
    session = next(c for c in cookies if c.startswith("hmaopt_session="))
    csrf = next(c for c in cookies if c.startswith("hmaopt_csrf="))
    assert "HttpOnly" in session and "SameSite=strict" in session
    assert "HttpOnly" not in csrf and "SameSite=strict" in csrf

    page = anon.get("/ui/jobs")
    assert page.status_code == 200
    assert tiny_spec["name"] in page.text and job["id"] in page.text and "queued" in page.text
    assert "weight on the aligned model" in page.text
    assert anon.get("/ui/jobs", params={"status": "running"}).text.count(job["id"]) == 0
    assert job["id"] in anon.get("/ui/jobs", params={"q": tiny_spec["name"]}).text
    # every asset is local: no CDN
    assert not re.findall(r'(?:src|href)="(?:https?:)?//', page.text)
    assert anon.get("/ui/static/hmaopt.css").status_code == 200


def test_cookie_mutations_need_csrf_and_the_role(stack, tiny_spec):
    with stack.client() as api:
        job = api.post("/v1/jobs", json=tiny_spec).json()
    viewer = _signin(stack, "viewer")
    assert viewer.get(f"/v1/jobs/{job['id']}").status_code == 200  # reads by cookie
    token = viewer.cookies["hmaopt_csrf"]
    r = viewer.post(f"/v1/jobs/{job['id']}/cancel", headers={"X-CSRF-Token": token})
    assert r.status_code == 403 and "operator role" in r.json()["message"]

    operator = _signin(stack, "operator")
    r = operator.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 403 and "CSRF" in r.json()["message"]
    r = operator.post(f"/v1/jobs/{job['id']}/cancel", headers={"X-CSRF-Token": "forged"})
    assert r.status_code == 403 and "CSRF" in r.json()["message"]
    r = operator.post(f"/v1/jobs/{job['id']}/cancel",
                      headers={"X-CSRF-Token": operator.cookies["hmaopt_csrf"]})
    assert r.status_code == 200 and r.json()["status"] == "cancelled"

    # sign-out is a mutation too
    assert operator.post("/ui/signout", data={"csrf": "forged"}).status_code == 403
    out = operator.post("/ui/signout", data={"csrf": operator.cookies["hmaopt_csrf"]})
    assert out.status_code == 303 and out.headers["location"] == "/ui/signin"
    assert "hmaopt_session" not in operator.cookies
    assert operator.get("/ui/jobs").status_code == 303


def test_compressed_assets_and_points_but_never_the_event_stream(stack, tiny_spec):
    from service.db import jobs as job_db
    from service.db import session_scope

    with stack.client() as api:
        job = api.post("/v1/jobs", json=tiny_spec).json()
    with session_scope(stack.settings.database()) as s:
        for n in range(200):
            job_db.add_trial(s, job["id"], number=n, kind="search", state="complete",
                             ratios={"block0": 0.5, "block1": 0.5}, reward=n / 7, tax=n / 1000,
                             feasible=True, stage=2, metrics={}, task_tax={},
                             uniform_ratio=None, merge_seconds=0.0, eval_seconds=0.0)
    from service import queue

    c = _signin(stack, "viewer")
    last = queue.publish(stack.settings, job["id"], "status", {"status": "queued"})
    assert c.get(f"/v1/jobs/{job['id']}/points").json()["cursor"] == last
    js = c.get("/ui/vendor/plotly.min.js", headers={"Accept-Encoding": "gzip"})
    assert js.headers["content-encoding"] == "gzip"
    wire = int(js.headers["content-length"])
    assert wire < len(js.content) / 2 and js.text.lstrip().startswith("/**")  # httpx inflated it
    again = c.get("/ui/vendor/plotly.min.js", headers={"If-None-Match": js.headers["etag"]})
    assert again.status_code == 304 and not again.content
    plain = c.get("/ui/vendor/plotly.min.js", headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers and plain.content == js.content
    points = c.get(f"/v1/jobs/{job['id']}/points", headers={"Accept-Encoding": "gzip"})
    assert points.headers["content-encoding"] == "gzip"
    body = points.json()
    assert body["count"] == 200 and body["number"] == list(range(200))
    assert body["reward"][1] == float(f"{1 / 7:.6g}")  # 6 significant digits
    with c.stream("GET", f"/v1/jobs/{job['id']}/events",
                  headers={"Accept-Encoding": "gzip"}) as events:
        assert events.headers["content-type"].startswith("text/event-stream")
        assert "content-encoding" not in events.headers
    missing = c.get(f"/v1/jobs/{job['id']}/trials/999")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"


def test_the_answer_fragment_flags_and_markers(stack, tiny_spec):
    """/ui/jobs/{id}/answer is the job page's banner and held-out panel alone; the banner
    and the jobs list's marker appear only for a result with flags."""
    from service.db import jobs as job_db
    from service.db import session_scope
    from service.status import JobStatus

    flag = {"code": "holdout_gain_negative",
            "message": "on the holdout data the winner loses to the best uniform ratio by 0.3"}
    ids = {}
    with stack.client() as api:
        for name, flags in (("flagged", [flag]), ("clean", [])):
            ids[name] = job_id = api.post("/v1/jobs", json={**tiny_spec, "name": name}).json()["id"]
            with session_scope(stack.settings.database()) as s:
                job_db.set_status(s, job_id, JobStatus.RUNNING)
                job_db.write_result(s, job_id, {"best": None, "best_uniform": None,
                                                "flags": flags, "finalists": []})
    anon = httpx.Client(base_url=stack.url, timeout=30)
    assert anon.get(f"/ui/jobs/{ids['flagged']}/answer").status_code == 303  # signed in only
    c = _signin(stack, "viewer")
    part = c.get(f"/ui/jobs/{ids['flagged']}/answer")
    assert part.status_code == 200 and "<html" not in part.text
    assert 'id="flags-slot"' in part.text and 'id="holdout"' in part.text
    assert flag["message"] in part.text and 'data-code="holdout_gain_negative"' in part.text
    assert 'class="flags"' in c.get(f"/ui/jobs/{ids['flagged']}").text
    clean = c.get(f"/ui/jobs/{ids['clean']}").text
    assert 'class="flags"' not in clean and "No feasible merge within the budget." in clean
    assert c.get("/ui/jobs/nosuchjob/answer").status_code == 404
    jobs = c.get("/ui/jobs").text
    assert jobs.count('class="flag-marker"') == 1 and flag["message"] in jobs


def test_spec_differences_lists_every_field_that_differs_and_no_other():
    from service.api.routes.ui import spec_differences

    a = {"name": "a", "groups": {"scheme": "blocks", "k": 3}, "ratio_bounds": [0.0, 1.0],
         "mean_ratio": None, "search": {"sampler": "tpe", "seed": 0},
         "tax": {"budget": 0.1, "tasks": [{"name": "add", "data": "/d/add.jsonl"}]}}
    b = {"name": "b", "groups": {"scheme": "blocks", "k": 4}, "ratio_bounds": [0.0, 0.9],
         "mean_ratio": 0.5, "search": {"sampler": "tpe", "seed": 1},
         "tax": {"budget": 0.1, "tasks": [{"name": "add", "data": "/d/add2.jsonl"},
                                          {"name": "mc", "data": "/d/mc.jsonl"}]}}
    rows = {r["field"]: r["values"] for r in spec_differences([a, b])}
    assert rows == {"groups.k": ["3", "4"], "ratio_bounds": ["[0.0, 1.0]", "[0.0, 0.9]"],
                    "mean_ratio": ["—", "0.5"], "search.seed": ["0", "1"],
                    "tax.tasks[0].data": ["/d/add.jsonl", "/d/add2.jsonl"],
                    "tax.tasks[1].name": ["—", "mc"], "tax.tasks[1].data": ["—", "/d/mc.jsonl"]}
    assert spec_differences([a, {**a, "name": "c"}]) == []  # the name is not a difference
    assert spec_differences([a]) == []
