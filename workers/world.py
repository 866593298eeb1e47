"""The reference world: small real models with a real alignment tax, built on CPU in minutes.

``hmaopt world build DIR`` writes::

    DIR/models/base      a 6-layer character-level Llama pretrained on three skills:
                         addition ("12+7=19"), facts ("zorp is red.") and a toy grammar,
                         plus plain question answering ("Q: ...\\nA: the cat is small.")
    DIR/models/aligned   the base model after a two-stage alignment run (asking about half
                         of the facts): chat fine-tuning of the whole model on plain answers,
                         then a preference stage on the top layers only (cheerful answers:
                         "A: Yay! the cat is small :)"), long enough that it clearly forgets
                         addition and the grammar: a real alignment tax
    DIR/models/reward    a small sequence-classification reward model for the style, trained
                         on (styled, plain) answer pairs with the Bradley-Terry loss
    DIR/data/*.jsonl     the job's data: 960 reward prompts, 300 preference pairs and the
                         three tax sets, 300 items each (see :mod:`workers.world_data`)
    DIR/data/fresh/*.jsonl  a fresh test split: the same generators and sizes, records
                         disjoint from the job's (and, like the job's sentences, never
                         pretraining text); no job reads them. A benchmark measures a
                         search's winner on them to see whether its held-out figures
                         generalise beyond the data the search and its holdout touched
    DIR/spec.yaml        a ready job spec (blocks:3, reward_model, three tax tasks)
    DIR/world.json       what was built: version, seeds, losses, seconds, set sizes, skill
                         scores and rewards of base and aligned (also on the fresh split),
                         and the reward of each reward prompt (for standard errors)

``hmaopt world build DIR --arch gpt2`` builds the second world: the same data, tokenizer,
training recipe and reward model, with base and aligned a GPT-2-style model instead (tied
input/output embeddings, LayerNorm with biases, learned positions, Conv1D projections named
``transformer.h.<i>.attn.c_attn`` ...), so a search can be checked on an architecture other
than the one it was tuned on. Its spec is named ``gpt2-world``.

Everything is seeded; the same machine builds the same world. The preference stage is
"reward-ranked fine-tuning" in its simplest form (SFT on the responses the reward prefers),
the family the HMA paper's RSF/RAFT runs belong to.

Why two stages (world v4). With one stage on the whole model (v3), the style needed every
block to move together: no per-group merge of blocks:3 beat vanilla averaging tuned to the
budget by more than the noise, so the world could not show what HMA is for. Real alignment
runs are staged (SFT, then RLHF), and the paper found that the low layers carry more of the
forgetting than of the reward ("averaging only the low layers improved both reward and NLP
scores"). v4 builds that in, the way a pipeline would: the chat stage moves every layer (a
tax with no reward), and the preference stage trains ``align_layers`` top layers and the
output head (the reward, and a tax of its own). Measured on one build (320 prompts): the top
block alone at 0.7 costs the tax of vanilla averaging at 0.6 (0.054) for a reward 1.3
higher. The structure is there to be found; the search does not know it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from service.errors import ConflictError, SpecError
from workers.world_data import WorldData, make_data, question, styled
from workers.world_train import tail_mean, train_lm, train_reward, top_parameters

__all__ = ["ARCHES", "WORLD_VERSION", "WorldConfig", "WorldData", "build_world", "ensure_world",
           "load_world_info", "make_data", "skill_scores", "spec_dict"]

log = logging.getLogger(__name__)

#: bump when the world's recipe changes: cached worlds of another version are rebuilt
WORLD_VERSION = 4



@dataclass
class WorldConfig:
    """The recipe. The defaults build in 5–9 minutes on two CPU cores (8.5 measured under load)."""

    seed: int = 0
    layers: int = 6
    hidden: int = 64
    heads: int = 4
    intermediate: int = 192
    pretrain_steps: int = 1500
    pretrain_lr: float = 3e-3
    #: the alignment run's first stage: the whole model, plain chat answers
    chat_steps: int = 200
    #: its preference stage: styled answers, on the top ``align_layers`` layers, the final
    #: norm and an untied output head (0: every parameter)
    align_steps: int = 150
    align_layers: int = 2
    align_lr: float = 2e-3
    reward_steps: int = 200
    batch_size: int = 64
    seq_len: int = 64
    budget: float = 0.1
    n_trials: int = 40
    #: the base and aligned models' family: "llama" (the reference world: untied embeddings,
    #: RMSNorm, rotary positions) or "gpt2" (a second architecture: tied input and output
    #: embeddings, LayerNorm with biases, learned positions, Conv1D projections). The reward
    #: model is the same Llama classifier in both.
    arch: str = "llama"


ARCHES = ("llama", "gpt2")


def _lm_config(cfg: WorldConfig, tok):
    if cfg.arch == "gpt2":
        from transformers import GPT2Config

        # no dropout, as the Llama has none: the recipe differs in the architecture alone
        return GPT2Config(
            vocab_size=len(tok), n_embd=cfg.hidden, n_inner=cfg.intermediate,
            n_layer=cfg.layers, n_head=cfg.heads, n_positions=128, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id)
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads, max_position_embeddings=128, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id)


def _write_jsonl(path: Path, records: Sequence[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _lm_class(cfg: WorldConfig):
    if cfg.arch == "gpt2":
        from transformers import GPT2LMHeadModel

        return GPT2LMHeadModel
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM


def spec_dict(cfg: WorldConfig) -> dict:
    """The world's ready job spec (paths relative to the world folder)."""
    return {
        "name": "reference-world" if cfg.arch == "llama" else f"{cfg.arch}-world",
        "base_model": "models/base",
        "aligned_model": "models/aligned",
        "groups": {"scheme": "blocks", "k": 3},
        "ratio_bounds": [0.0, 1.0],
        "reward": {"type": "reward_model", "model": "models/reward",
                   "prompts": "data/reward_prompts.jsonl", "max_new_tokens": 24,
                   "batch_size": 128},
        "tax": {"budget": cfg.budget, "tasks": [
            {"name": "addition", "type": "exact_match", "data": "data/addition.jsonl",
             "max_new_tokens": 4, "batch_size": 160},
            {"name": "facts", "type": "multiple_choice", "data": "data/facts.jsonl",
             "batch_size": 320},
            {"name": "text", "type": "perplexity", "data": "data/text.jsonl", "batch_size": 160},
        ]},
        "search": {"sampler": "tpe", "n_trials": cfg.n_trials, "seed": 0, "pruning": True,
                   "holdout_fraction": 0.3, "validation_fraction": 0.3},
        "mode": "constrained",
    }


