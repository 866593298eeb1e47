"""HMA's own method: the per-group ratios learned by gradient descent on a proxy.

The merged weights are linear in the ratios, θ(α) = θ_base + α_g·(θ_aligned − θ_base) per
group g, so one backward pass gives the gradient for every group at once:
dL/dα_g = Σ over the tensors W of g of <dL/dW, W_aligned − W_base>. :class:`RatioGradient`
contracts each weight's gradient with its delta as soon as it is accumulated (a
post-accumulate hook) and frees it: memory is the activations plus one tensor's gradient,
never a second model.

The objective (:func:`learn_ratios`), as in the paper: the mean log-likelihood per token of
high-reward responses, the aligned model's own greedy completions to the search prompts
scored by the job's reward model, the top ``top_share`` kept (a preference reward's chosen
responses). With ``mean_ratio`` the paper's parametrisation keeps mean(α) fixed:
α_i = K·ᾱ·(σ(s_i) + ε) / Σ_j (σ(s_j) + ε). Otherwise a differentiable tax proxy (the NLL of
the tax tasks' targets under θ(α) relative to θ_base's: the answer for exact_match, the
correct choice against the others for multiple_choice, the text for perplexity) is held to
a target by a multiplier (dual ascent): the proxy of vanilla averaging at the budget when
the baseline found it, half the aligned model's otherwise. The proxy's scale is not the true
tax's, so the result is a direction: true evaluations then set its scale along its ray
(workers/ray.py), as the warm start's refinement does.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from service.errors import SpecError
from workers.evaluate import tasks as T
from workers.evaluate.lm import batch_logprobs, encode_pairs

log = logging.getLogger(__name__)

#: the paper's ε in the mean-ratio parametrisation
MEAN_RATIO_EPS = 0.1


class RatioGradient:
    """The loss and its gradient with respect to every ratio slot, in one backward pass."""

    def __init__(self, merger) -> None:
        self.merger = merger
        self.grouping = merger.grouping
        entries = {e.live.data_ptr(): e for e in merger.entries}
        self.params = []
        for _, p in merger.model.named_parameters():
            e = entries.pop(p.data_ptr(), None)  # a tied weight is one parameter, once
            if e is not None:
                self.params.append((p, e))

    def __call__(self, ratios: Sequence[float],
                 loss_fn: Callable[[], torch.Tensor]) -> tuple[float, list[float]]:
        self.merger.apply(ratios)
        grads = [0.0] * self.grouping.n_ratios
        hooks, was = [], [p.requires_grad for p, _ in self.params]

        def contract(param, e) -> None:
            d = self.merger.delta_dot(e, param.grad)
            self._credit(e.name, d, grads)
            param.grad = None  # one tensor's gradient alive at a time

        for p, e in self.params:
            p.requires_grad_(True)
            hooks.append(p.register_post_accumulate_grad_hook(
                lambda param, e=e: contract(param, e)))
        try:
            with torch.enable_grad():
                loss = loss_fn()
                loss.backward()
        finally:
            for h in hooks:
                h.remove()
            for (p, _), flag in zip(self.params, was):
                p.requires_grad_(flag)
                p.grad = None
        return float(loss.detach()), grads

    def _credit(self, name: str, d: float, grads: list[float]) -> None:
        kind, value = self.grouping.rules[name]
        if kind == "slot":
            grads[int(value)] += d
        elif kind == "mean":
            n = len(self.grouping.slots) - (1 if self.grouping.spec.non_layer == "own" else 0)
            for i in range(n):
                grads[i] += d / n


def _mean_nll(model, tokenizer, batch) -> torch.Tensor:
    """The mean NLL per continuation token of encoded (context, continuation) pairs."""
    lp = batch_logprobs(model, tokenizer, batch)
    total, count = lp.new_zeros(()), 0
    for i, (ctx, cont) in enumerate(batch):
        if cont:
            pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1, device=lp.device)
            total = total - lp[i, pos, torch.tensor(cont, device=lp.device)].sum()
            count += len(cont)
    return total / max(count, 1)


def _choice_ce(model, tokenizer, records, encoded) -> torch.Tensor:
    """Cross-entropy of the correct choice against the others (sum log-likelihoods)."""
    lp = batch_logprobs(model, tokenizer, [pair for pairs in encoded for pair in pairs])
    out, k = lp.new_zeros(()), 0
    for r, pairs in zip(records, encoded):
        scores = []
        for ctx, cont in pairs:
            pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1, device=lp.device)
            scores.append(lp[k, pos, torch.tensor(cont, device=lp.device)].sum())
            k += 1
        out = out - torch.log_softmax(torch.stack(scores), dim=0)[r["answer"]]
    return out / max(len(records), 1)


@dataclass
class _TaxTerm:
    name: str
    weight: float
    kind: str
    records: list[dict]
    encoded: list
    base: float = 0.0

    def loss(self, model, tokenizer, idx: Sequence[int]) -> torch.Tensor:
        if self.kind == "multiple_choice":
            return _choice_ce(model, tokenizer, [self.records[i] for i in idx],
                              [self.encoded[i] for i in idx])
        return _mean_nll(model, tokenizer, [self.encoded[i] for i in idx])


@dataclass
class GradientResult:
    """The learned ratio vector (a direction where the tax proxy is used) and its cost."""

    ratios: list[float]
    steps: int
    seconds: float
    responses: int
    history: list[dict] = field(default_factory=list)


def high_reward_responses(evaluator, merger, high: float, top_share: float,
                          on_batch=None) -> list[tuple[str, str]]:
    """(prompt, response) pairs the objective's likelihood is taken over."""
    spec = evaluator.spec.reward
    records = evaluator.reward_sets.get("search") or []
    if spec.type == "preference":
        return [(r["prompt"], r["chosen"]) for r in records]
    if spec.type != "reward_model":
        raise SpecError("search.strategy gradient needs a reward_model or preference reward "
                        "(a python reward gives no responses to learn from)",
                        field="search.strategy")
    from workers.evaluate.lm import greedy_generate  # generation: the aligned model's own

    merger.apply([high] * merger.grouping.n_ratios)
    prompts = [r["prompt"] for r in records]
    completions = greedy_generate(merger.model, evaluator.tokenizer, prompts,
                                  max_new_tokens=spec.max_new_tokens,
                                  batch_size=spec.batch_size, on_batch=on_batch)
    scores = T.score_completions(evaluator.reward_model, evaluator.reward_tokenizer, records,
                                 completions, batch_size=spec.batch_size)
    ranked = sorted(zip(scores, prompts, completions), key=lambda x: -x[0])
    keep = max(1, round(len(ranked) * top_share))
    return [(p, c) for _, p, c in ranked[:keep] if c]


