"""The compare page and the job page's trials table in a real headless Chromium at 800 px:
what differs between the jobs' specs, pruned trials marked, shared lines drawn once, numbers
right-aligned at a fixed precision, axis titles on every figure, nothing clipped or wider
than the window."""

from __future__ import annotations

import re

from tests.service.test_ui_browser import LAYOUT, _signed_in, _trial, browser  # noqa: F401

WIDTH = 800

#: every figure of the page: [id, x-axis title, y-axis title, the title's box inside the
#: figure's box (left, right)]
FIGURES = """() => [...document.querySelectorAll('.js-plotly-plot')].map(el => {
  const l = el.layout, box = el.getBoundingClientRect();
  const title = el.querySelector('.gtitle').getBoundingClientRect();
  return [el.id, l.xaxis.title && l.xaxis.title.text, l.yaxis.title && l.yaxis.title.text,
          title.width > 0 && title.left >= box.left - 0.5 && title.right <= box.right + 0.5];
})"""


def _at_800(browser, stack, path):  # noqa: F811 (the fixture imported above)
    page, requests = _signed_in(browser, stack, "viewer", path)
    page.set_viewport_size({"width": WIDTH, "height": 1000})
    return page, requests


def _check_layout(page, figures: int) -> None:
    """Every figure titled on both axes, no title clipped, no sideways scrolling."""
    shown = page.evaluate(FIGURES)
    assert len(shown) == figures
    for name, x, y, inside in shown:
        assert x and y, f"{name}: an axis has no title"
        assert inside, f"{name}: its title is clipped at {WIDTH} px"
    assert page.evaluate("() => document.documentElement.scrollWidth") <= WIDTH


def _job(stack, spec, name, *, search=None, budget=0.1, uniform=(1.0, 2.0), top=3.0):
    """A running job with two uniform points, a feasible and an infeasible search trial and a
    pruned one (the workers' own calls)."""
    from service.db import jobs as job_db
    from service.db import session_scope
    from service.status import JobStatus

    body = {**spec, "name": name, "tax": {**spec["tax"], "budget": budget},
            "search": {**spec["search"], **(search or {})}}
    with stack.client() as api:
        job_id = api.post("/v1/jobs", json=body).json()["id"]
    with session_scope(stack.settings.database()) as s:
        job_db.set_status(s, job_id, JobStatus.RUNNING)
        for t in (_trial(0, uniform[0], 0.0, "uniform", ratio=0.0),
                  _trial(1, uniform[1], 0.05, "uniform", ratio=0.5),
                  _trial(2, top, 0.08), _trial(3, top + 1, 0.9, feasible=False),
                  _trial(4, None, 0.7, feasible=False, state="pruned")):
            job_db.add_trial(s, job_id, **t)
        job_db.refresh_progress(s, job_id)
        s.get(job_db.Job, job_id).layout = LAYOUT
    return job_id


