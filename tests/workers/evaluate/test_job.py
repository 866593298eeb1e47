"""The job evaluator: slices, staged figures equal one-shot figures, pruning, θ_base cache."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from service.spec import JobSpec
from tests.models import make_tiny_job
from workers.evaluate import tasks
from workers.evaluate.job import JobEvaluator, base_cache_key
from workers.merge import LiveMerger


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    spec = JobSpec.model_validate(make_tiny_job(tmp_path_factory.mktemp("job")))
    merger = LiveMerger.load(spec.base_model, spec.aligned_model, spec.groups, device="cpu")
    tok = AutoTokenizer.from_pretrained(spec.base_model)
    ev = JobEvaluator.load(spec, merger.model, tok)
    merger.apply([0.0, 0.0])
    ev.measure_base()
    return spec, merger, tok, ev


def test_slices_partition_each_set(job):
    spec, _, _, ev = job
    for t in spec.tax.tasks:
        sl = ev.tasks[t.name].slices
        n = sum(len(sl[s]) for s in ("stage1", "stage2", "validation", "holdout"))
        assert n == 12
        assert len(sl["holdout"]) == 3  # 25 % of 12
        assert len(sl["validation"]) == 2  # 20 % of 12, out of the other 9
        assert len(sl["stage1"]) == round(7 * spec.search.prune_fraction)
        ids = [json.dumps(r, sort_keys=True) for part in sl.values() for r in part]
        assert len(set(ids)) == 12  # no record in two slices
    assert sum(len(v) for v in ev.reward_sets.values()) == 10


def test_base_has_zero_tax(job):
    _, merger, _, ev = job
    merger.apply([0.0, 0.0])
    m = ev.evaluate()
    assert m.stage == 2 and not m.pruned
    assert m.tax == pytest.approx(0.0, abs=1e-9)
    assert all(v == pytest.approx(0.0, abs=1e-9) for v in m.task_tax.values())


def test_staged_figures_equal_one_shot_figures(job):
    spec, merger, tok, ev = job
    merger.apply([0.7, 0.3])
    m = ev.evaluate()
    model = merger.model
    merger.apply([0.0, 0.0])
    base = {}
    search = {n: t.slices["stage1"] + t.slices["stage2"] for n, t in ev.tasks.items()}
    base["add"] = tasks.exact_match_accuracy(model, tok, search["add"], max_new_tokens=3)
    base["mc"] = tasks.multiple_choice_accuracy(model, tok, search["mc"])
    base["text"] = tasks.perplexity(model, tok, search["text"])
    merger.apply([0.7, 0.3])
    want = {
        "add": tasks.exact_match_accuracy(model, tok, search["add"], max_new_tokens=3),
        "mc": tasks.multiple_choice_accuracy(model, tok, search["mc"]),
        "text": tasks.perplexity(model, tok, search["text"]),
    }
    for name in want:
        assert m.metrics[name] == pytest.approx(want[name], rel=1e-6)
    per_task = {
        "add": tasks.relative_degradation(want["add"], base["add"], True),
        "mc": tasks.relative_degradation(want["mc"], base["mc"], True),
        "text": tasks.relative_degradation(want["text"], base["text"], False),
    }
    assert m.task_tax == pytest.approx(per_task, rel=1e-6, abs=1e-9)
    # weights: add 1, mc 1, text 2
    assert m.tax == pytest.approx((per_task["add"] + per_task["mc"] + 2 * per_task["text"]) / 4)
    assert m.reward == pytest.approx(tasks.preference_margin(model, tok, ev.reward_sets["search"]))


def test_pruning_stops_after_stage_one_with_partial_figures(job):
    _, merger, _, ev = job
    merger.apply([1.0, 1.0])
    seen = []
    m = ev.evaluate(budget=-1.0, prune_margin=0.0, on_stage=seen.append)
    assert m.pruned and m.stage == 1 and m.reward is None
    assert set(m.metrics) == {"add", "mc", "text"}
    assert seen and seen[0].stage == 1
    full = ev.evaluate(budget=1e9)
    assert not full.pruned and full.stage == 2 and full.reward is not None


def test_pruning_waits_for_a_stage_one_tax_over_the_budget_beyond_its_noise(job):
    """The stage-1 slices are small: a partial tax over budget + margin by less than z SE
    (z 1.645 at 0.95) goes on to stage 2; one over by more than that is pruned."""
    _, merger, _, ev = job
    merger.apply([1.0, 1.0])
    seen = []
    ev.evaluate(on_stage=seen.append)
    tax, se = seen[0].tax, seen[0].tax_se
    assert se is not None and se > 0
    near = ev.evaluate(budget=tax - 0.5 * 1.645 * se, prune_confidence=0.95)
    assert not near.pruned and near.stage == 2  # the point estimate alone would prune it
    assert ev.evaluate(budget=tax - 0.5 * 1.645 * se).pruned
    assert ev.evaluate(budget=tax - 2 * 1.645 * se, prune_confidence=0.95).pruned


def test_holdout_uses_the_holdout_records(job):
    _, merger, tok, ev = job
    merger.apply([0.4, 0.9])
    h = ev.evaluate_holdout()
    want = tasks.perplexity(merger.model, tok, ev.tasks["text"].slices["holdout"])
    assert h.metrics["text"] == pytest.approx(want, rel=1e-6)
    assert h.reward == pytest.approx(
        tasks.preference_margin(merger.model, tok, ev.reward_sets["holdout"]))


def test_base_figures_are_cached_by_checkpoint_and_data(job, tmp_path):
    spec, merger, tok, _ = job
    key = base_cache_key(spec, spec.base_model, device="cpu", dtype="torch.float32")
    assert key == base_cache_key(spec, spec.base_model, device="cpu", dtype="torch.float32")
    merger.apply([0.0, 0.0])
    first = JobEvaluator.load(spec, merger.model, tok)
    assert first.measure_base(cache_dir=tmp_path, cache_key=key) is False
    assert (tmp_path / f"{key}.json").is_file()
    again = JobEvaluator.load(spec, merger.model, tok)
    merger.apply([1.0, 1.0])  # a cache hit must not measure: the live model is not θ_base now
    assert again.measure_base(cache_dir=tmp_path, cache_key=key) is True
    assert again.base == first.base
    # different data, different key
    data = spec.tax.tasks[2].data
    records = [json.loads(line) for line in open(data)]
    changed = tmp_path / "text2.jsonl"
    changed.write_text("".join(json.dumps(r) + "\n" for r in records[:-1]))
    spec2 = spec.model_copy(deep=True)
    spec2.tax.tasks[2].data = str(changed)
    assert base_cache_key(spec2, spec.base_model, device="cpu", dtype="torch.float32") != key


def test_lm_eval_task_counts_toward_the_tax(tmp_path):
    from pathlib import Path

    from workers.evaluate.lmeval import lm_eval_metric

    task_yaml = Path(__file__).parent / "lmeval_task" / "tiny_mc.yaml"
    raw = make_tiny_job(tmp_path)
    raw["tax"]["tasks"] = [{"name": "mc_harness", "type": "lm_eval", "data": str(task_yaml)}]
    spec = JobSpec.model_validate(raw)
    merger = LiveMerger.load(spec.base_model, spec.aligned_model, spec.groups, device="cpu")
    tok = AutoTokenizer.from_pretrained(spec.base_model)
    ev = JobEvaluator.load(spec, merger.model, tok)
    merger.apply([0.0, 0.0])
    ev.measure_base()
    base_acc, higher = lm_eval_metric(merger.model, tok, task_yaml)
    assert ev.base["mc_harness"]["value"] == base_acc
    assert ev.base["mc_harness"]["higher_is_better"] == higher
    merger.apply([1.0, 1.0])
    m = ev.evaluate()
    acc, _ = lm_eval_metric(merger.model, tok, task_yaml)
    assert m.metrics["mc_harness"] == acc
    assert m.tax == pytest.approx((base_acc - acc) / base_acc)
