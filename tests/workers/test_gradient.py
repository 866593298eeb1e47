"""workers/gradient.py: the ratio gradient in one backward pass, and the gradient stage."""

from __future__ import annotations

import pytest
import torch

from service.spec import JobSpec
from tests.models import make_tiny_job
from workers.evaluate.lm import encode_pairs
from workers.gradient import RatioGradient, _mean_nll, learn_ratios
from workers.job import load_job, measure_base


def _central_difference(merger, loss_fn, ratios, h: float = 1e-2) -> list[float]:
    """d loss / d ratio_i by central differences (float32 weights: a step large enough to
    rise above rounding)."""
    out = []
    for i in range(len(ratios)):
        up, down = list(ratios), list(ratios)
        up[i] += h
        down[i] -= h
        with torch.no_grad():
            merger.apply(up)
            f_up = float(loss_fn())
            merger.apply(down)
            f_down = float(loss_fn())
        out.append((f_up - f_down) / (2 * h))
    return out


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    raw = make_tiny_job(tmp_path_factory.mktemp("gradient"))
    spec = JobSpec.model_validate(raw)
    merger, ev = load_job(spec, device="cpu")
    measure_base(merger, ev)
    return spec, merger, ev


@pytest.mark.parametrize("groups", [{"scheme": "blocks", "k": 2},
                                    {"scheme": "blocks", "k": 2, "split_attn_mlp": True}])
def test_ratio_gradient_matches_a_finite_difference(tmp_path, groups):
    raw = make_tiny_job(tmp_path)
    raw["groups"] = groups
    merger, ev = load_job(JobSpec.model_validate(raw), device="cpu")
    pairs = encode_pairs(ev.tokenizer, [("Q1:", " yes!"), ("the cat", " sat on the mat.")])

    def loss_fn():
        return _mean_nll(merger.model, ev.tokenizer, pairs)

    ratios = [0.3, 0.6, 0.5, 0.4][:merger.grouping.n_ratios]
    loss, g = RatioGradient(merger)(ratios, loss_fn)
    for i, fd in enumerate(_central_difference(merger, loss_fn, ratios)):
        assert g[i] == pytest.approx(fd, rel=2e-2, abs=1e-4), i
    assert any(abs(v) > 1e-3 for v in g)  # not trivially zero
    assert all(p.grad is None for p in merger.model.parameters())  # contracted and freed


def test_gradient_stage_raises_the_likelihood_and_keeps_the_mean_ratio(job):
    spec, merger, ev = job
    result = learn_ratios(merger, ev, low=0.0, high=1.0, mean_ratio=0.4, steps=8, lr=0.3)
    assert sum(result.ratios) / len(result.ratios) == pytest.approx(0.4, abs=1e-6)
    first, last = result.history[0], result.history[-1]
    assert last["nll"] < first["nll"]  # the chosen responses became more likely
    assert result.seconds > 0 and result.steps == 8 and result.responses > 0
    free = learn_ratios(merger, ev, low=0.0, high=1.0, mean_ratio=None, steps=8, lr=0.3)
    assert len(free.ratios) == merger.grouping.n_ratios
    assert all(0.0 <= r <= 1.0 for r in free.ratios)
    assert "proxy" in free.history[0] and "multiplier" in free.history[-1]


@pytest.mark.parametrize("groups", [{"scheme": "blocks", "k": 3},
                                    {"scheme": "layers", "split_attn_mlp": True}])
def test_ratio_gradient_on_gpt2_with_tied_embeddings(tmp_path, groups):
    """GPT-2: one tied embedding tensor (input and output, merged once with the first slot),
    Conv1D projections stored (in, out), LayerNorm biases: the one-pass gradient still
    matches a finite difference for every slot."""
    from tests.models import make_char_lm

    raw = make_tiny_job(tmp_path)
    for name, seed in (("base", 0), ("aligned", 1)):
        make_char_lm(tmp_path / f"gpt2-{name}", seed=seed, model_type="gpt2")
        raw[f"{name}_model"] = str(tmp_path / f"gpt2-{name}")
    raw["groups"] = groups
    merger, ev = load_job(JobSpec.model_validate(raw), device="cpu")
    model = merger.model
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [e.name for e in merger.entries]
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names
    grad = RatioGradient(merger)
    assert len(grad.params) == len(merger.entries)  # the tied weight once
    pairs = encode_pairs(ev.tokenizer, [("Q1:", " yes!"), ("the cat", " sat on the mat.")])

    def loss_fn():
        return _mean_nll(model, ev.tokenizer, pairs)

    n = merger.grouping.n_ratios
    ratios = [0.2 + 0.6 * i / max(n - 1, 1) for i in range(n)]
    _, g = grad(ratios, loss_fn)
    for i, fd in enumerate(_central_difference(merger, loss_fn, ratios)):
        assert g[i] == pytest.approx(fd, rel=3e-2, abs=2e-4), i
    assert abs(g[0]) > 1e-4  # the embedding's slot moves the loss