def skill_scores(model, tok, sets: dict[str, list[dict]]) -> dict[str, float]:
    from workers.evaluate import tasks

    return {
        "addition": tasks.exact_match_accuracy(model, tok, sets["addition"], max_new_tokens=4,
                                               batch_size=160),
        "facts": tasks.multiple_choice_accuracy(model, tok, sets["facts"], batch_size=320),
        "text": tasks.perplexity(model, tok, sets["text"], batch_size=160),
    }


@torch.inference_mode()
def prompt_rewards(model, tok, reward_model, records: Sequence[dict], *,
                   max_new_tokens: int = 24, batch_size: int = 128) -> list[float]:
    """The reward model's score of the greedy completion of each prompt, in order (their mean
    is what the job's ``reward_model`` reward measures)."""
    from workers.evaluate.lm import greedy_generate

    prompts = [r["prompt"] for r in records]
    completions = greedy_generate(model, tok, prompts, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, by_length=False)  # as v2 was built
    scores: list[float] = []
    for start in range(0, len(prompts), batch_size):
        texts = [p + c for p, c in zip(prompts[start:start + batch_size],
                                       completions[start:start + batch_size])]
        enc = tok(texts, return_tensors="pt", padding=True)
        scores += reward_model(**enc).logits[:, 0].float().tolist()
    return scores


