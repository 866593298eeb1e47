"""Greedy generation batched by prompt length (workers/evaluate/lm.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.models import make_char_lm
from workers.evaluate.lm import generation_batch_size, greedy_generate, kv_bytes_per_token

PROMPTS = ["a much longer prompt than the others", "ab", "1+1=", "xyz", "a", "merge me gently",
           "q", "another long-ish prompt here"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    path = make_char_lm(tmp_path_factory.mktemp("genlm") / "lm")
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _one_by_one(model, tok, prompts, n):
    out = []
    for p in prompts:
        ids = torch.tensor([tok(p)["input_ids"]])
        gen = model.generate(input_ids=ids, do_sample=False, max_new_tokens=n, pad_token_id=0,
                             eos_token_id=tok.eos_token_id)
        out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out


def test_by_length_answers_in_the_given_order(lm):
    model, tok = lm
    expected = _one_by_one(model, tok, PROMPTS, 6)
    stats: dict = {}
    by_length = greedy_generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=3,
                                stats=stats)
    as_given = greedy_generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=3,
                               by_length=False)
    assert by_length == expected == as_given
    assert stats["batches"] == 3 and stats["batch_size"] == 3
    assert 0 < stats["tokens"] <= 6 * len(PROMPTS) and stats["seconds"] > 0


def test_batch_size_on_cpu_is_the_requested_one(lm):
    model, _ = lm
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    assert kv_bytes_per_token(model) == 2 * cfg.num_hidden_layers * kv * head_dim * 4
    assert generation_batch_size(model, 7, 100) == 7


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batch_grows_on_cuda_and_answers_stay(lm):
    model, tok = lm
    gpu = model.to("cuda")
    assert generation_batch_size(gpu, 2, 64) > 2
    assert greedy_generate(gpu, tok, PROMPTS, max_new_tokens=6, batch_size=2) == \
        greedy_generate(gpu, tok, PROMPTS, max_new_tokens=6, batch_size=2, by_length=False)
