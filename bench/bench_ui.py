"""The dashboard on a large study: first view of the job page, and a trial's way to the page.

Starts the stack of bench_api.py (a fresh PostgreSQL database, dropped at the end; Redis db
14, flushed; the API as ``hmaopt serve --workers 0`` in its own process; a tiny job spec
inside the roots), submits one job over REST and gives it ``--trials`` finished trials, as a
worker leaves them: rows in hmaopt_trials (one bulk insert, then the service's own
``refresh_progress``) and one ``trial`` event per trial in the job's Redis stream (the
worker's payload), so that the page would pay for replaying them if it did. The trials: 11
uniform grid points, then searched ones over 4 ratio slots with 3 metrics each; about a
third over the budget and a tenth pruned.

Then, in headless Chromium (Debian's, driven by Playwright; one sign-in, its cookies reused):

1. First view, ``--runs`` times, each in a fresh browser context (empty cache): the time from
   navigation start until the scatter holds every trial's point and the table's first page
   (50 rows) is in the DOM, taken in the page (``performance.now()``, checked every
   animation frame), and the bytes loaded (Playwright's ``request.sizes()``: headers plus the
   encoded body, i.e. what came over the wire, gzip included). A second load in the same
   context shows the warm-cache view (plotly.js from the browser cache), and a third the hot
   one (Chromium's compiled-code cache of plotly.js too).
2. Live, ``--live`` times with the page open: one more trial written and published as the
   worker's ``_record`` does; the time from just before the write until the page's scatter
   holds its point (``page.wait_for_function``, polled every animation frame).

Targets (the issue's): first view under 2 s and under 2 MB; trial to point under 2 s.

    .venv/bin/python bench/bench_ui.py [--trials 10000] [--runs 5] [--live 20] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

from _common import machine_info, table, write_json  # bench/ is the script's folder
from bench_api import Bench, percentile

CHROMIUM = "/usr/bin/chromium"
#: the table's page size in static/job.js
TABLE_PAGE = 50
SLOTS = ("block0", "block1", "block2", "block3")

READY_PROBE = """(args) => {
  const [n, rows] = args;
  const done = () => {
    const el = document.getElementById("scatter");
    if (!el || !el.data) return false;
    const points = el.data.slice(0, 3).reduce((s, t) => s + t.x.length, 0);
    return points >= n && document.querySelectorAll("#trials tbody tr").length >= rows;
  };
  const tick = () => { if (done()) window.__ready = performance.now(); else requestAnimationFrame(tick); };
  requestAnimationFrame(tick);
}"""


#: where the time goes: navigation timing and job.js's performance marks, ms from navigation
MARKS = """() => {
  const nav = performance.getEntriesByType("navigation")[0];
  const out = {html: nav.responseEnd, dom_content_loaded: nav.domContentLoadedEventEnd};
  for (const m of performance.getEntriesByType("mark")) out[m.name.replace("hmaopt:", "")] = m.startTime;
  return out;
}"""


def trial_row(job_id: str, i: int, budget: float, rng: random.Random) -> dict:
    """Trial ``i`` as hmaopt_trials columns: 0-10 the uniform grid, then searched ones."""
    uniform = i < 11
    alpha = i / 10 if uniform else None
    ratios = {s: alpha if uniform else rng.random() for s in SLOTS}
    mean = sum(ratios.values()) / len(SLOTS)
    tax = mean * budget * 1.6 + rng.gauss(0, budget * 0.05)
    pruned = not uniform and rng.random() < 0.1
    return dict(
        job_id=job_id, number=i, kind="uniform" if uniform else "search",
        state="pruned" if pruned else "complete", ratios=ratios,
        reward=None if pruned else 1 + 2 * mean + rng.gauss(0, .1), tax=tax,
        feasible=not pruned and tax <= budget, stage=1 if pruned else 2,
        metrics={"add": rng.random(), "mc": rng.random(), "text": rng.random()},
        task_tax={"add": tax, "mc": tax / 2, "text": tax / 3}, uniform_ratio=alpha,
        merge_seconds=rng.random() / 10, eval_seconds=rng.random(), worker_id="bench")


def event_payload(row: dict, progress: dict) -> dict:
    """The worker's trial event: the row's columns, then the job's progress."""
    return {**{k: v for k, v in row.items() if k != "job_id"}, "finished_at": None, **progress}


