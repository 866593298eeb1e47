"""Streaming export: seconds and peak RSS of ``export_merge`` at 1x and 4x model size.

Builds Llama checkpoints (transformers ``LlamaConfig``, no hub) of the same width with
``--layers`` and ``4 x --layers`` decoder layers (a small vocabulary keeps the embeddings
minor, so the bytes grow about 4x while the largest tensor stays the same), base and aligned
with different seeds. Each export runs in a fresh subprocess (``bench_export.py --child``)
that imports everything, warms torch up, records ``getrusage(RUSAGE_SELF).ru_maxrss`` (the
baseline), calls ``export_merge`` with a fixed ``max_shard_bytes`` and records ``ru_maxrss``
again (the peak). ``peak - baseline`` is the memory the export itself added; the writer
streams tensor by tensor, so it should stay near a few times the largest tensor whatever the
model size.

On Linux a process's ru_maxrss starts from the RSS of the process it was forked from (the
kernel keeps the pre-exec high-water mark). So this parent imports neither torch nor
transformers and builds the checkpoints in subprocesses too (``--build``): it stays a few
tens of MB, below any child's own baseline. The child also reports VmHWM from
/proc/self/status (the high-water mark of its own address space only) as a cross-check.

    .venv/bin/python bench/bench_export.py --layers 3 --scales 1,4 --shard-mb 32
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_model, human_bytes, llama_param_count, machine_info, table, write_json

MARK = "BENCH_EXPORT_RESULT "


def _status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in bytes; 0 where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _maxrss() -> int:
    """Peak RSS of this process so far, in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def child(argv: list[str]) -> int:
    """Run one export in this (fresh) process and print its measurements as one JSON line."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true")
    ap.add_argument("base")
    ap.add_argument("aligned")
    ap.add_argument("out")
    ap.add_argument("--shard-bytes", type=int, required=True)
    ap.add_argument("--ratios", required=True)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args(argv)

    inherited = _maxrss()  # before any import: what the fork left in ru_maxrss

    import torch

    from service.spec import GroupSpec
    from workers.device import parse_dtype
    from workers.export import export_merge
    from workers.merge import lerp_merge

    # Warm torch up: first ops initialise the allocator, the thread pool and the kernels.
    a, b = torch.rand(1 << 20), torch.rand(1 << 20)
    for _ in range(3):
        lerp_merge(a, b, 0.5)
        a.copy_(b)
    del a, b
    baseline = _maxrss()
    baseline_hwm = _status_bytes("VmHWM")
    baseline_rss = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    res = export_merge(args.base, args.aligned, args.out, GroupSpec(scheme="blocks", k=3),
                       [float(r) for r in args.ratios.split(",")],
                       max_shard_bytes=args.shard_bytes, dtype=parse_dtype(args.dtype))
    seconds = time.perf_counter() - t0
    peak = _maxrss()
    peak_hwm = _status_bytes("VmHWM")
    print(MARK + json.dumps({
        "seconds": seconds,
        "export_seconds": res.seconds,
        "bytes_written": res.bytes_written,
        "shards": len(res.shards),
        "inherited_maxrss": inherited,
        "baseline_maxrss": baseline,
        "peak_maxrss": peak,
        "delta": peak - baseline,
        "baseline_hwm": baseline_hwm,
        "peak_hwm": peak_hwm,
        "delta_hwm": peak_hwm - baseline_hwm,
        "baseline_rss": baseline_rss,
        "rss_after": _status_bytes("VmRSS"),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }), flush=True)
    return 0


def build(argv: list[str]) -> int:
    """Build one checkpoint (in a subprocess, so the parent never holds torch or a model)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", type=Path, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--shape", required=True, help="JSON: hidden, intermediate, layers, vocab, heads")
    args = ap.parse_args(argv)
    from _common import build_llama, llama_config

    build_llama(args.build, llama_config(**json.loads(args.shape)), seed=args.seed)
    return 0


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed with exit code {proc.returncode}")
    return proc.stdout


