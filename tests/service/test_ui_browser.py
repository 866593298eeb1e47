"""The dashboard in a real headless Chromium (Debian's, driven by Playwright for Python)."""

from __future__ import annotations

import pytest

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


def _signed_in(browser, stack, role: str, path: str):
    """A new page signed in as ``role`` and at ``path``, with the list of its requests."""
    from urllib.parse import quote

    page = browser.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(f"{stack.url}/ui/signin?next=" + quote(path, safe="/"))
    page.fill("#token", stack.tokens[role])
    page.click("button[type=submit]")
    page.wait_for_url(stack.url + path)
    return page, requests


def test_signin_and_the_jobs_list_in_chromium(browser, stack, tiny_spec):
    from service.db import jobs as job_db
    from service.db import session_scope
    from service.status import JobStatus

    with stack.client() as api:
        job = api.post("/v1/jobs", json=tiny_spec).json()
    with session_scope(stack.settings.database()) as s:  # the workers' own code path
        job_db.set_status(s, job["id"], JobStatus.RUNNING)
    page = browser.new_page()
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(f"{stack.url}/")
    assert page.url.startswith(f"{stack.url}/ui/signin")
    page.fill("#token", "hmaopt_wrong")
    page.click("button[type=submit]")
    assert page.locator(".error").inner_text() == "Unknown or revoked token."
    page.fill("#token", stack.tokens["viewer"])
    page.click("button[type=submit]")
    page.wait_for_url(f"{stack.url}/ui/jobs")
    row = page.locator(f"tr[data-job='{job['id']}']")
    assert row.locator(".status").inner_text() == "running"
    assert "test-viewer · viewer" in page.locator("header .who").inner_text()
    cookies = {c["name"]: c for c in page.context.cookies()}
    assert cookies["hmaopt_session"]["httpOnly"] and cookies["hmaopt_session"]["sameSite"] == "Strict"
    # every request the page made went to this server on 127.0.0.1
    assert requests and all(u.startswith(stack.url) for u in requests), requests
    page.click("header .signout button")
    page.wait_for_url(f"{stack.url}/ui/signin")
    page.close()


#: Grouping.describe() of 4 decoder layers in 2 blocks
LAYOUT = {"scheme": "blocks", "spec": {"scheme": "blocks", "k": 2, "split_attn_mlp": False},
          "num_layers": 4, "groups": [{"name": "block0", "layers": [0, 1]},
                                      {"name": "block1", "layers": [2, 3]}],
          "slots": ["block0", "block1"], "non_layer_rule": "nearest", "tied_embeddings": False}


def _trial(number, reward, tax, kind="search", feasible=True, state="complete", ratio=None):
    return dict(number=number, kind=kind, state=state,
                ratios={"block0": 0.2 + number / 100, "block1": 0.7},
                reward=None if state == "pruned" else reward, tax=tax, feasible=feasible,
                stage=1 if state == "pruned" else 2, metrics={"add": 0.5}, task_tax={"add": tax},
                uniform_ratio=ratio, merge_seconds=0.001, eval_seconds=0.1)


