"""The CUDA path on one GPU: memory per mode, merge bandwidth, generation throughput, a search.

Run by scripts/gpu-check.sh on a machine with a CUDA GPU (no hub: the models are built from
configs). On a ~1B-parameter Llama pair in bf16 (``--layers`` sets the size):

1. Memory per mode: the device bytes each memory mode keeps (``LiveMerger.resident_bytes``
   and ``torch.cuda.max_memory_allocated``), and from the bytes per parameter the largest
   model each mode holds on this GPU (less the reserve that ``auto`` keeps).
2. Merge: ``apply`` time (median of ``--repeats``) per mode against a device-to-device copy
   of the same bytes; device mode moves 3 bytes per weight byte (read base and aligned,
   write live), host mode 2 over the bus plus the in-place lerp.
3. Generation: greedy tokens/s of the reward's generation (batched by length, batch from
   memory), dynamic and static cache, against the bound set by memory bandwidth: each
   decoding step reads the weights once per batch, so tokens/s <= batch x bandwidth / bytes.
4. A search of ``--trials`` trials end to end (run_search, the CLI's driver) in bf16 with a
   reward model and two tax tasks, and each trial's seconds split into merge, tax and
   reward generation (measured on the same merges outside the driver).

    .venv/bin/python bench/bench_gpu.py --json out/gpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import human_bytes, machine_info, table, write_json


DEVICE = "cuda"


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _timed(fn, repeats: int) -> float:
    fn()
    _sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build_pair(root: Path, layers: int, hidden: int = 2048):
    """A Llama pair (hidden 2048, char tokenizer), bf16, and a small reward model."""
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    from workers.chartok import char_tokenizer

    tok = char_tokenizer()
    cfg = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 11 // 4,
               num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
               max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               tie_word_embeddings=False)
    from transformers import AutoModelForCausalLM

    paths = []
    for name, seed in (("base", 0), ("aligned", 1)):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(LlamaConfig(**cfg)).to(torch.bfloat16)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths.append(root / name)
        del model
    rcfg = LlamaConfig(**{**cfg, "hidden_size": 256, "intermediate_size": 512,
                          "num_hidden_layers": 2, "num_attention_heads": 4,
                          "num_key_value_heads": 4, "num_labels": 1})
    torch.manual_seed(2)
    AutoModelForSequenceClassification.from_config(rcfg).save_pretrained(root / "reward")
    tok.save_pretrained(root / "reward")
    return paths[0], paths[1], root / "reward", tok


def write_data(root: Path) -> dict[str, Path]:
    import random

    rng = random.Random(0)
    words = ["merge", "model", "cat", "sat", "mat", "ratio", "layer", "align", "reward", "tax"]
    data = root / "data"
    data.mkdir()
    sets = {
        "prompts": [{"prompt": " ".join(rng.choices(words, k=rng.randint(2, 24)))}
                    for _ in range(128)],
        "add": [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(8) for b in range(8)],
        "text": [{"text": " ".join(rng.choices(words, k=rng.randint(8, 40)))} for _ in range(64)],
    }
    out = {}
    for name, records in sets.items():
        out[name] = data / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def memory_and_merge(base, aligned, repeats: int) -> dict:
    from service.spec import GroupSpec
    from workers.merge import LiveMerger

    out = {}
    cuda = DEVICE == "cuda"
    total = torch.cuda.get_device_properties(0).total_memory if cuda else 0
    for mode in ("device", "host"):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        merger = LiveMerger.load(base, aligned, GroupSpec(scheme="blocks", k=4), device=DEVICE,
                                 memory=mode)
        params = sum(e.live.numel() for e in merger.entries)
        resident = merger.resident_bytes()
        merge_s = _timed(lambda m=merger: m.apply([0.3, 0.5, 0.7, 0.9]), repeats)
        flat = torch.empty(merger.nbytes // 2, dtype=torch.bfloat16, device=DEVICE)
        other = torch.empty_like(flat)
        copy_s = _timed(lambda a=other, b=flat: a.copy_(b), repeats)
        on_device = resident.get("cuda:0" if cuda else "cpu", 0)
        per_param = on_device / params
        reserve = max(2 * 2**30, int(0.15 * total))
        out[mode] = {
            "params": params, "resident_bytes": resident,
            "max_allocated": torch.cuda.max_memory_allocated() if cuda else None,
            "device_bytes_per_param": per_param,
            "largest_model_params": int((total - reserve) / per_param),
            "merge_seconds": merge_s, "copy_seconds": copy_s,
            "merge_GBps": (3 if mode == "device" else 2) * merger.nbytes / merge_s / 1e9,
            "copy_GBps": 2 * merger.nbytes / copy_s / 1e9,
        }
        del merger, flat, other
    return out


def generation(base, tok, prompts: list[str], bandwidth: float, new_tokens: int) -> dict:
    import os

    from transformers import AutoModelForCausalLM

    from workers.evaluate.lm import greedy_generate

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).to(DEVICE).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    out = {}
    for cache in ("dynamic", "static"):
        os.environ["HMAOPT_GENERATION_CACHE"] = cache
        greedy_generate(model, tok, prompts[:8], max_new_tokens=4, batch_size=8)  # warm
        stats: dict = {}
        greedy_generate(model, tok, prompts, max_new_tokens=new_tokens, batch_size=16,
                        stats=stats)
        tps = stats["tokens"] / stats["seconds"]
        bound = min(stats["batch_size"], len(prompts)) * bandwidth / weights
        out[cache] = {**stats, "tokens_per_second": tps, "bound_tokens_per_second": bound,
                      "share_of_bound": tps / bound}
    os.environ.pop("HMAOPT_GENERATION_CACHE", None)
    del model
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return out


def search(root: Path, base, aligned, reward, data, trials: int) -> dict:
    from service.spec import JobSpec
    from workers.evaluate import tasks
    from workers.job import load_job
    from workers.search import run_search

    spec = JobSpec.model_validate({
        "name": "gpu-check", "base_model": str(base), "aligned_model": str(aligned),
        "groups": {"scheme": "blocks", "k": 4},
        "reward": {"type": "reward_model", "model": str(reward), "prompts": str(data["prompts"]),
                   "max_new_tokens": 32, "batch_size": 16},
        "tax": {"budget": 0.2, "tasks": [
            {"name": "add", "type": "exact_match", "data": str(data["add"]), "max_new_tokens": 4},
            {"name": "text", "type": "perplexity", "data": str(data["text"])}]},
        "search": {"n_trials": trials, "seed": 0},
    })
    t0 = time.perf_counter()
    result = run_search(spec, storage=f"sqlite:///{root / 'optuna.db'}", device=DEVICE,
                        cache_dir=root / "cache")
    total = time.perf_counter() - t0
    # the split, measured on merges of the same kind outside the driver
    merger, ev = load_job(spec, device=DEVICE)
    recs = [r["prompt"] for r in map(json.loads, Path(data["prompts"]).read_text().splitlines())]
    add = [json.loads(line) for line in Path(data["add"]).read_text().splitlines()]
    text = [json.loads(line) for line in Path(data["text"]).read_text().splitlines()]
    split = []
    for ratios in ([0.2, 0.4, 0.6, 0.8], [0.5] * 4, [0.9, 0.1, 0.9, 0.1]):
        t = time.perf_counter()
        merger.apply(ratios)
        _sync()
        m = time.perf_counter() - t
        t = time.perf_counter()
        tasks.exact_match_accuracy(merger.model, ev.tokenizer, add, max_new_tokens=4)
        tasks.perplexity(merger.model, ev.tokenizer, text)
        _sync()
        tax = time.perf_counter() - t
        t = time.perf_counter()
        tasks.reward_model_scores(merger.model, ev.tokenizer, ev.reward_model, ev.reward_tokenizer,
                                  [{"prompt": p} for p in recs], max_new_tokens=32)
        _sync()
        reward_s = time.perf_counter() - t
        split.append({"merge": m, "tax": tax, "reward_generation": reward_s})
    mean = {k: statistics.mean(s[k] for s in split) for k in split[0]}
    return {"trials": trials, "seconds": total, "completed": result.counts,
            "split_mean_seconds": mean,
            "merge_share": mean["merge"] / sum(mean.values()), "split": split}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=20, help="20 layers: about 1.0 B parameters")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda",
                    help="cuda; cpu only to check the script itself (--layers 2)")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, aligned, reward, tok = build_pair(root, args.layers, args.hidden)
        data = write_data(root)
        mem = memory_and_merge(base, aligned, args.repeats)
        print(table(["mode", "params", "on GPU", "B/param", "largest model", "merge GB/s",
                     "copy GB/s", "ratio"],
                    [[m, f"{v['params'] / 1e9:.2f} B", human_bytes(v["resident_bytes"].get("cuda:0", 0)),
                      f"{v['device_bytes_per_param']:.2f}", f"{v['largest_model_params'] / 1e9:.0f} B",
                      f"{v['merge_GBps']:.0f}", f"{v['copy_GBps']:.0f}",
                      f"{v['merge_GBps'] / v['copy_GBps']:.2f}"] for m, v in mem.items()]))
        prompts = [json.loads(line)["prompt"] for line in data["prompts"].read_text().splitlines()]
        gen = generation(base, tok, prompts, mem["device"]["copy_GBps"] * 1e9, args.new_tokens)
        print(table(["cache", "batch", "tokens/s", "bound", "share"],
                    [[c, v["batch_size"], f"{v['tokens_per_second']:.0f}",
                      f"{v['bound_tokens_per_second']:.0f}", f"{v['share_of_bound']:.2f}"]
                     for c, v in gen.items()]))
        s = search(root, base, aligned, reward, data, args.trials)
        print(f"search: {s['trials']} trials in {s['seconds']:.1f} s; per trial "
              + ", ".join(f"{k} {v:.2f} s" for k, v in s["split_mean_seconds"].items())
              + f"; merge share {s['merge_share']:.1%}")
        write_json(args.json, {"machine": machine_info(torch.device(DEVICE)), "memory": mem,
                               "generation": gen, "search": s})
    return 0


if __name__ == "__main__":
    sys.exit(main())
