"""Batched language-model primitives shared by the evaluators.

- :func:`continuation_logprobs`: sum of log-probabilities of a continuation given a context
  (contexts are encoded with the tokenizer's special tokens, continuations without, then
  concatenated, as lm-evaluation-harness does), right padding, one forward pass per batch.
- :func:`greedy_generate`: greedy decoding with left padding and a fixed ``max_new_tokens``;
  the chat template is applied when the tokenizer has one. Prompts are batched by length
  (sorted, then answered in the given order) so a batch pads little; on CUDA the batch grows
  to what the device's memory holds (:func:`generation_batch_size`), and
  ``HMAOPT_GENERATION_CACHE=static`` uses transformers' static KV cache.

Both run under ``torch.inference_mode`` on the model's device and are deterministic.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

import torch

#: Called between batches; raising from it (e.g. a cancel) stops the evaluation there.
BatchHook = Callable[[], None] | None


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer) -> int:
    for tok_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tok_id is not None:
            return int(tok_id)
    return 0


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) per pair: the context with the tokenizer's special
    tokens (BOS/EOS alone when empty, so the first token is scored too), the continuation
    without, as lm-evaluation-harness does."""
    pad = _pad_id(tokenizer)
    encoded = []
    for context, continuation in pairs:
        ctx = tokenizer(context, add_special_tokens=True)["input_ids"] if context else []
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not ctx:
            ctx = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else pad]
        encoded.append((ctx, cont))
    return encoded


def batch_logprobs(model: torch.nn.Module, tokenizer,
                   batch: Sequence[tuple[list[int], list[int]]]) -> torch.Tensor:
    """Log-probabilities (float32, batch x width x vocab) of one right-padded batch of
    encoded pairs; differentiable unless called under inference mode."""
    pad = _pad_id(tokenizer)
    seqs = [ctx + cont for ctx, cont in batch]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    device = _device(model)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    return torch.log_softmax(logits.float(), dim=-1)


@torch.inference_mode()
def continuation_logprobs(
    model: torch.nn.Module,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 16,
    on_batch: BatchHook = None,
) -> list[tuple[float, int]]:
    """(sum log p(continuation | context), number of continuation tokens) per pair."""
    encoded = encode_pairs(tokenizer, pairs)
    results: list[tuple[float, int]] = []
    for start in range(0, len(encoded), batch_size):
        if on_batch is not None:
            on_batch()
        batch = encoded[start:start + batch_size]
        logprobs = batch_logprobs(model, tokenizer, batch).cpu()
        for i, (ctx, cont) in enumerate(batch):
            if not cont:
                results.append((0.0, 0))
                continue
            positions = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
            picked = logprobs[i, positions, torch.tensor(cont)]
            results.append((float(picked.sum()), len(cont)))
    return results


def format_prompt(tokenizer, prompt: str) -> str:
    """The prompt through the tokenizer's chat template when it has one, else unchanged."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


#: share of a CUDA device's memory (beyond the weights resident there) that the KV cache of
#: one generation batch may take
KV_CACHE_SHARE = 0.25
#: the largest generation batch chosen from memory
MAX_GENERATION_BATCH = 256


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of KV cache one token takes in ``model`` (keys and values, every layer)."""
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    layers = getattr(cfg, "num_hidden_layers", 1)
    heads = getattr(cfg, "num_attention_heads", 1)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or getattr(cfg, "hidden_size", heads) // heads
    itemsize = next(model.parameters()).element_size()
    return 2 * layers * kv_heads * head_dim * itemsize


def generation_batch_size(model: torch.nn.Module, requested: int, tokens: int) -> int:
    """The batch of a generation of sequences up to ``tokens`` long: ``requested`` on CPU; on
    CUDA as many as :data:`KV_CACHE_SHARE` of the memory beyond the resident weights holds
    (at least ``requested``). Computed from the device's total memory, not its free memory,
    so the same job on the same kind of device batches (and rounds) the same way."""
    device = _device(model)
    if device.type != "cuda":
        return requested
    total = torch.cuda.get_device_properties(device).total_memory
    weights = sum(p.numel() * p.element_size() for p in model.parameters()
                  if p.device == device)
    room = max(0, total - 3 * weights) * KV_CACHE_SHARE  # 3: the merge's worst case
    fits = int(room // max(1, kv_bytes_per_token(model) * tokens))
    return max(requested, min(MAX_GENERATION_BATCH, fits))


@torch.inference_mode()
def greedy_generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    chat: bool = True,
    on_batch: BatchHook = None,
    by_length: bool = True,
    stats: dict | None = None,
) -> list[str]:
    """Greedy completions (the new text only) of ``prompts``, left-padded, in batches.

    ``by_length``: batch the prompts in order of token length (answers come back in the given
    order). ``stats``, when given, receives ``tokens`` (generated, padding excluded),
    ``seconds`` and ``batches``.
    """
    device = _device(model)
    pad = _pad_id(tokenizer)
    texts = [format_prompt(tokenizer, p) if chat else p for p in prompts]
    encoded = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    order = (sorted(range(len(encoded)), key=lambda i: len(encoded[i])) if by_length
             else list(range(len(encoded))))
    longest = max((len(e) for e in encoded), default=0) + max_new_tokens
    size = generation_batch_size(model, batch_size, longest)
    extra = {}
    if os.environ.get("HMAOPT_GENERATION_CACHE", "dynamic") == "static" and device.type == "cuda":
        extra["cache_implementation"] = "static"
    answers: dict[int, str] = {}
    made, started, batches = 0, time.perf_counter(), 0
    for start in range(0, len(order), size):
        if on_batch is not None:
            on_batch()
        rows = order[start:start + size]
        batch = [encoded[i] for i in rows]
        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, s in enumerate(batch):
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
        generated = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
            max_new_tokens=max_new_tokens, pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id, **extra,
        )
        batches += 1
        for i, row in zip(rows, generated[:, width:].cpu().tolist()):
            answers[i] = tokenizer.decode(row, skip_special_tokens=True)
            made += sum(1 for t in row if t != pad)
    if stats is not None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stats.update(tokens=made, seconds=time.perf_counter() - started, batches=batches,
                     batch_size=size)
    return [answers[i] for i in range(len(encoded))]
