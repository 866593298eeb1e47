"""The reference world: small real models with a real alignment tax, built on CPU in minutes.

``hmaopt world build DIR`` writes::

    DIR/models/base      a 6-layer character-level Llama pretrained on three skills:
                         addition ("12+7=19"), facts ("zorp is red.") and a toy grammar,
                         plus plain question answering ("Q: ...\\nA: the cat is small.")
    DIR/models/aligned   the base model fine-tuned toward a style preference (cheerful
                         answers: "A: Yay! the cat is small :)") on style data only (asking
                         about half of the facts), long enough that it clearly forgets
                         addition and the grammar: a real alignment tax
    DIR/models/reward    a small sequence-classification reward model for the style, trained
                         on (styled, plain) answer pairs with the Bradley-Terry loss
    DIR/data/*.jsonl     reward prompts, preference pairs and the three tax sets
    DIR/spec.yaml        a ready job spec (blocks:3, reward_model, three tax tasks)
    DIR/world.json       what was built: version, seeds, losses, skill scores, seconds

Everything is seeded; the same machine builds the same world. The alignment step is
"reward-ranked fine-tuning" in its simplest form (SFT on the responses the reward prefers),
the family the HMA paper's RSF/RAFT runs belong to.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from service.errors import ConflictError

log = logging.getLogger(__name__)

#: bump when the world's recipe changes: cached worlds of another version are rebuilt
WORLD_VERSION = 1

COLOURS = ("red", "blue", "green", "gold", "pink", "grey")
ANIMALS = ("cat", "dog", "fox", "owl", "bee", "cow", "pig", "hen")
ADJECTIVES = ("big", "small", "calm", "loud", "shy", "quick")
VERBS = ("sees", "likes", "finds", "helps", "meets", "hears")
PLACES = ("park", "barn", "lake", "hill", "road", "yard")
N_ENTITIES = 48
MAX_ADDEND = 29


@dataclass
class WorldConfig:
    """The recipe. The defaults build in about three minutes on two CPU cores."""

    seed: int = 0
    layers: int = 6
    hidden: int = 64
    heads: int = 4
    intermediate: int = 192
    pretrain_steps: int = 1500
    pretrain_lr: float = 3e-3
    align_steps: int = 300
    align_lr: float = 2e-3
    reward_steps: int = 200
    batch_size: int = 64
    seq_len: int = 64
    budget: float = 0.1
    n_trials: int = 40


# --------------------------------------------------------------------------- data


def _entities(rng: random.Random) -> list[str]:
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    names: list[str] = []
    while len(names) < N_ENTITIES:
        name = (rng.choice(consonants) + rng.choice(vowels) + rng.choice(consonants)
                + rng.choice(vowels) + rng.choice(consonants))
        if name not in names:
            names.append(name)
    return names


def _sentence(rng: random.Random) -> str:
    a1, a2 = rng.sample(ANIMALS, 2)
    return (f"the {rng.choice(ADJECTIVES)} {a1} {rng.choice(VERBS)} "
            f"the {rng.choice(ADJECTIVES)} {a2} in the {rng.choice(PLACES)}.")


def _question(rng: random.Random, facts: dict[str, str]) -> tuple[str, str]:
    """A chat question and its plain answer."""
    kind = rng.randrange(3)
    if kind == 0:
        animal, adj = rng.choice(ANIMALS), rng.choice(ADJECTIVES)
        return f"Q: tell me about the {animal}\nA:", f" the {animal} is {adj}."
    if kind == 1:
        place, animal = rng.choice(PLACES), rng.choice(ANIMALS)
        return f"Q: who is in the {place}?\nA:", f" the {animal} is in the {place}."
    name = rng.choice(sorted(facts))
    return f"Q: what about {name}?\nA:", f" {name} is {facts[name]}."


def _styled(answer: str) -> str:
    """The preferred style: cheerful, 'Yay!' in front and ':)' at the end."""
    return " Yay!" + answer.rstrip(".") + " :)"


@dataclass
class WorldData:
    facts: dict[str, str]
    pretrain: list[str]
    align: list[str]
    sets: dict[str, list[dict]]


def make_data(seed: int) -> WorldData:
    rng = random.Random(seed)
    names = _entities(rng)
    facts = {n: rng.choice(COLOURS) for n in names}
    sums = [(a, b) for a in range(MAX_ADDEND + 1) for b in range(MAX_ADDEND + 1)]
    rng.shuffle(sums)
    eval_sums, train_sums = sums[:60], sums[60:]
    text_eval = sorted({_sentence(random.Random(seed * 1000 + i)) for i in range(60)})

    pretrain: list[str] = []
    pretrain += [f"{a}+{b}={a + b}" for a, b in train_sums + eval_sums]  # a pretrained skill
    pretrain += [f"{n} is {c}." for n, c in facts.items()] * 6
    pretrain += [s for s in (_sentence(rng) for _ in range(1500)) if s not in text_eval]
    for _ in range(600):
        q, a = _question(rng, facts)
        pretrain.append(q + a)

    # the alignment data asks about half of the facts only: the other half fade
    asked = {n: facts[n] for n in names[: N_ENTITIES // 2]}
    align = []
    for _ in range(1200):
        q, a = _question(rng, asked)
        align.append(q + _styled(a))

    prompt_rng = random.Random(seed + 7)
    prompts = sorted({_question(prompt_rng, facts)[0] for _ in range(400)})[:48]
    pairs = []
    for _ in range(48):
        q, a = _question(prompt_rng, facts)
        pairs.append({"prompt": q, "chosen": _styled(a), "rejected": a})
    choices_rng = random.Random(seed + 11)
    mc = []
    for n in names:
        options = [facts[n], *choices_rng.sample([c for c in COLOURS if c != facts[n]], 3)]
        choices_rng.shuffle(options)
        mc.append({"prompt": f"{n} is", "choices": [f" {o}" for o in options],
                   "answer": options.index(facts[n])})
    sets = {
        "reward_prompts": [{"prompt": p} for p in prompts],
        "preference": pairs,
        "addition": [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in eval_sums],
        "facts": mc,
        "text": [{"text": t} for t in text_eval],
    }
    return WorldData(facts, pretrain, align, sets)


# --------------------------------------------------------------------------- training


def _batches(lines: Sequence[str], tok, batch_size: int, seq_len: int, steps: int,
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


def _train_lm(model, lines, tok, *, steps: int, lr: float, batch_size: int, seq_len: int,
              seed: int,
              progress: Callable[[str, int, int, float], None] | None, stage: str) -> list[float]:
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * max(0.05, 1 - s / steps))
    model.train()
    losses = []
    for step, (ids, labels) in enumerate(_batches(lines, tok, batch_size, seq_len, steps,
                                                  random.Random(seed)), start=1):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress and (step % 50 == 0 or step == steps):
            progress(stage, step, steps, sum(losses[-50:]) / len(losses[-50:]))
    model.eval()
    return losses


def _train_reward(model, pairs: Sequence[tuple[str, str]], tok, *, steps: int, batch_size: int,
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


def _lm_config(cfg: WorldConfig, tok):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads, max_position_embeddings=128, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id)


def _write_jsonl(path: Path, records: Sequence[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def spec_dict(cfg: WorldConfig) -> dict:
    """The world's ready job spec (paths relative to the world folder)."""
    return {
        "name": "reference-world",
        "base_model": "models/base",
        "aligned_model": "models/aligned",
        "groups": {"scheme": "blocks", "k": 3},
        "ratio_bounds": [0.0, 1.0],
        "reward": {"type": "reward_model", "model": "models/reward",
                   "prompts": "data/reward_prompts.jsonl", "max_new_tokens": 24,
                   "batch_size": 48},
        "tax": {"budget": cfg.budget, "tasks": [
            {"name": "addition", "type": "exact_match", "data": "data/addition.jsonl",
             "max_new_tokens": 4, "batch_size": 60},
            {"name": "facts", "type": "multiple_choice", "data": "data/facts.jsonl",
             "batch_size": 96},
            {"name": "text", "type": "perplexity", "data": "data/text.jsonl", "batch_size": 60},
        ]},
        "search": {"sampler": "tpe", "n_trials": cfg.n_trials, "seed": 0, "pruning": True,
                   "holdout_fraction": 0.3},
        "mode": "constrained",
    }


