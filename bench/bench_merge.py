"""In-memory merge bandwidth of ``LiveMerger.apply`` against plain tensor copies.

Builds a Llama (from a transformers ``LlamaConfig``, no hub) twice with different seeds as
base and aligned checkpoints, loads ``LiveMerger.load(base, aligned, GroupSpec(scheme="blocks",
k=3))`` and times, each as the median over ``--repeats`` timed runs after ``--warmup`` runs:

- ``merge``: ``merger.apply(ratios)`` with a fresh random ratio vector each run. It reads base
  and aligned and writes the live tensors: 3 x ``merger.nbytes`` bytes per apply.
- ``copy (same tensors)``: ``e.live.copy_(e.base)`` for every entry: 2 x ``merger.nbytes``.
- ``copy (one big tensor)`` and ``lerp (one big tensor)``: the same number of bytes as one
  flat tensor, for reference (no per-tensor overhead).

Bandwidth is bytes moved / seconds (GB = 1e9 bytes). The figure of merit is
merge GB/s / copy GB/s on the same tensors; the issue's target is >= 0.6.

    .venv/bin/python bench/bench_merge.py --size medium --dtype float32 --device cpu
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import build_llama, count_params, human_bytes, llama_config, machine_info, table, write_json

SIZES = {
    # name: (hidden, intermediate, layers, vocab, heads); float32 bytes in the comment
    "tiny": (256, 704, 8, 4096, 4),          # ~9 M params, ~37 MB
    "small": (512, 1408, 8, 8192, 8),         # ~34 M params, ~136 MB
    "medium": (1024, 2816, 8, 8192, 16),      # ~120 M params, ~478 MB
    "large": (2048, 5632, 8, 16384, 16),      # ~478 M params, ~1.9 GB (for a GPU)
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TARGET = 0.6


def _time(fn, *, repeats: int, warmup: int, sync) -> list[float]:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="medium")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                    help="dtype the merger holds the weights in (checkpoints are saved in float32)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (CPU); default: torch's default")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep the built checkpoints here and reuse them (default: a temp dir)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the ratio vectors")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    from service.spec import GroupSpec
    from workers.device import pick_device
    from workers.merge import LiveMerger

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = DTYPES[args.dtype]
    hidden, inter, layers, vocab, heads = SIZES[args.size]
    config = llama_config(hidden=hidden, intermediate=inter, layers=layers, vocab=vocab, heads=heads)

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="hmaopt-bench-merge-")
        root = Path(tmp.name)
    else:
        root = args.workdir
        root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        base = build_llama(root / f"{args.size}-base", config, seed=0)
        aligned = build_llama(root / f"{args.size}-aligned", config, seed=1)
        build_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        spec = GroupSpec(scheme="blocks", k=3)
        merger = LiveMerger.load(base, aligned, spec, device=str(device), dtype=dtype)
        load_s = time.perf_counter() - t0
    finally:
        if tmp is not None:
            tmp.cleanup()

    if device.type == "cuda":
        def sync() -> None:
            torch.cuda.synchronize(device)
    else:
        def sync() -> None:
            pass

    entries = merger.entries
    nbytes = merger.nbytes
    numel = sum(e.live.numel() for e in entries)
    sizes = sorted(e.live.numel() * e.live.element_size() for e in entries)
    n_ratios = merger.grouping.n_ratios
    rng = random.Random(args.seed)
    info = machine_info(device)

    print("hmaopt bench_merge: LiveMerger.apply vs tensor copy")
    print(f"  device   : {device}" + (f" ({info['gpu']})" if "gpu" in info else f" ({info['cpu']})"))
    print(f"  threads  : torch.get_num_threads() = {torch.get_num_threads()}, os.cpu_count() = {info['cpu_count']}")
    print(f"  torch    : {torch.__version__}")
    print(f"  dtype    : {args.dtype}")
    print(f"  model    : Llama '{args.size}' hidden={hidden} intermediate={inter} layers={layers} "
          f"vocab={vocab} heads={heads} (untied)")
    print(f"  size     : {numel:,} params ({count_params(config):,} by config), {human_bytes(nbytes)} "
          f"({nbytes:,} bytes) per copy in {args.dtype}")
    print(f"  tensors  : {len(entries)} (smallest {human_bytes(sizes[0])}, median "
          f"{human_bytes(sizes[len(sizes) // 2])}, largest {human_bytes(sizes[-1])}); "
          f"{sum(s < 1_000_000 for s in sizes)} under 1 MB")
    print(f"  grouping : {spec.describe()} -> {n_ratios} ratio(s) {', '.join(merger.grouping.slots)}")
    print(f"  repeats  : {args.repeats} timed after {args.warmup} warm-up (median reported)")
    print(f"  build {build_s:.1f} s, load {load_s:.1f} s")
    print()

    def apply() -> None:
        merger.apply([rng.random() for _ in range(n_ratios)])

    def copy_entries() -> None:
        for e in entries:
            e.live.copy_(e.base)

    results: list[dict] = []

    def record(name: str, times: list[float], moved: int, what: str) -> dict:
        med = statistics.median(times)
        row = {"name": name, "bytes_per_pass": moved, "what": what, "median_s": med,
               "min_s": min(times), "max_s": max(times), "gbps": moved / med / 1e9,
               "times_s": times}
        results.append(row)
        return row

    kw = dict(repeats=args.repeats, warmup=args.warmup, sync=sync)
    with torch.no_grad():
        merge = record("merge: merger.apply(ratios)", _time(apply, **kw), 3 * nbytes,
                       "3 x nbytes (read base + aligned, write live)")
        copy = record("copy: e.live.copy_(e.base) per entry", _time(copy_entries, **kw), 2 * nbytes,
                      "2 x nbytes (read base, write live)")
        # Reference: the same bytes as one flat tensor (no per-tensor overhead).
        n = numel
        gen = torch.Generator(device=device).manual_seed(0)
        big_a = torch.rand(n, dtype=dtype, device=device, generator=gen)
        big_b = torch.rand(n, dtype=dtype, device=device, generator=gen)
        big_out = torch.empty_like(big_a)
        record("copy: one big tensor", _time(lambda: big_out.copy_(big_a), **kw), 2 * nbytes,
               "2 x nbytes")
        record("lerp: one big tensor", _time(
            lambda: torch.lerp(big_a, big_b, rng.random(), out=big_out), **kw), 3 * nbytes,
            "3 x nbytes")
        del big_a, big_b, big_out
        # Restore the live model to a valid merge.
        merger.apply([0.5] * n_ratios)

    ratio = merge["gbps"] / copy["gbps"]
    rows = [[r["name"], human_bytes(r["bytes_per_pass"]), f"{r['median_s'] * 1e3:.1f}",
             f"{r['min_s'] * 1e3:.1f}", f"{r['max_s'] * 1e3:.1f}", f"{r['gbps']:.2f}"]
            for r in results]
    print(table(["measure", "bytes/pass", "median ms", "min ms", "max ms", "GB/s"], rows))
    print()
    print(f"merge / copy (same tensors) = {merge['gbps']:.2f} / {copy['gbps']:.2f} GB/s = {ratio:.2f} "
          f"(target >= {TARGET}: {'met' if ratio >= TARGET else 'NOT met'})")

    write_json(args.json_out, {
        "benchmark": "bench_merge",
        "argv": sys.argv,
        "machine": info,
        "device": str(device),
        "dtype": args.dtype,
        "model": {"size": args.size, "hidden": hidden, "intermediate": inter, "layers": layers,
                  "vocab": vocab, "heads": heads, "params": numel, "bytes": nbytes,
                  "tensors": len(entries)},
        "repeats": args.repeats,
        "warmup": args.warmup,
        "results": results,
        "merge_over_copy": ratio,
        "target": TARGET,
        "target_met": ratio >= TARGET,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
