"""Tiny real models built from transformers configs and saved as safetensors (no hub)."""

from __future__ import annotations

from pathlib import Path

import torch

_COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

#: model_type -> config fields of a tiny random model of that family (4 decoder layers).
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(_COMMON, tie_word_embeddings=False),
    "mistral": dict(_COMMON),
    "qwen2": dict(_COMMON),
    "gemma": dict(_COMMON, head_dim=8),  # ties its embeddings
    "gpt2": dict(vocab_size=64, n_embd=32, n_layer=4, n_head=4, n_positions=64,
                 bos_token_id=0, eos_token_id=0),  # ties its embeddings
    "gpt_neox": dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                     num_attention_heads=4, max_position_embeddings=64),
    "phi": dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                num_attention_heads=4, max_position_embeddings=64),
}


def make_tiny(path: Path, model_type: str = "llama", *, seed: int = 0,
              max_shard_size: str | int | None = None, dtype: torch.dtype = torch.float32,
              **overrides) -> Path:
    """Build a random tiny ``model_type`` model with ``seed`` and save it to ``path``."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    config = AutoConfig.for_model(model_type, **{**TINY_CONFIGS[model_type], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    # Random init leaves norms at 1 and biases at 0; perturb all so every tensor differs.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint folder, read with the safetensors library."""
    from safetensors import safe_open

    out = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def make_pair(root: Path, model_type: str = "llama", **kwargs) -> tuple[Path, Path]:
    """A base and an aligned model of the same architecture, different weights."""
    return (make_tiny(root / "base", model_type, seed=0, **kwargs),
            make_tiny(root / "aligned", model_type, seed=1, **kwargs))


def make_char_lm(path: Path, *, seed: int = 0, model_type: str = "llama") -> Path:
    """A tiny random causal LM with the character tokenizer saved beside it."""
    from workers.chartok import char_tokenizer

    tok = char_tokenizer()
    make_tiny(path, model_type, seed=seed, vocab_size=len(tok), pad_token_id=0, bos_token_id=1,
              eos_token_id=2)
    tok.save_pretrained(path)
    return path


if __name__ == "__main__":  # python -m tests.models DIR: a demo pair (6-layer Llama)
    import sys

    root = Path(sys.argv[1] if len(sys.argv) > 1 else "demo/models")
    make_pair(root, "llama", num_hidden_layers=6, tie_word_embeddings=False)
    print(f"built {root / 'base'} and {root / 'aligned'}")


def make_tiny_job(root: Path, **overrides) -> dict:
    """A job spec dict over a tiny char-LM pair with small JSONL sets of every kind.

    The models are random, so the figures mean nothing; the mechanics are real.
    """
    import json

    root = Path(root)
    base = make_char_lm(root / "base", seed=0)
    aligned = make_char_lm(root / "aligned", seed=1)
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    sets = {
        "add": [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(4) for b in range(3)],
        "mc": [{"prompt": f"q{i} is", "choices": [" ab", " cd", " ef"], "answer": i % 3}
               for i in range(12)],
        "text": [{"text": f"the cat number {i} sat on the mat."} for i in range(12)],
        "pref": [{"prompt": f"Q{i}:", "chosen": " yes!", "rejected": " no."} for i in range(10)],
    }
    for name, records in sets.items():
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    spec = {
        "name": "tiny",
        "base_model": str(base), "aligned_model": str(aligned),
        "groups": {"scheme": "blocks", "k": 2},
        "reward": {"type": "preference", "data": str(data / "pref.jsonl")},
        "tax": {"budget": 0.5, "tasks": [
            {"name": "add", "type": "exact_match", "data": str(data / "add.jsonl"),
             "max_new_tokens": 3},
            {"name": "mc", "type": "multiple_choice", "data": str(data / "mc.jsonl")},
            {"name": "text", "type": "perplexity", "data": str(data / "text.jsonl"), "weight": 2},
        ]},
        "search": {"n_trials": 6, "uniform_grid": [0.0, 0.5, 1.0], "seed": 0,
                   "holdout_fraction": 0.25},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec
