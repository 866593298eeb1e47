"""search.strategy gradient and hybrid end to end: through `hmaopt search` and through the
service (a job submitted over REST, run by a worker process).

The jobs are tiny (random char-LMs from tests/models.py), so the figures mean nothing; what is
checked is the mechanics: the uniform baseline, the gradient stage and its ray, the sampler
(hybrid only), and the result's ``found_by``, per-stage evaluations and gradient cost.
"""

from __future__ import annotations

import json
import os

import pytest
import yaml

from tests.service.conftest import _running_stack
from tests.service.test_cli import hmaopt

#: grid 3 + the gradient direction 1 + up to 2 on its ray before the sampler; hybrid then
#: proposes the rest
TRIALS = 7
SEARCH = {"n_trials": TRIALS, "gradient_steps": 3, "gradient_refine": 2,
          "uniform_grid": [0.0, 0.5, 1.0]}


def check_result(result: dict, strategy: str) -> None:
    stages = result["stages"]
    assert set(stages) >= {"uniform", "gradient"}
    assert stages["uniform"]["evaluations"] == 3
    # the direction, then up to 2 steps on its ray (fewer when the ray ends at a bound)
    n_gradient = stages["gradient"]["evaluations"]
    assert 1 <= n_gradient <= 3
    total = sum(s["evaluations"] for s in stages.values())
    assert total == result["trials"]["finished"]
    if strategy == "gradient":  # the stages alone: the sampler never runs
        assert "search" not in stages and total == 3 + n_gradient
    else:
        assert stages["search"]["evaluations"] == TRIALS - 3 - n_gradient and total == TRIALS
    assert result["found_by"] in stages
    if result["feasible"]:
        assert result["found_by"] == result["best"]["kind"]
        assert stages[result["found_by"]]["best_reward"] == pytest.approx(
            result["best"]["reward"])
    grad = result["gradient"]
    assert grad["seconds"] > 0 and grad["steps"] == 3 and len(grad["ratios"]) == 2
    assert grad["eval_equivalents"] is not None and grad["eval_equivalents"] > 0


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One θ_base cache for both CLI runs (the same tiny models: measured once)."""
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("strategy", ["gradient", "hybrid"])
def test_strategy_through_the_cli(tmp_path, cache, strategy):
    from tests.models import make_tiny_job

    spec = make_tiny_job(tmp_path, search={**SEARCH, "strategy": strategy})
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    out = tmp_path / "result.json"
    env = {**os.environ, "HMAOPT_CACHE_DIR": str(cache)}
    proc = hmaopt("search", str(spec_file), "--storage", f"sqlite:///{tmp_path / 'db.sqlite'}",
                  "--json", str(out), "--no-progress", env=env)
    assert proc.returncode in (0, 10), proc.stderr
    result = json.loads(out.read_text())
    check_result(result, strategy)
    # the text summary says the same: the stage that found the answer, what each spent
    line = next(x for x in proc.stdout.splitlines() if x.startswith("stages"))
    assert f"found by {result['found_by']}" in line
    for kind, st in result["stages"].items():
        assert f"{kind} {st['evaluations']}" in line
    assert f"= {result['gradient']['eval_equivalents']:.1f} evaluations" in line


@pytest.fixture
def sqlite_stack(redis_url, tmp_path, roots):
    """The API on SQLite with the test Redis (HMAOPT_TEST_REDIS_DB picks its database)."""
    yield from _running_stack(f"sqlite:///{tmp_path / 'hmaopt.db'}", redis_url, tmp_path, roots)


def test_strategies_through_the_service(sqlite_stack, tiny_spec):
    """Both strategies as jobs over REST, one worker running them in turn; the stored result
    and the trials API name the stages."""
    from service.client import Client

    stack = sqlite_stack
    client = Client(stack.url, stack.tokens["operator"])
    jobs = {}
    for strategy in ("gradient", "hybrid"):
        spec = {**tiny_spec, "name": f"tiny-{strategy}",
                "search": {**tiny_spec["search"], **SEARCH, "strategy": strategy}}
        jobs[strategy] = client.submit(spec)["id"]
    stack.start_worker()
    for strategy, job_id in jobs.items():
        final = stack.wait_job(job_id, timeout=300)
        assert final["status"] == "succeeded", (final, stack.worker_log()[-3000:])
        result = final["result"]
        check_result(result, strategy)
        trials = client.request("GET", f"/v1/jobs/{job_id}/trials",
                                params={"limit": 100})["data"]
        kinds = [t["kind"] for t in sorted(trials, key=lambda t: t["number"])]
        n_gradient = result["stages"]["gradient"]["evaluations"]
        # in order: the baseline, the gradient stage, then the sampler's own
        assert kinds == (["uniform"] * 3 + ["gradient"] * n_gradient
                         + ["search"] * (len(kinds) - 3 - n_gradient))
        assert kinds.count("search") == (0 if strategy == "gradient" else TRIALS - 3 - n_gradient)
        # the same figures the stored result gives, from the job's own result endpoint
        stored = client.request("GET", f"/v1/jobs/{job_id}")["result"]
        assert stored["found_by"] == result["found_by"]
        assert stored["stages"] == result["stages"]