class UiBench(Bench):
    def fill(self, n: int) -> str:
        import httpx
        from sqlalchemy import insert

        from service import queue
        from service.db import jobs as job_db
        from service.db import session_scope
        from service.db.models import Trial
        from service.status import JobStatus

        spec = {**self.spec, "name": f"bench-ui-{n}"}
        spec["search"] = {**spec.get("search", {}), "n_trials": n + self.args.live + 10}
        r = httpx.post(f"{self.base}/v1/jobs", json=spec, headers=self.headers, timeout=30)
        r.raise_for_status()
        job_id = r.json()["id"]
        self.budget = r.json()["budget"]
        self.rng = random.Random(0)
        rows = [trial_row(job_id, i, self.budget, self.rng) for i in range(n)]
        t0 = time.perf_counter()
        with session_scope(self.db_url) as s:
            job_db.set_status(s, job_id, JobStatus.RUNNING)
            s.execute(insert(Trial), rows)
            progress = job_db.progress(job_db.refresh_progress(s, job_id))
        pipe = self.redis.pipeline(transaction=False)
        key = queue.Keys.events(job_id)
        for row in rows:  # the final progress on every event: the size is what matters
            pipe.xadd(key, {"type": "trial", "data": json.dumps(event_payload(row, progress))})
        pipe.execute()
        print(f"job {job_id}: {n} trials and events written in {time.perf_counter() - t0:.1f} s")
        self.job_id, self.n = job_id, n
        return job_id

    def add_one(self, number: int) -> None:
        from service import queue
        from service.db import jobs as job_db
        from service.db import session_scope

        row = trial_row(self.job_id, number, self.budget, self.rng)
        with session_scope(self.db_url) as s:
            job_db.add_trial(s, **row)
            payload = event_payload(row, job_db.progress(job_db.refresh_progress(s, self.job_id)))
        queue.publish(self.settings, self.job_id, "trial", payload)

    @property
    def settings(self):
        from service.settings import Settings

        return Settings(database_url=self.db_url, redis_url=self.redis_url)


def first_view(browser, state: dict, url: str, n: int) -> tuple[dict, dict, dict]:
    """(cold, warm, hot) views of the job page in one fresh context: empty cache; plotly.js
    from the HTTP cache; and once more, when Chromium also has its compiled code cached."""
    context = browser.new_context(storage_state=state)
    try:
        out = []
        for _ in range(3):
            page = context.new_page()
            loaded = []
            page.on("requestfinished", lambda r: loaded.append(r))
            page.add_init_script(f"({READY_PROBE})({json.dumps([n, TABLE_PAGE])})")
            page.goto(url)
            page.wait_for_function("() => window.__ready !== undefined", timeout=60_000)
            ready = page.evaluate("() => window.__ready")
            marks = page.evaluate(MARKS)
            nbytes, by_kind = 0, {}
            for r in loaded:
                sizes = r.sizes()
                size = sizes["responseBodySize"] + sizes["responseHeadersSize"]
                nbytes += size
                kind = r.url.split("?")[0].rsplit("/", 1)[-1]
                by_kind[kind] = by_kind.get(kind, 0) + size
            out.append({"ms": ready, "marks": marks, "bytes": nbytes, "requests": len(loaded),
                        "by_resource": by_kind})
            page.close()
        return out[0], out[1], out[2]
    finally:
        context.close()