def test_compare_shows_spec_differences_pruned_trials_and_shared_lines_once(browser, stack,  # noqa: F811
                                                                             tiny_spec):
    a = _job(stack, tiny_spec, "tpe-seed0")
    b = _job(stack, tiny_spec, "random-seed1", search={"sampler": "random", "seed": 1,
                                                       "n_trials": 8})
    c = _job(stack, tiny_spec, "wider-budget", budget=0.2, uniform=(1.0, 2.5), top=3.5)
    page, requests = _at_800(browser, stack, f"/ui/compare?jobs={a}&jobs={b}&jobs={c}")
    page.wait_for_function("() => document.getElementById('profile').data")
    # what differs, per job in the table's order; what they share is not listed
    rows = page.locator("#spec-diff tbody tr")
    diffs = {rows.nth(i).get_attribute("data-field"):
             [td.inner_text() for td in rows.nth(i).locator("td").all()]
             for i in range(rows.count())}
    assert diffs == {"search.sampler": ["tpe", "random", "tpe"],
                     "search.seed": ["0", "1", "0"], "search.n_trials": ["6", "8", "6"],
                     "tax.budget": ["0.1", "0.1", "0.2"]}
    # pruned trials are drawn, marked, at the foot of the rewards
    pruned = page.evaluate("""() => document.getElementById('scatter').data
        .filter(t => t.meta && t.meta.pruned).map(t => [t.x, t.y, t.marker.symbol])""")
    assert pruned == [[[0.7], [1.0], "triangle-down-open"]] * 3
    assert [page.locator(f"tr[data-job='{j}'] .pruned-count").inner_text()
            for j in (a, b, c)] == ["(1)"] * 3
    # a and b share their budget and their baseline curve: each drawn once, named for both
    lines = page.evaluate("""() => document.getElementById('scatter').data
        .filter(t => t.meta && t.meta.kind).map(t => [t.meta.kind, t.x, t.meta.shared || 1,
                                                        t.name])""")
    budgets = sorted((x[0], n) for kind, x, n, _ in lines if kind == "budget")
    assert budgets == [(0.1, 2), (0.2, 1)]
    shared = [name for kind, _, n, name in lines if kind == "uniform" and n == 2]
    assert len(shared) == 1 and "tpe-seed0" in shared[0] and "random-seed1" in shared[0]
    assert sum(kind == "uniform" for kind, *_ in lines) == 2
    # a's and b's trials are the same: one best-so-far curve for both
    curves = page.evaluate("""() => document.getElementById('best-so-far').data
        .map(t => [t.y, (t.meta && t.meta.shared) || 1])""")
    assert curves == [[[1.0, 2.0, 3.0, 3.0, 3.0], 2], [[1.0, 2.5, 3.5, 3.5, 3.5], 1]]
    profiles = page.evaluate("""() => document.getElementById('profile').data
        .map(t => (t.meta && t.meta.shared) || 1)""")
    assert profiles == [3]  # the three bests have the same ratios
    # numbers right-aligned at a fixed precision
    best = page.locator(f"tr[data-job='{c}'] .best-reward")
    assert best.inner_text() == "3.5000"
    assert best.evaluate("e => getComputedStyle(e.closest('td')).textAlign") == "right"
    _check_layout(page, figures=3)
    assert all(u.startswith(stack.url) for u in requests), requests
    page.close()


def test_identical_specs_say_so(browser, stack, tiny_spec):  # noqa: F811
    a, b = _job(stack, tiny_spec, "one"), _job(stack, tiny_spec, "two")
    page, _ = _at_800(browser, stack, f"/ui/compare?jobs={a}&jobs={b}")
    assert "same" in page.locator("#spec-diff").inner_text()
    page.close()


def test_trials_table_and_figures_of_the_job_page_at_800px(browser, stack, tiny_spec):  # noqa: F811
    job_id = _job(stack, tiny_spec, "table")
    page, _ = _at_800(browser, stack, f"/ui/jobs/{job_id}")
    page.wait_for_selector("#trials tbody tr[data-trial='0']")
    page.wait_for_function("() => document.getElementById('profile').data")
    cells = page.evaluate("""() => [...document.querySelectorAll('#trials tbody tr')].map(tr =>
        [...tr.children].map(td => [td.firstChild ? td.firstChild.textContent : '',
                                    getComputedStyle(td).textAlign]))""")
    assert len(cells) == 5
    for row in cells:
        number, _kind, _ratios, reward, tax, _metrics, stage, merge, evals = row
        assert reward[0] == "pruned" or re.fullmatch(r"-?\d+\.\d{4}", reward[0]), reward
        assert re.fullmatch(r"\d+\.\d{4}", tax[0]), tax
        assert re.fullmatch(r"\d+\.\d{2}", merge[0]) and re.fullmatch(r"\d+\.\d{2}", evals[0])
        assert {c[1] for c in (number, reward, tax, stage, merge, evals)} == {"right"}
    heads = page.evaluate("""() => [...document.querySelectorAll('#trials thead th')]
        .map(th => getComputedStyle(th).textAlign)""")
    assert heads[3] == heads[4] == "right" and heads[2] != "right"
    assert page.evaluate("() => document.getElementById('best-so-far').layout.yaxis.title.text") \
        == "best feasible reward"
    _check_layout(page, figures=3)
    page.close()


def test_the_jobs_list_fits_800px(browser, stack, tiny_spec):  # noqa: F811
    _job(stack, tiny_spec, "listed")
    page, _ = _at_800(browser, stack, "/ui/jobs")
    assert page.evaluate("() => document.documentElement.scrollWidth") <= WIDTH
    page.close()
