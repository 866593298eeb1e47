"""Evaluators against independent, unbatched computations on a tiny real model."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from service.errors import SpecError
from tests.models import make_char_lm
from workers.evaluate import tasks
from workers.evaluate.lm import continuation_logprobs, greedy_generate


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    path = make_char_lm(tmp_path_factory.mktemp("lm") / "m", seed=3)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _loglik(model, tok, context, continuation):
    """One sequence, no padding, no batching: the reference."""
    ctx = tok(context)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


PAIRS = [("2+2=", " 4"), ("The capital of France is", " Paris"), ("x", "yz, a longer continuation")]


def test_continuation_logprobs_match_unbatched_reference(lm):
    model, tok = lm
    got = continuation_logprobs(model, tok, PAIRS, batch_size=2)
    for (c, x), (score, n) in zip(PAIRS, got):
        assert n == len(x)
        assert score == pytest.approx(_loglik(model, tok, c, x), abs=1e-4)


def test_multiple_choice_accuracy(lm):
    model, tok = lm
    records = [{"prompt": p, "choices": [c, " q", " zz"], "answer": a}
               for (p, c) in PAIRS for a in range(3)]
    expected = 0
    for r in records:
        lls = [_loglik(model, tok, r["prompt"], c) for c in r["choices"]]
        expected += int(max(range(3), key=lls.__getitem__) == r["answer"])
    acc = tasks.multiple_choice_accuracy(model, tok, records, batch_size=4)
    assert acc == pytest.approx(expected / len(records))
    assert acc == pytest.approx(1 / 3)  # each prompt has exactly one correct answer index


def test_perplexity_matches_loss(lm):
    model, tok = lm
    texts = [{"text": "hello world"}, {"text": "a"}, {"text": "merge me gently"}]
    nll, n = 0.0, 0
    for r in texts:
        ids = torch.tensor([tok(r["text"])["input_ids"]])
        with torch.no_grad():
            loss = model(ids, labels=ids).loss  # mean over len-1 predicted tokens
        nll += float(loss) * (ids.shape[1] - 1)
        n += ids.shape[1] - 1
    assert tasks.perplexity(model, tok, texts, batch_size=2) == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_greedy_generation_batched_equals_one_by_one(lm):
    model, tok = lm
    prompts = ["ab", "a much longer prompt", "1+1="]
    batched = greedy_generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    for p, out in zip(prompts, batched):
        ids = torch.tensor([tok(p)["input_ids"]])
        gen = model.generate(input_ids=ids, do_sample=False, max_new_tokens=6, pad_token_id=0,
                             eos_token_id=tok.eos_token_id)
        assert out == tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)


def test_exact_match_uses_normalised_comparison(lm):
    model, tok = lm
    prompts = ["ab", "1+1=", "xyz"]
    outs = greedy_generate(model, tok, prompts, max_new_tokens=5)
    records = [{"prompt": p, "answer": "  " + o.upper() + "." } for p, o in zip(prompts, outs)]
    records.append({"prompt": "ab", "answer": "certainly not this"})
    assert tasks.exact_match_accuracy(model, tok, records, max_new_tokens=5) == pytest.approx(0.75)
    assert tasks.normalize_answer("  The Answer.\nmore") == "the answer"


def test_preference_margin(lm):
    model, tok = lm
    records = [{"prompt": "Q:", "chosen": " yes", "rejected": " no"},
               {"prompt": "hi", "chosen": " there", "rejected": " you"}]
    expected = sum(_loglik(model, tok, r["prompt"], r["chosen"]) - _loglik(model, tok, r["prompt"], r["rejected"])
                   for r in records) / 2
    assert tasks.preference_margin(model, tok, records) == pytest.approx(expected, abs=1e-4)


def test_reward_model_scores_the_completions(lm, tmp_path):
    from transformers import LlamaConfig

    model, tok = lm
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0)
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_config(cfg).eval()
    records = [{"prompt": "ab"}, {"prompt": "a longer prompt"}]
    outs = greedy_generate(model, tok, [r["prompt"] for r in records], max_new_tokens=4)
    expected = 0.0
    for r, o in zip(records, outs):
        ids = torch.tensor([tok(r["prompt"] + o)["input_ids"]])
        with torch.no_grad():
            expected += float(rm(ids).logits[0, 0])
    got = tasks.reward_model_score(model, tok, rm, tok, records, max_new_tokens=4, batch_size=2)
    assert got == pytest.approx(expected / 2, abs=1e-4)


def test_relative_degradation():
    assert tasks.relative_degradation(0.8, 1.0, True) == pytest.approx(0.2)
    assert tasks.relative_degradation(12.0, 10.0, False) == pytest.approx(0.2)
    assert tasks.relative_degradation(1.1, 1.0, True) == pytest.approx(-0.1)


def test_python_reward_loading(tmp_path, monkeypatch):
    (tmp_path / "myreward.py").write_text("def score(model, tokenizer):\n    return 0.5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert tasks.load_python_reward("myreward:score")(None, None) == 0.5
    with pytest.raises(SpecError, match="reward.function: cannot import"):
        tasks.load_python_reward("myreward:nothing")
    sys.modules.pop("myreward", None)


def test_batch_hook_can_stop_an_evaluation(lm):
    model, tok = lm
    calls = []

    def hook():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tasks.perplexity(model, tok, [{"text": "abc"}] * 5, batch_size=2, on_batch=hook)
    assert len(calls) == 2


# ------------------------------------------------------------------ per-record tax and its SE

def test_task_tax_of_an_accuracy_is_paired_with_the_base_records():
    from service.stats import paired_interval

    base = tasks.PerRecord([1, 1, 1, 0, 1, 1, 0, 1], [1] * 8)
    merged = tasks.PerRecord([1, 0, 1, 0, 1, 0, 0, 1], [1] * 8)
    metric, tax, se = tasks.task_tax("exact_match", merged, base, True)
    assert metric == 0.5 and tax == pytest.approx((0.75 - 0.5) / 0.75)
    # the delta method by hand: tax = 1 - m / b, record i moves it by
    # (-(x_i - m) + (m / b) (y_i - b)) / b; its SE is that influence's sd / sqrt(n)
    m, b = 0.5, 0.75
    infl = [(-(x - m) + m / b * (y - b)) / b for x, y in zip(merged.totals, base.totals)]
    mean = sum(infl) / 8
    assert se == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in infl) / 7 / 8))
    # close to the paired difference of accuracies over the base accuracy
    d = paired_interval(base.totals, merged.totals)
    assert se == pytest.approx(d.se / b, rel=0.35)
    same_metric, same_tax, same_se = tasks.task_tax("exact_match", base, base, True)
    assert same_tax == 0.0 and same_se == pytest.approx(0.0, abs=1e-12)  # θ_base: no tax, no spread


def test_task_tax_of_a_perplexity_matches_the_metric_and_has_a_spread():
    base = tasks.PerRecord([10.0, 12.0, 9.0, 11.0], [5.0, 6.0, 4.0, 5.0])
    merged = tasks.PerRecord([11.0, 12.5, 10.0, 13.0], [5.0, 6.0, 4.0, 5.0])
    metric, tax, se = tasks.task_tax("perplexity", merged, base, False)
    want = tasks.finish_metric("perplexity", *merged.sums())
    base_ppl = tasks.finish_metric("perplexity", *base.sums())
    assert metric == pytest.approx(want) and tax == pytest.approx((want - base_ppl) / base_ppl)
    assert se is not None and 0 < se < tax
    with pytest.raises(Exception, match="θ_base cache is stale"):
        tasks.task_tax("perplexity", merged, tasks.PerRecord([1.0], [1.0]), False)