def test_job_page_draws_and_follows_live_trials(browser, stack, tiny_spec):
    from service import queue
    from service.db import jobs as job_db
    from service.db import session_scope
    from service.status import JobStatus
    from workers.search import jsonable

    with stack.client() as api:
        job = api.post("/v1/jobs", json=tiny_spec).json()
    url = stack.settings.database()
    with session_scope(url) as s:
        job_db.set_status(s, job["id"], JobStatus.RUNNING)
        for t in (_trial(0, 1.0, 0.0, "uniform", ratio=0.0), _trial(1, 2.0, 0.1, "uniform", ratio=0.5),
                  _trial(2, 3.0, 0.9, feasible=False), _trial(3, None, 0.8, feasible=False,
                                                              state="pruned")):
            job_db.add_trial(s, job["id"], **t)
        job_db.refresh_progress(s, job["id"])
    page, requests = _signed_in(browser, stack, "operator", f"/ui/jobs/{job['id']}")
    page.wait_for_selector("#trials tbody tr[data-trial='3']")
    points = "() => document.getElementById('scatter').data.slice(0, 3).map(t => t.x.length)"
    assert page.evaluate(points) == [2, 1, 1]  # feasible, over budget, pruned
    assert "weight on the aligned model" in page.inner_text("#profile")
    # no worker has started the job: no layout yet, the profile is drawn per ratio slot
    profile = "() => document.getElementById('profile').data.map(t => [t.name, t.x, t.y])"
    assert page.evaluate(profile)[0][:2] == ["best trial 1", ["block0", "block1"]]
    assert page.is_visible("#cancel") and page.is_visible("#export")
    # a trial finished by a worker appears without a reload (same code path as the worker)
    row = _trial(4, 5.0, 0.05)
    with session_scope(url) as s:
        job_db.add_trial(s, job["id"], **row)
        progress = job_db.progress(job_db.refresh_progress(s, job["id"]))
    queue.publish(stack.settings, job["id"], "trial", jsonable({**row, **progress}))
    page.wait_for_selector("#trials tbody tr[data-trial='4']", timeout=10_000)
    page.wait_for_function("() => document.getElementById('scatter').data[0].x.length === 3")
    assert page.inner_text("#best") == "5.000"
    # the worker's layout event: the profile becomes one α per decoder layer (2 blocks of 2)
    queue.publish(stack.settings, job["id"], "layout", LAYOUT)
    page.wait_for_function("() => document.getElementById('profile').data[0].x.length === 4")
    name, x, y = page.evaluate(profile)[0]
    assert name == "best trial 4" and x == [0, 1, 2, 3] and y == pytest.approx([0.24, 0.24, 0.7, 0.7])
    assert page.evaluate(profile)[1][2] == [0.5] * 4  # the best uniform α, on every layer
    page.click("#trials tbody tr[data-trial='2']")  # a clicked trial's profile
    page.wait_for_function("() => document.getElementById('profile').data[0].name === 'trial 2'")
    assert page.evaluate(profile)[0][2] == pytest.approx([0.22, 0.22, 0.7, 0.7])
    assert all(u.startswith(stack.url) for u in requests), [u for u in requests
                                                             if not u.startswith(stack.url)]
    page.close()
    # a viewer sees no cancel or export button
    viewer, _ = _signed_in(browser, stack, "viewer", f"/ui/jobs/{job['id']}")
    assert viewer.locator("#cancel").count() == 0 and viewer.locator("#export").count() == 0
    viewer.close()