def run_child(base: Path, aligned: Path, out: Path, shard_bytes: int, ratios: str,
              dtype: str) -> dict:
    out_text = _run([sys.executable, os.path.abspath(__file__), "--child", str(base), str(aligned),
                     str(out), "--shard-bytes", str(shard_bytes), "--ratios", ratios, "--dtype", dtype])
    for line in out_text.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise SystemExit("child printed no result:\n" + out_text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--child" in argv:
        return child(argv)
    if "--build" in argv:
        return build(argv)

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=3,
                    help="decoder layers at 1x (default 3; blocks:3 needs at least 3)")
    ap.add_argument("--scales", default="1,4", help="model sizes as multiples of --layers")
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--intermediate", type=int, default=2432)
    ap.add_argument("--heads", type=int, default=14)
    ap.add_argument("--vocab", type=int, default=512,
                    help="small, so the layers dominate the bytes and the largest tensor is an MLP matrix")
    ap.add_argument("--shard-mb", type=float, default=32.0, help="max_shard_bytes in MB (1e6)")
    ap.add_argument("--dtype", default="auto", help="export dtype: auto | float32 | bfloat16 | ...")
    ap.add_argument("--repeats", type=int, default=3,
                    help="exports per size, each in a fresh process: min seconds, and the RSS of the run "
                         "with the largest peak - baseline, are reported")
    ap.add_argument("--ratios", default="0.25,0.5,0.75", help="one ratio per block (blocks:3)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep the built checkpoints here and reuse them (default: a temp dir)")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    scales = [int(s) for s in args.scales.split(",")]
    shard_bytes = int(args.shard_mb * 1e6)
    info = machine_info(with_torch=False)
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="hmaopt-bench-export-")
        root = Path(tmp.name)
    else:
        root = args.workdir
        root.mkdir(parents=True, exist_ok=True)

    print("hmaopt bench_export: streaming export_merge, seconds and peak RSS")
    print(f"  device   : cpu ({cpu_model()}), {info['cpu_count']} cores, "
          f"{human_bytes(info['mem_total_bytes'] or 0)} RAM")
    print(f"  code     : {info['code']}")
    print(f"  dtype    : checkpoints float32, export dtype {args.dtype}")
    print(f"  model    : Llama hidden={args.hidden} intermediate={args.intermediate} heads={args.heads} "
          f"vocab={args.vocab} (untied), layers {', '.join(str(args.layers * s) for s in scales)}")
    print(f"  export   : GroupSpec blocks:3, ratios {args.ratios}, max_shard_bytes {shard_bytes:,} "
          f"({human_bytes(shard_bytes)}), {args.repeats} fresh process(es) per size")
    print("  note     : the checkpoints were just written, so they are read from the page cache")

    rows_out: list[dict] = []
    try:
        for scale in scales:
            shape = dict(hidden=args.hidden, intermediate=args.intermediate,
                         layers=args.layers * scale, vocab=args.vocab, heads=args.heads)
            t0 = time.perf_counter()
            base, aligned = root / f"x{scale}-base", root / f"x{scale}-aligned"
            for path, seed in ((base, 0), (aligned, 1)):
                _run([sys.executable, os.path.abspath(__file__), "--build", str(path),
                      "--seed", str(seed), "--shape", json.dumps(shape)])
            build_s = time.perf_counter() - t0
            params = llama_param_count(**shape)
            model_bytes = params * 4
            largest = max(args.hidden * args.intermediate, args.vocab * args.hidden,
                          args.hidden * args.hidden) * 4
            runs = []
            for i in range(args.repeats):
                out = root / f"x{scale}-out-{i}"
                shutil.rmtree(out, ignore_errors=True)
                runs.append(run_child(base, aligned, out, shard_bytes, args.ratios, args.dtype))
                shutil.rmtree(out, ignore_errors=True)
            worst = max(runs, key=lambda r: r["delta"])
            row = {
                "scale": scale, "layers": shape["layers"], "params": params,
                "model_bytes": model_bytes, "bytes_written": runs[0]["bytes_written"],
                "shards": runs[0]["shards"], "largest_tensor_bytes": largest,
                "build_seconds": build_s,
                "seconds": min(r["seconds"] for r in runs),
                "seconds_median": statistics.median(r["seconds"] for r in runs),
                "inherited_maxrss": max(r["inherited_maxrss"] for r in runs),
                # RSS figures from the run with the largest peak - baseline (the worst case).
                **{k: worst[k] for k in ("baseline_maxrss", "peak_maxrss", "delta", "delta_hwm")},
                "deltas": [r["delta"] for r in runs],
                "runs": runs,
            }
            rows_out.append(row)
    finally:
        if tmp is not None:
            tmp.cleanup()

    r0 = rows_out[0]["runs"][0]
    print(f"  torch    : {r0['torch']}, {r0['torch_threads']} threads (in the export process)")
    print(f"  parent   : ru_maxrss {_maxrss() / 1e6:.1f} MB; the children inherited at most "
          f"{max(r['inherited_maxrss'] for r in rows_out) / 1e6:.1f} MB (below their baselines)")
    print()
    mb = 1e6
    rows = [[f"{r['scale']}x", r["layers"], f"{r['params'] / 1e6:.1f} M", f"{r['model_bytes'] / mb:.1f}",
             r["shards"], f"{shard_bytes / mb:.0f}", f"{r['seconds']:.2f}",
             f"{r['model_bytes'] / r['seconds'] / mb:.0f}",
             f"{r['baseline_maxrss'] / mb:.1f}", f"{r['peak_maxrss'] / mb:.1f}", f"{r['delta'] / mb:.1f}",
             f"{r['delta_hwm'] / mb:.1f}", " ".join(f"{d / mb:.1f}" for d in r["deltas"]),
             f"{r['largest_tensor_bytes'] / mb:.1f}"]
            for r in rows_out]
    print(table(["size", "layers", "params", "model MB", "shards", "shard MB", "seconds",
                 "MB/s out", "base RSS MB", "peak RSS MB", "peak-base MB", "peak-base VmHWM MB",
                 "peak-base of each run MB", "largest tensor MB"], rows))
    if len(rows_out) >= 2:
        a, b = rows_out[0], rows_out[-1]
        print()
        print(f"model bytes x{b['model_bytes'] / a['model_bytes']:.2f} "
              f"({a['scale']}x -> {b['scale']}x): seconds x{b['seconds'] / a['seconds']:.2f}, "
              f"peak-minus-baseline RSS (worst run) {a['delta'] / mb:.1f} -> {b['delta'] / mb:.1f} MB; "
              f"largest tensor {a['largest_tensor_bytes'] / mb:.1f} MB in both")

    write_json(args.json_out, {
        "benchmark": "bench_export",
        "argv": sys.argv,
        "machine": {**info, "torch": r0["torch"], "torch_threads": r0["torch_threads"]},
        "shard_bytes": shard_bytes,
        "dtype": args.dtype,
        "ratios": args.ratios,
        "results": rows_out,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