def build_world(out: str | Path, cfg: WorldConfig | None = None, *, overwrite: bool = False,
                progress: Callable[[str, int, int, float], None] | None = None) -> dict:
    """Build the reference world into ``out`` (atomically: a temp folder renamed into place)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from workers.chartok import char_tokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cfg = cfg or WorldConfig()
    if cfg.arch not in ARCHES:
        raise SpecError(f"world arch {cfg.arch!r}: use one of {', '.join(ARCHES)}",
                        field="arch")
    lm_class = _lm_class(cfg)
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConflictError(f"{out} already exists (use --overwrite to rebuild)")
    out.parent.mkdir(parents=True, exist_ok=True)
    # a folder of this process's own: two builders never clear each other's work
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    (tmp / "models").mkdir(parents=True)
    (tmp / "data").mkdir()
    started = time.perf_counter()
    tok = char_tokenizer()
    data = make_data(cfg.seed)
    (tmp / "data" / "fresh").mkdir()
    for name, records in data.sets.items():
        _write_jsonl(tmp / "data" / f"{name}.jsonl", records)
        _write_jsonl(tmp / "data" / "fresh" / f"{name}.jsonl", data.fresh[name])

    torch.manual_seed(cfg.seed)
    base = lm_class(_lm_config(cfg, tok))
    pre_losses = train_lm(base, data.pretrain, tok, steps=cfg.pretrain_steps, lr=cfg.pretrain_lr,
                           batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed, progress=progress,
                           stage="pretrain base")
    base.save_pretrained(tmp / "models" / "base")
    tok.save_pretrained(tmp / "models" / "base")
    base_scores = skill_scores(base, tok, data.sets)
    base_fresh = skill_scores(base, tok, data.fresh)

    aligned = base
    chat_losses = train_lm(aligned, data.chat, tok, steps=cfg.chat_steps, lr=cfg.align_lr,
                            batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed + 1,
                            progress=progress, stage="align: chat")
    align_losses = train_lm(aligned, data.align, tok, steps=cfg.align_steps, lr=cfg.align_lr,
                             batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed + 4,
                             progress=progress, stage="align: preference",
                             params=top_parameters(aligned, cfg.layers, cfg.align_layers))
    aligned.save_pretrained(tmp / "models" / "aligned")
    tok.save_pretrained(tmp / "models" / "aligned")
    aligned_scores = skill_scores(aligned, tok, data.sets)
    aligned_fresh = skill_scores(aligned, tok, data.fresh)

    torch.manual_seed(cfg.seed + 2)
    rm_config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, num_labels=1,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id)
    rm = LlamaForSequenceClassification(rm_config)
    rm_rng = random.Random(cfg.seed + 3)
    rm_pairs = []
    for _ in range(2000):
        q, a = question(rm_rng, data.facts)
        rm_pairs.append((q + styled(a), q + a))
    rm_losses = train_reward(rm, rm_pairs, tok, steps=cfg.reward_steps,
                              batch_size=cfg.batch_size, seed=cfg.seed + 2, progress=progress)
    rm.save_pretrained(tmp / "models" / "reward")
    tok.save_pretrained(tmp / "models" / "reward")

    import yaml

    (tmp / "spec.yaml").write_text(yaml.safe_dump(spec_dict(cfg), sort_keys=False))

    base_model = lm_class.from_pretrained(tmp / "models" / "base").eval()
    per_prompt, fresh_rewards = {}, {}
    for label, model in (("base", base_model), ("aligned", aligned)):
        per_prompt[label] = prompt_rewards(model, tok, rm, data.sets["reward_prompts"])
        fresh = prompt_rewards(model, tok, rm, data.fresh["reward_prompts"])
        fresh_rewards[label] = sum(fresh) / len(fresh)
    info = {
        "version": WORLD_VERSION,
        # the default arch is left out: the reference world's world.json reads as before
        "config": {k: v for k, v in cfg.__dict__.items()
                   if not (k == "arch" and v == "llama")},
        "seconds": round(time.perf_counter() - started, 1),
        "torch_threads": torch.get_num_threads(),
        "losses": {"pretrain_final": tail_mean(pre_losses),
                   "chat_final": tail_mean(chat_losses),
                   "align_final": tail_mean(align_losses),
                   "reward_final": tail_mean(rm_losses)},
        "skills": {"base": base_scores, "aligned": aligned_scores},
        "reward": {k: sum(v) / len(v) for k, v in per_prompt.items()},
        "sizes": {name: {"job": len(records), "fresh": len(data.fresh[name])}
                  for name, records in data.sets.items()},
        # the reward of each of the job's prompts (data/reward_prompts.jsonl, in file order)
        "reward_per_prompt": {k: [round(x, 4) for x in v] for k, v in per_prompt.items()},
        "fresh": {"skills": {"base": base_fresh, "aligned": aligned_fresh},
                  "reward": fresh_rewards},
    }
    (tmp / "world.json").write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return info


def load_world_info(folder: str | Path, arch: str | None = None) -> dict | None:
    """The world.json of a built world of the current version (and, when given, of ``arch``),
    else None."""
    file = Path(folder) / "world.json"
    try:
        info = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    if info.get("version") != WORLD_VERSION:
        return None
    if arch is not None and (info.get("config") or {}).get("arch", "llama") != arch:
        return None
    return info


def ensure_world(folder: str | Path, cfg: WorldConfig | None = None, progress=None) -> Path:
    """Build the world into ``folder`` unless a world of this version and arch is there."""
    folder = Path(folder)
    arch = (cfg or WorldConfig()).arch
    if load_world_info(folder, arch) is not None:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; the others wait and then reuse it
        if load_world_info(folder, arch) is None:
            build_world(folder, cfg, overwrite=True, progress=progress)
    return folder