def test_compare_two_jobs_by_url(browser, stack, tiny_spec):
    from service.db import jobs as job_db
    from service.db import session_scope
    from service.status import JobStatus

    ids = []
    with stack.client() as api:
        for name, top in (("nightly-a", 2.0), ("nightly-b", 3.0)):
            job = api.post("/v1/jobs", json={**tiny_spec, "name": name}).json()
            ids.append(job["id"])
            with session_scope(stack.settings.database()) as s:
                job_db.set_status(s, job["id"], JobStatus.RUNNING)
                job_db.add_trial(s, job["id"], **_trial(0, 1.0, 0.0, "uniform", ratio=0.0))
                job_db.add_trial(s, job["id"], **_trial(1, top, 0.1))
                job_db.add_trial(s, job["id"], **_trial(2, top + 1, 0.9, feasible=False))
                job_db.refresh_progress(s, job["id"])
                s.get(job_db.Job, job["id"]).layout = LAYOUT
    page, requests = _signed_in(browser, stack, "viewer", "/ui/jobs")
    for job_id in ids:  # tick both jobs on the jobs page and compare them
        page.check(f"tr[data-job='{job_id}'] input[name=jobs]")
    page.click("button[form=compare]")
    page.wait_for_url(f"{stack.url}/ui/compare?*")
    shared = page.url
    assert all(f"jobs={i}" in shared for i in ids)
    rows = page.locator("#best-results tbody tr")
    # in the address's order: the jobs page lists the newest first
    assert [rows.nth(i).get_attribute("data-job") for i in range(2)] == ids[::-1]
    assert [rows.nth(i).locator(".best-reward").inner_text() for i in range(2)] == \
        ["3.0000", "2.0000"]
    page.wait_for_function("() => document.getElementById('profile').data")
    curves = page.evaluate("() => document.getElementById('best-so-far').data.map(t => t.y)")
    assert curves == [[1.0, 3.0, 3.0], [1.0, 2.0, 2.0]]
    scatter = page.evaluate("() => document.getElementById('scatter').data"
                            ".filter(t => t.type === 'scattergl').map(t => [t.name, t.x.length])")
    assert [n for _, n in scatter] == [2, 1, 0, 2, 1, 0]  # per job: feasible, over, pruned
    profiles = page.evaluate("() => document.getElementById('profile').data.map(t => t.x)")
    assert profiles == [[0, 1, 2, 3]]  # both bests have the same ratios: drawn once
    assert all(u.startswith(stack.url) for u in requests), requests
    page.close()
    # the URL alone opens the same comparison in another signed-in browser
    other, _ = _signed_in(browser, stack, "viewer", shared.removeprefix(stack.url))
    assert other.locator("#best-results tbody tr").count() == 2
    other.goto(f"{stack.url}/ui/compare?jobs=nosuchjob")
    assert other.locator(".error").first.inner_text() == "No job nosuchjob."
    other.close()


def test_pipelines_page_shows_runs_and_decisions(browser, stack, tiny_spec):
    from datetime import UTC, datetime, timedelta

    from service.db import pipelines as pipe_db
    from service.db import session_scope

    models = stack.settings.model_roots[0]
    (models / "rlhf").mkdir()
    spec = {"name": "nightly", "job": {**tiny_spec, "export": None},
            "schedule": {"cron": "0 2 * * *"}, "aligned": {"dir": str(models / "rlhf")},
            "promote": {"dir": str(models / "promoted")}}
    with stack.client() as api:
        pid = api.post("/v1/pipelines", json=spec).json()["id"]
    t0 = datetime(2026, 11, 1, 2, tzinfo=UTC)
    with session_scope(stack.settings.database()) as s:  # three nights, as the scheduler leaves them
        for day, (status, decision, reward) in enumerate([("succeeded", "promoted", 1.0),
                                                          ("skipped", None, None),
                                                          ("succeeded", "kept", 0.9)]):
            run = pipe_db.claim_run(s, pid, t0 + timedelta(days=day), "schedule", status)
            run.decision, run.reward, run.tax, run.gain = decision, reward, reward and 0.1, 0.2
            run.reason = "no complete checkpoint in rlhf yet" if status == "skipped" else None
        s.commit()
    page, requests = _signed_in(browser, stack, "viewer", "/ui/pipelines")
    assert page.locator("tr[data-pipeline='nightly'] td").nth(1).inner_text() == "active"
    page.click("tr[data-pipeline='nightly'] a")
    page.wait_for_url(f"{stack.url}/ui/pipelines/nightly")
    assert [d.inner_text() for d in page.locator("#runs td.decision").all()] == [
        "kept", "", "promoted"]  # newest first
    page.wait_for_function("() => document.getElementById('runs-chart').data")
    traces = page.evaluate("() => Object.fromEntries(document.getElementById('runs-chart').data"
                           ".map(t => [t.name, t.y]))")
    assert traces["reward, promoted"] == [1.0] and traces["reward, kept"] == [0.9]
    assert traces["skipped / failed"] == [0]
    titles = page.evaluate("() => { const l = document.getElementById('runs-chart').layout;"
                           " return ['xaxis', 'yaxis', 'yaxis2', 'yaxis3'].map(a => l[a].title.text); }")
    assert titles == ["scheduled run", "reward", "gain", "tax"]  # every axis titled
    assert all(u.startswith(stack.url) for u in requests), requests
    page.close()