def _tax_terms(evaluator, tokenizer, limit: int) -> list[_TaxTerm]:
    terms = []
    for name, task in evaluator.tasks.items():
        kind = task.spec.type
        if kind == "lm_eval":
            continue  # no differentiable proxy: only the true evaluations see it
        records = (task.slices["stage1"] + task.slices["stage2"])[:limit]
        if kind == "exact_match":
            encoded = encode_pairs(tokenizer, [(r["prompt"], r["answer"]) for r in records])
        elif kind == "multiple_choice":
            encoded = [encode_pairs(tokenizer, [(r["prompt"], c) for c in r["choices"]])
                       for r in records]
        else:
            encoded = encode_pairs(tokenizer, [("", r["text"]) for r in records])
        terms.append(_TaxTerm(name, task.spec.weight, kind, records, encoded))
    return terms


def learn_ratios(merger, evaluator, *, low: float, high: float, mean_ratio: float | None,
                 target_ratio: float | None = None, steps: int = 30, lr: float = 0.2,
                 batch: int = 16, top_share: float = 0.5, seed: int = 0,
                 on_batch=None) -> GradientResult:
    """Learn one ratio per slot by Adam on logits (see the module docstring).
    ``target_ratio``: the uniform ratio whose tax proxy the result is held to (vanilla
    averaging at the budget); None: half the aligned model's proxy."""
    started = time.perf_counter()
    tok = evaluator.tokenizer
    rng = random.Random(seed)
    n = merger.grouping.n_ratios
    pairs = high_reward_responses(evaluator, merger, high, top_share, on_batch)
    if not pairs:
        raise SpecError("the gradient stage found no response to learn from", field="reward")
    responses = encode_pairs(tok, pairs)
    terms = [] if mean_ratio is not None else _tax_terms(evaluator, tok, limit=256)
    grad = RatioGradient(merger)
    model = merger.model

    def sample(size: int, k: int) -> list[int]:
        return rng.sample(range(k), min(size, k))

    with torch.no_grad():  # the proxy's reference points, on fixed records
        fixed = {t.name: list(range(min(len(t.encoded), 64))) for t in terms}
        merger.apply([0.0] * n)
        for t in terms:
            t.base = max(float(t.loss(model, tok, fixed[t.name])), 1e-6)
        total_w = sum(t.weight for t in terms) or 1.0

        def proxy_at(ratios) -> float:
            merger.apply(ratios)
            return sum(t.weight * (float(t.loss(model, tok, fixed[t.name])) - t.base) / t.base
                       for t in terms) / total_w

        target = None
        if terms:
            aligned = proxy_at([high] * n)
            target = proxy_at([target_ratio] * n) if target_ratio is not None else aligned / 2
            target = max(target, 1e-4)

    logits = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=lr)
    multiplier = 1.0
    history = []

    def ratios_of(s: torch.Tensor) -> torch.Tensor:
        sig = torch.sigmoid(s)
        if mean_ratio is not None:
            alpha = len(sig) * mean_ratio * (sig + MEAN_RATIO_EPS) / (sig + MEAN_RATIO_EPS).sum()
            return alpha.clamp(low, high)
        return low + (high - low) * sig

    for step in range(steps):
        if on_batch is not None:
            on_batch()
        alpha = ratios_of(logits)
        ratios = [float(a) for a in alpha.detach()]
        idx = sample(batch, len(responses))
        tax_idx = {t.name: sample(max(4, batch // 2), len(t.encoded)) for t in terms}
        parts = {}

        def loss_fn():
            nll = _mean_nll(model, tok, [responses[i] for i in idx])
            parts["nll"] = float(nll.detach())
            loss = nll
            if terms:
                proxy = sum(t.weight * (t.loss(model, tok, tax_idx[t.name]) - t.base) / t.base
                            for t in terms) / total_w
                parts["proxy"] = float(proxy.detach())
                loss = loss + multiplier * proxy / target
            return loss

        loss, d_alpha = grad(ratios, loss_fn)
        opt.zero_grad()
        alpha.backward(torch.tensor(d_alpha, dtype=alpha.dtype))
        opt.step()
        if terms:  # dual ascent: the multiplier rises while the proxy is over its target
            multiplier = max(0.0, multiplier + 0.5 * (parts["proxy"] / target - 1.0))
        history.append({"step": step, "loss": loss, "multiplier": multiplier, **parts,
                        "ratios": ratios})
    final = [float(a) for a in ratios_of(logits).detach()]
    merger.apply(final)
    seconds = time.perf_counter() - started
    log.info("gradient stage: %d steps in %.1f s, ratio %s", steps, seconds,
             [round(r, 4) for r in final])
    return GradientResult(final, steps, seconds, len(responses), history)

