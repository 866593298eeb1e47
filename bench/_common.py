"""Shared helpers for the benchmarks: Llama models built from configs (no hub), tables, JSON.

The benchmark scripts put ``bench/`` on ``sys.path`` (it is the script's folder), so they
import this module as ``_common``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

# torch and transformers are imported inside the functions that need them, so a parent
# process that only starts children (bench_export.py) stays small: a child's ru_maxrss
# starts from the RSS of the process it was forked from.


def llama_config(*, hidden: int, intermediate: int, layers: int, vocab: int, heads: int,
                 kv_heads: int | None = None):
    """A transformers ``LlamaConfig`` (untied embeddings) of the given shape."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads, max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


def build_llama(path: Path, config, *, seed: int, dtype=None) -> Path:
    """Build a random Llama from ``config`` with ``seed`` and save it as safetensors in ``path``.

    Every tensor is perturbed (random init leaves norms at 1), so base and aligned built with
    different seeds differ everywhere. Reuses ``path`` when it already holds this config.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    dtype = dtype or torch.float32
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    stamp = path / "bench_config.json"
    want = json.dumps({"config": config.to_dict(), "seed": seed, "dtype": str(dtype)},
                      sort_keys=True, default=str)
    if stamp.exists() and stamp.read_text() == want:
        return path
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(path)
    stamp.write_text(want)
    del model
    return path


def llama_param_count(*, hidden: int, intermediate: int, layers: int, vocab: int, heads: int,
                      kv_heads: int | None = None, head_dim: int | None = None) -> int:
    """Parameters of an untied Llama of this shape (matches the saved checkpoint)."""
    head_dim = head_dim or hidden // heads
    kv_heads = kv_heads or heads
    per_layer = (2 * hidden * heads * head_dim        # q, o
                 + 2 * hidden * kv_heads * head_dim   # k, v
                 + 3 * hidden * intermediate          # gate, up, down
                 + 2 * hidden)                        # two RMSNorms
    return layers * per_layer + 2 * vocab * hidden + hidden  # embed, lm_head, final norm


def count_params(config) -> int:
    """Parameters of an untied Llama with this transformers config."""
    return llama_param_count(
        hidden=config.hidden_size, intermediate=config.intermediate_size,
        layers=config.num_hidden_layers, vocab=config.vocab_size,
        heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
        head_dim=getattr(config, "head_dim", None),
    )


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device=None, *, with_torch: bool = True) -> dict:
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    info = {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "code": code_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "mem_total_bytes": mem,
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if with_torch:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    if device is not None and device.type == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def code_version() -> str:
    """``git`` HEAD of the repository (short), plus ``+dirty`` when workers/ or service/ differ."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "workers", "service"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A plain-text table with right-aligned columns (left-aligned first column)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(vals: list[str]) -> str:
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(vals, widths)))

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n")
        print(f"\nwrote {path}")


def world_job(world_arg: str | None):
    """(world folder, its job spec, LiveMerger, JobEvaluator with θ_base measured) of the
    reference world at ``world_arg`` (default: the cache, built when missing); Optuna quiet."""
    import optuna

    from service.settings import get_settings
    from service.spec import load_spec
    from workers.search import load_job, measure_base
    from workers.world import ensure_world

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    world = Path(world_arg) if world_arg else ensure_world(get_settings().cache_dir / "world")
    spec = load_spec(world / "spec.yaml")
    merger, ev = load_job(spec, device="auto")
    measure_base(merger, ev)
    return world, spec, merger, ev