def _measured(number, reward, tax, kind="search", ratio=None, se=(0.2, 0.01), n=(40, 60)):
    """A trial with its standard errors and record counts, as the workers record it."""
    return {**_trial(number, reward, tax, kind, ratio=ratio), "reward_se": se[0], "tax_se": se[1],
            "n_reward": n[0], "n_tax": n[1]}


def _part(reward, tax, n=(30, 45), feasible=True):
    """A validation or holdout measurement, as workers/answer.py part_dict writes it."""
    return {"reward": reward, "reward_se": 0.25, "tax": tax, "tax_se": 0.02, "n_reward": n[0],
            "n_tax": n[1], "held_out": True, "feasible": feasible, "metrics": {"add": 0.5}}


def _result(flags: list[dict]) -> dict:
    """A job result shaped as SearchResult.to_dict: the answer (trial 2, chosen on the
    validation data over the luckier trial 3), the best uniform α (trial 1), the gains."""
    best = {"trial": 2, "kind": "search", "ratios": {"block0": 0.22, "block1": 0.7},
            "reward": 2.5, "tax": 0.06, "reward_se": 0.2, "tax_se": 0.01, "n_reward": 40,
            "n_tax": 60, "metrics": {"add": 0.5}, "chosen_by": "validation",
            "validation": _part(2.4, 0.07), "holdout": _part(2.3, 0.12, n=(31, 46),
                                                            feasible=False)}
    uniform = {"trial": 1, "ratio": 0.5, "reward": 2.0, "tax": 0.05, "reward_se": 0.2,
               "tax_se": 0.01, "n_reward": 40, "n_tax": 60, "metrics": {"add": 0.5},
               "validation": _part(1.9, 0.05), "holdout": _part(2.1, 0.06, n=(31, 46))}
    finalists = [{"trial": n, "kind": k, "search_reward": sr, "search_tax": st,
                  "validation_reward": vr, "validation_tax": vt, "validation_feasible": True}
                 for n, k, sr, st, vr, vt in ((3, "search", 2.9, 0.08, 1.8, 0.09),
                                              (2, "search", 2.5, 0.06, 2.4, 0.07),
                                              (1, "uniform", 2.0, 0.05, 1.9, 0.05))]
    return {"budget": 0.1, "mode": "constrained", "slots": ["block0", "block1"], "feasible": 3,
            "best": best, "best_uniform": uniform, "gain": 0.5, "gain_ci95": [0.125, 0.875],
            "holdout_gain": 0.2, "holdout_gain_ci95": [-0.25, 0.65], "n_gain": 40,
            "n_holdout_gain": 31, "finalists": finalists, "flags": flags, "pareto": [],
            "per_record": {"best": {"holdout_reward": [2.3] * 31}}}


FLAGS = [{"code": "holdout_over_budget", "message": "the holdout tax 0.12 is over the budget 0.1"},
         {"code": "holdout_gain_not_significant",
          "message": "the holdout gain 0.2 has a 95 % interval [-0.25, 0.65] that includes 0 (n = 31)"}]