def live(browser, state: dict, url: str, bench: UiBench, count: int) -> list[float]:
    context = browser.new_context(storage_state=state)
    page = context.new_page()
    page.add_init_script(f"({READY_PROBE})({json.dumps([bench.n, TABLE_PAGE])})")
    page.goto(url)
    page.wait_for_function("() => window.__ready !== undefined", timeout=60_000)
    time.sleep(1.0)  # the event stream connects
    points = ("(n) => document.getElementById('scatter').data.slice(0, 3)"
              ".reduce((s, t) => s + t.x.length, 0) >= n")
    out = []
    for i in range(count):
        number = bench.n + i
        t0 = time.perf_counter()
        bench.add_one(number)
        page.wait_for_function(points, arg=number + 1, polling="raf", timeout=30_000)
        out.append((time.perf_counter() - t0) * 1000)
        time.sleep(0.3)
    context.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=10_000, help="finished trials in the job")
    ap.add_argument("--runs", type=int, default=5, help="cold first views measured")
    ap.add_argument("--live", type=int, default=20, help="live trials measured")
    ap.add_argument("--pg-admin", default="postgresql://postgres@127.0.0.1:5432/postgres",
                    help="PostgreSQL server URL with the right to create databases")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    ap.add_argument("--redis-db", type=int, default=14, help="Redis db (flushed)")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--log-level", default="WARNING")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    args.sqlite, args.api_processes = False, 1

    from playwright.sync_api import sync_playwright

    bench = UiBench(args)
    try:
        bench.setup()
        bench.fill(args.trials)
        url = f"{bench.base}/ui/jobs/{bench.job_id}"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page()
            page.goto(f"{bench.base}/ui/signin")
            page.fill("#token", bench.token)
            page.click("button[type=submit]")
            page.wait_for_url(f"{bench.base}/ui/jobs")
            state = page.context.storage_state()
            page.close()
            first_view(browser, state, url, args.trials)  # warm-up: server caches, gzip of plotly.js
            views = [first_view(browser, state, url, args.trials) for _ in range(args.runs)]
            lat = sorted(live(browser, state, url, bench, args.live))
            browser.close()
    finally:
        bench.teardown()

    cold, warm, hot = ([v[i] for v in views] for i in range(3))
    rows = []
    for name, vs in (("cold cache", cold), ("warm cache", warm), ("hot (code cache)", hot)):
        ms = sorted(v["ms"] for v in vs)
        rows.append([name, f"{statistics.median(ms):.0f}", f"{ms[-1]:.0f}",
                     f"{statistics.median(v['bytes'] for v in vs) / 1e6:.2f}",
                     statistics.median(v["requests"] for v in vs)])
    print(f"\njob page, {args.trials} trials, PostgreSQL, headless Chromium, {args.runs} runs")
    print(table(["view", "ready median ms", "max ms", "MB loaded", "requests"], rows))
    print("\nwhere the cold view's time goes (median ms from navigation start):")
    keys = list(cold[0]["marks"])
    print(table(["step", "ms"], [[k, f"{statistics.median(v['marks'][k] for v in cold):.0f}"]
                                 for k in keys] + [["ready", f"{statistics.median(v['ms'] for v in cold):.0f}"]]))
    print("\nbytes of the cold view by resource:")
    print(table(["resource", "kB"], [[k, f"{v / 1e3:.0f}"] for k, v in
                                      sorted(cold[0]["by_resource"].items(), key=lambda kv: -kv[1])]))
    print(f"\ntrial -> point in an open page, {len(lat)} trials: median "
          f"{statistics.median(lat):.0f} ms, p95 {percentile(lat, 95):.0f} ms, "
          f"max {lat[-1]:.0f} ms")
    write_json(args.json_out, {"machine": machine_info(with_torch=False), "args": vars(args),
                               "cold": cold, "warm": warm, "hot": hot, "live_ms": lat})
    return 0


if __name__ == "__main__":
    sys.exit(main())
