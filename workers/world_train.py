"""Training the reference world's models (workers/world.py builds it): packed LM batches,
causal-LM fine-tuning of all or some parameters, and the reward model's Bradley-Terry loss."""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence

import torch


def packed_batches(lines: Sequence[str], tok, batch_size: int, seq_len: int, steps: int,
             rng: random.Random):
    """Packed batches: lines (each ``<s> text </s>``) shuffled, concatenated, cut into windows."""
    encoded = [tok(line)["input_ids"] + [tok.eos_token_id] for line in lines]
    stream: list[int] = []
    order: list[int] = []
    for _ in range(steps):
        rows = []
        for _ in range(batch_size):
            while len(stream) < seq_len:
                if not order:
                    order = list(range(len(encoded)))
                    rng.shuffle(order)
                stream.extend(encoded[order.pop()])
            rows.append(stream[:seq_len])
            del stream[:seq_len]
        ids = torch.tensor(rows, dtype=torch.long)
        yield ids, ids


def train_lm(model, lines, tok, *, steps: int, lr: float, batch_size: int, seq_len: int,
              seed: int,
              progress: Callable[[str, int, int, float], None] | None, stage: str,
              params=None) -> list[float]:
    """Train ``params`` (default: all of the model's) on ``lines`` for ``steps`` steps."""
    torch.manual_seed(seed)
    params = list(model.parameters()) if params is None else list(params)
    trained = {id(p) for p in params}
    before = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():  # no gradients for the rest (and none left on them)
        p.requires_grad_(id(p) in trained)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * max(0.05, 1 - s / max(steps, 1)))
    model.train()
    losses = []
    try:
        for step, (ids, labels) in enumerate(packed_batches(lines, tok, batch_size, seq_len, steps,
                                                      random.Random(seed)), start=1):
            loss = model(input_ids=ids, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if progress and (step % 50 == 0 or step == steps):
                progress(stage, step, steps, sum(losses[-50:]) / len(losses[-50:]))
    finally:
        for p in model.parameters():
            p.requires_grad_(before[id(p)])
    model.eval()
    return losses


def tail_mean(losses: Sequence[float]) -> float | None:
    """The mean of the last 50 losses (None for a stage of 0 steps)."""
    tail = losses[-50:]
    return sum(tail) / len(tail) if tail else None


def top_parameters(model, n_layers: int, top: int) -> list:
    """The parameters of the top ``top`` decoder layers, the final norm and an untied output
    head (a tied head is the input embedding, which stays); every parameter for ``top`` 0."""
    if top <= 0:
        return list(model.parameters())
    first = n_layers - top
    chosen = []
    for name, p in model.named_parameters():  # a tied head is listed once, as the embedding
        layer = re.search(r"\.(?:layers|h)\.(\d+)\.", name)
        if (layer and int(layer.group(1)) >= first) or name.startswith(
                ("model.norm.", "transformer.ln_f.", "lm_head.")):
            chosen.append(p)
    return chosen


def train_reward(model, pairs: Sequence[tuple[str, str]], tok, *, steps: int, batch_size: int,
                  seed: int, progress, lr: float = 2e-3) -> list[float]:
    """Bradley-Terry: -log sigmoid(r(chosen) - r(rejected))."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for step in range(1, steps + 1):
        batch = [pairs[rng.randrange(len(pairs))] for _ in range(batch_size // 2)]
        texts = [c for c, _ in batch] + [r for _, r in batch]
        enc = tok(texts, return_tensors="pt", padding=True)
        scores = model(**enc).logits[:, 0]
        half = len(batch)
        loss = -torch.nn.functional.logsigmoid(scores[:half] - scores[half:]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if progress and (step % 50 == 0 or step == steps):
            progress("reward model", step, steps, sum(losses[-50:]) / len(losses[-50:]))
    model.eval()
    return losses