def _answered_job(stack, spec, name, flags, *, finish=True):
    """A running job with measured trials; with ``finish`` its result is written and it
    succeeds (the workers' own calls)."""
    from service.db import jobs as job_db
    from service.db import session_scope
    from service.status import JobStatus

    with stack.client() as api:
        body = {**spec, "name": name, "tax": {**spec["tax"], "budget": 0.1}}
        job_id = api.post("/v1/jobs", json=body).json()["id"]
    with session_scope(stack.settings.database()) as s:
        job_db.set_status(s, job_id, JobStatus.RUNNING)
        for t in (_measured(0, 1.0, 0.0, "uniform", ratio=0.0, se=(0.15, 0.0)),
                  _measured(1, 2.0, 0.05, "uniform", ratio=0.5),
                  _measured(2, 2.5, 0.06), _measured(3, 2.9, 0.08)):
            job_db.add_trial(s, job_id, **t)
        job_db.refresh_progress(s, job_id)
        s.get(job_db.Job, job_id).layout = LAYOUT
    if finish:
        _finish(stack, job_id, flags)
    return job_id


def _finish(stack, job_id, flags):
    from service import queue
    from service.db import jobs as job_db
    from service.db import session_scope
    from service.status import JobStatus
    from workers.results import jsonable

    with session_scope(stack.settings.database()) as s:
        assert job_db.write_result(s, job_id, jsonable(_result(flags))) is JobStatus.RUNNING
        job_db.set_status(s, job_id, JobStatus.SUCCEEDED)
    queue.publish(stack.settings, job_id, "status", {"status": "succeeded", "error": None})


#: the scatter's uniform-α and best traces: names and their error bars (x: tax, y: reward)
BARS = """() => document.getElementById('scatter').data.slice(3).map(t => [t.name,
    t.customdata, t.error_x.array, t.error_y.array, t.error_x.visible && t.error_y.visible])"""


def test_job_page_flags_error_bars_and_the_held_out_panel(browser, stack, tiny_spec):
    flagged = _answered_job(stack, tiny_spec, "flagged", FLAGS, finish=False)
    page, requests = _signed_in(browser, stack, "viewer", f"/ui/jobs/{flagged}")
    page.wait_for_function("() => document.getElementById('scatter').data")
    assert page.locator(".flags").count() == 0  # running: no result, no flags yet
    assert "when the search finishes" in page.inner_text("#holdout")
    uniform, best = page.evaluate(BARS)
    assert uniform == ["uniform α (vanilla averaging) ±1 SE", [0, 1], [0.0, 0.01], [0.15, 0.2], True]
    assert best == ["best ±1 SE", [3], [0.01], [0.2], True]  # before the answer: the best trial
    assert "± 0.2" in page.locator("#trials tbody tr[data-trial='3'] td").nth(3).inner_text()
    # the job ends: the banner and the panel are swapped in without a reload
    _finish(stack, flagged, FLAGS)
    page.wait_for_selector(".flags li", timeout=10_000)
    banner = page.locator(".flags")
    assert [li.get_attribute("data-code") for li in banner.locator("li").all()] == [
        "holdout_over_budget", "holdout_gain_not_significant"]
    assert [m.inner_text() for m in banner.locator(".message").all()] == [f["message"] for f in FLAGS]
    # the answer (chosen on the validation data) is the star, not the luckier trial 3
    page.wait_for_function("() => document.getElementById('scatter').data[4].customdata[0] === 2")
    assert page.evaluate(BARS)[1] == ["answer ±1 SE", [2], [0.01], [0.2], True]
    panel = page.locator("#holdout")
    rows = panel.locator("table.answer tr")
    cells = lambda i: [c.inner_text() for c in rows.nth(i).locator("td").all()]
    assert [c.inner_text() for c in rows.nth(0).locator("th").all()][1:] == [
        "search", "validation", "holdout"]
    assert rows.nth(1).inner_text() == "answer: trial 2 (search)"
    assert cells(2) == ["2.5 ± 0.2 n=40", "2.4 ± 0.25 n=30", "2.3 ± 0.25 n=31"]  # reward
    assert cells(3) == ["0.0600 ± 0.01 n=60", "0.0700 ± 0.02 n=45", "0.1200 ± 0.02 n=46 over"]
    assert rows.nth(4).inner_text() == "best uniform α = 0.5 (trial 1)"
    assert cells(5) == ["2 ± 0.2 n=40", "1.9 ± 0.25 n=30", "2.1 ± 0.25 n=31"]
    assert panel.locator(".search-gain").inner_text() == "+0.5 [+0.125, +0.875] n=40"
    assert panel.locator(".holdout-gain").inner_text() == "+0.2 [-0.25, +0.65] n=31"
    assert panel.locator(".chosen-by").get_attribute("data-chosen-by") == "validation"
    assert "validation data" in panel.locator(".chosen-by").inner_text()
    finalists = panel.locator("table.finalists tr[data-trial]")
    assert [f.get_attribute("data-trial") for f in finalists.all()] == ["3", "2", "1"]
    assert panel.locator("table.finalists tr.chosen").get_attribute("data-trial") == "2"
    # a reload renders the same answer on the server
    page.reload()
    page.wait_for_function("() => document.getElementById('scatter').data")
    assert page.locator(".flags li").count() == 2
    assert page.locator("#holdout .holdout-gain").inner_text() == "+0.2 [-0.25, +0.65] n=31"
    assert page.evaluate(BARS)[1][1] == [2]
    assert all(u.startswith(stack.url) for u in requests), requests
    page.close()

    clean = _answered_job(stack, tiny_spec, "clean", [])
    page, _ = _signed_in(browser, stack, "viewer", f"/ui/jobs/{clean}")
    page.wait_for_function("() => document.getElementById('scatter').data")
    assert page.locator(".flags").count() == 0
    assert page.locator("#holdout .search-gain").inner_text() == "+0.5 [+0.125, +0.875] n=40"
    page.close()

    # the jobs list marks the flagged job only; the compare table lists its flag codes
    page, _ = _signed_in(browser, stack, "viewer", "/ui/jobs")
    marker = page.locator(f"tr[data-job='{flagged}'] .flag-marker")
    assert marker.inner_text() == "⚠ 2" and FLAGS[0]["message"] in marker.get_attribute("title")
    assert page.locator(f"tr[data-job='{clean}'] .flag-marker").count() == 0
    page.goto(f"{stack.url}/ui/compare?jobs={flagged}&jobs={clean}")
    page.wait_for_function("() => document.getElementById('scatter').data")
    row = page.locator(f"#best-results tr[data-job='{flagged}']")
    codes = row.locator(".flag-codes .flag")
    assert [c.get_attribute("data-code") for c in codes.all()] == [f["code"] for f in FLAGS]
    assert [c.inner_text() for c in codes.all()] == ["holdout over budget",
                                                     "holdout gain not significant"]
    assert codes.first.get_attribute("title") == FLAGS[0]["message"]
    assert row.locator(".holdout-gain").inner_text() == "+0.2 [-0.25, +0.65] n=31"
    assert row.locator(".gain").inner_text() == "+0.5 [+0.125, +0.875]"
    assert row.locator(".best-reward").inner_text() == "2.5000"
    assert "± 0.2000" in row.locator("td").nth(4).inner_text()
    other = page.locator(f"#best-results tr[data-job='{clean}']")
    assert other.locator(".flag-codes .flag").count() == 0
    assert other.locator(".flag-codes").inner_text() == "—"
    stars = page.evaluate("() => document.getElementById('scatter').data"
                          ".filter(t => t.name.endsWith(' best ±1 SE'))"
                          ".map(t => [t.customdata, t.error_y.array, t.error_x.array])")
    assert stars == [[[2], [0.2], [0.01]]] * 2
    page.close()