def skill_scores(model, tok, sets: dict[str, list[dict]]) -> dict[str, float]:
    from workers.evaluate import tasks

    return {
        "addition": tasks.exact_match_accuracy(model, tok, sets["addition"], max_new_tokens=4,
                                               batch_size=60),
        "facts": tasks.multiple_choice_accuracy(model, tok, sets["facts"], batch_size=96),
        "text": tasks.perplexity(model, tok, sets["text"], batch_size=60),
    }


def build_world(out: str | Path, cfg: WorldConfig | None = None, *, overwrite: bool = False,
                progress: Callable[[str, int, int, float], None] | None = None) -> dict:
    """Build the reference world into ``out`` (atomically: a temp folder renamed into place)."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from workers.chartok import char_tokenizer
    from workers.evaluate import tasks

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cfg = cfg or WorldConfig()
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConflictError(f"{out} already exists (use --overwrite to rebuild)")
    tmp = out.with_name(f".{out.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "models").mkdir(parents=True)
    (tmp / "data").mkdir()
    started = time.perf_counter()
    tok = char_tokenizer()
    data = make_data(cfg.seed)
    for name, records in data.sets.items():
        _write_jsonl(tmp / "data" / f"{name}.jsonl", records)

    torch.manual_seed(cfg.seed)
    base = LlamaForCausalLM(_lm_config(cfg, tok))
    pre_losses = _train_lm(base, data.pretrain, tok, steps=cfg.pretrain_steps, lr=cfg.pretrain_lr,
                           batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed, progress=progress,
                           stage="pretrain base")
    base.save_pretrained(tmp / "models" / "base")
    tok.save_pretrained(tmp / "models" / "base")
    base_scores = skill_scores(base, tok, data.sets)

    aligned = base
    align_losses = _train_lm(aligned, data.align, tok, steps=cfg.align_steps, lr=cfg.align_lr,
                             batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed + 1,
                             progress=progress,
                             stage="align")
    aligned.save_pretrained(tmp / "models" / "aligned")
    tok.save_pretrained(tmp / "models" / "aligned")
    aligned_scores = skill_scores(aligned, tok, data.sets)

    torch.manual_seed(cfg.seed + 2)
    rm_config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, num_labels=1,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id)
    rm = LlamaForSequenceClassification(rm_config)
    rm_rng = random.Random(cfg.seed + 3)
    rm_pairs = []
    for _ in range(1000):
        q, a = _question(rm_rng, data.facts)
        rm_pairs.append((q + _styled(a), q + a))
    rm_losses = _train_reward(rm, rm_pairs, tok, steps=cfg.reward_steps,
                              batch_size=cfg.batch_size, seed=cfg.seed + 2, progress=progress)
    rm.save_pretrained(tmp / "models" / "reward")
    tok.save_pretrained(tmp / "models" / "reward")

    import yaml

    (tmp / "spec.yaml").write_text(yaml.safe_dump(spec_dict(cfg), sort_keys=False))

    base_model = LlamaForCausalLM.from_pretrained(tmp / "models" / "base").eval()
    rewards = {}
    for label, model in (("base", base_model), ("aligned", aligned)):
        rewards[label] = tasks.reward_model_score(model, tok, rm, tok, data.sets["reward_prompts"],
                                                  max_new_tokens=24, batch_size=48)
    info = {
        "version": WORLD_VERSION,
        "config": {k: v for k, v in cfg.__dict__.items()},
        "seconds": round(time.perf_counter() - started, 1),
        "torch_threads": torch.get_num_threads(),
        "losses": {"pretrain_final": sum(pre_losses[-50:]) / 50,
                   "align_final": sum(align_losses[-50:]) / 50,
                   "reward_final": sum(rm_losses[-50:]) / 50},
        "skills": {"base": base_scores, "aligned": aligned_scores},
        "reward": rewards,
    }
    (tmp / "world.json").write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return info


def load_world_info(folder: str | Path) -> dict | None:
    """The world.json of a built world of the current version, else None."""
    file = Path(folder) / "world.json"
    try:
        info = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return info if info.get("version") == WORLD_VERSION else None


def ensure_world(folder: str | Path, cfg: WorldConfig | None = None, progress=None) -> Path:
    """Build the world into ``folder`` unless a world of this version is already there."""
    folder = Path(folder)
    if load_world_info(folder) is None:
        build_world(folder, cfg, overwrite=True, progress=progress)
    return folder