def test_job_page_shows_the_stage_that_found_the_answer(browser, stack, tiny_spec):
    """A hybrid job: the stages panel waits for the result, then (swapped in without a
    reload, and on the server after one) names the stage that found the answer and the
    evaluations each stage spent, the gradient descent's cost in evaluation equivalents."""
    from service import queue
    from service.db import jobs as job_db
    from service.db import session_scope
    from service.status import JobStatus
    from workers.results import jsonable

    with stack.client() as api:
        body = {**tiny_spec, "name": "hybrid", "tax": {**tiny_spec["tax"], "budget": 0.1},
                "search": {**tiny_spec["search"], "strategy": "hybrid"}}
        job_id = api.post("/v1/jobs", json=body).json()["id"]
    with session_scope(stack.settings.database()) as s:
        job_db.set_status(s, job_id, JobStatus.RUNNING)
        for t in (_measured(0, 1.0, 0.0, "uniform", ratio=0.0), _measured(1, 2.0, 0.05, "uniform", ratio=0.5),
                  _measured(2, 2.2, 0.04, "gradient"), _measured(3, 2.6, 0.09, "gradient"),
                  _measured(4, 2.4, 0.07), {**_trial(5, None, 0.3, feasible=False, state="pruned")}):
            job_db.add_trial(s, job_id, **t)
        job_db.refresh_progress(s, job_id)
        s.get(job_db.Job, job_id).layout = LAYOUT
    page, requests = _signed_in(browser, stack, "viewer", f"/ui/jobs/{job_id}")
    page.wait_for_function("() => document.getElementById('scatter').data")
    assert "when the search finishes" in page.inner_text("#stages")
    assert page.locator("#stages table.stages").count() == 0

    result = _result([])
    result["best"] = {**result["best"], "trial": 3, "kind": "gradient", "reward": 2.6,
                      "tax": 0.09, "chosen_by": "search"}
    result["finalists"] = []
    result.update(found_by="gradient", stages={
        "uniform": {"evaluations": 2, "pruned": 0, "best_reward": 2.0},
        "gradient": {"evaluations": 2, "pruned": 0, "best_reward": 2.6},
        "search": {"evaluations": 2, "pruned": 1, "best_reward": 2.4}},
        gradient={"ratios": [0.31234, 0.8], "seconds": 3.8, "steps": 30, "responses": 120,
                  "eval_equivalents": 6.52, "target_uniform_ratio": 0.5, "final_loss": 1.2})
    with session_scope(stack.settings.database()) as s:
        assert job_db.write_result(s, job_id, jsonable(result)) is JobStatus.RUNNING
        job_db.set_status(s, job_id, JobStatus.SUCCEEDED)
    queue.publish(stack.settings, job_id, "status", {"status": "succeeded", "error": None})

    def check(page) -> None:
        panel = page.locator("#stages")
        assert panel.get_attribute("data-found-by") == "gradient"
        found = panel.locator(".found-by").inner_text()
        assert "trial 3" in found and "gradient stage" in found
        rows = panel.locator("table.stages tbody tr")
        assert [r.get_attribute("data-stage") for r in rows.all()] == ["uniform", "gradient",
                                                                      "search"]
        cells = lambda stage: [c.inner_text() for c in
                               panel.locator(f"tr[data-stage='{stage}'] td").all()]
        assert cells("uniform") == ["uniform baseline (vanilla averaging)", "2", "0", "2", ""]
        assert cells("gradient")[1:] == ["2 + 6.5", "0", "2.6", "★ yes"]
        assert cells("search") == ["sampler (tpe)", "2", "1", "2.4", ""]
        assert panel.locator("tr.found").get_attribute("data-stage") == "gradient"
        assert panel.locator("tfoot .total").inner_text() == "6 + 6.5"
        cost = panel.locator(".gradient-cost").inner_text()
        assert "3.8 s" in cost and "30 Adam steps" in cost and "6.5 evaluations" in cost
        assert "0.312, 0.8" in cost and "weight on the aligned model" in cost

    page.wait_for_selector("#stages table.stages", timeout=10_000)  # swapped in, no reload
    check(page)
    page.reload()  # rendered on the server alike
    page.wait_for_function("() => document.getElementById('scatter').data")
    check(page)
    assert all(u.startswith(stack.url) for u in requests), requests
    page.close()
