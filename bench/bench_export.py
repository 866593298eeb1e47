"""Export against the I/O floor: ``hmaopt merge`` seconds and peak RSS at 1x and 4x model size.

Builds sharded bf16 Llama pairs from a config (no hub; random weights, written tensor by
tensor) of the same width with ``--layers`` and ``4 x --layers`` decoder layers, base and
aligned with different seeds. Each round, per size, in this order and each in a fresh
process, with ``os.sync()`` before each so no run pays for another's dirty pages:

- the I/O floor (``--floor``): read every weight file of both checkpoints into a buffer,
  write one file of the output's size, fsync it;
- ``hmaopt merge`` (``python -m service.cli merge``) of the code under test, timed from the
  start of the process to its exit (interpreter and imports included), with its sha256 cache
  (``HMAOPT_CACHE_DIR``, a folder of this benchmark's) emptied first, so that every source
  file is hashed ("after");
- the same again, now that the cache holds the sources' digests ("after, cached": what a
  nightly merge of an unchanged checkpoint pays; ``--no-cached`` leaves it out);
- with ``--before DIR``: the same command run from another checkout (``DIR``, e.g.
  ``git archive <commit> service workers | tar -x -C DIR``), for the before/after figures.

Peak RSS is the process's ``ru_maxrss`` (from ``wait4``); this parent imports neither torch
nor numpy, so what a child inherits from the fork stays far below any child's own peak.

With ``--split``, after the rounds, one more export per code and size in a child that calls
``export_merge`` itself with ``stream_merge(stats=...)`` switched on: the CPU seconds of the
interpreter and imports, of each stage's threads (readers, sha256, compute, writer, syncer)
and of the rest of the export (opening the checkpoints, manifest, model card, side files).

    .venv/bin/python bench/bench_export.py --scales 1,4 --rounds 3 --workdir /tmp/hmaopt-bench-export
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    cpu_model,
    human_bytes,
    llama_param_count,
    machine_info,
    table,
    write_json,
)

ROOT = Path(__file__).resolve().parent.parent


def floor(argv: list[str]) -> int:
    """Read both checkpoints, write and fsync one file of ``--bytes``; print the seconds."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--floor", action="store_true")
    ap.add_argument("base", type=Path)
    ap.add_argument("aligned", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--bytes", type=int, required=True)
    args = ap.parse_args(argv)
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    t0 = time.perf_counter()
    for folder in (args.base, args.aligned):
        for file in sorted(folder.glob("*.safetensors")):
            with open(file, "rb", buffering=0) as f:
                while f.readinto(view):
                    pass
    t1 = time.perf_counter()
    with open(args.out, "wb", buffering=0) as f:
        left = args.bytes
        while left > 0:
            left -= f.write(view[: min(left, len(buf))])
        t2 = time.perf_counter()
        os.fsync(f.fileno())
    t3 = time.perf_counter()
    args.out.unlink()
    print(json.dumps({"read": t1 - t0, "write": t2 - t1, "fsync": t3 - t2, "seconds": t3 - t0,
                      "cpu": time.process_time()}))
    return 0


def split(argv: list[str]) -> int:
    """One export of ``--split-child CODE`` with the stream's per-stage CPU; print it (JSON)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--split-child", type=Path, required=True)
    ap.add_argument("base")
    ap.add_argument("aligned")
    ap.add_argument("out")
    ap.add_argument("--ratios", required=True)
    ap.add_argument("--shard-bytes", type=int, required=True)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(args.split_child))
    import workers.stream as stream
    from service.spec import GroupSpec
    from workers.export import export_merge

    stats: dict[str, float] = {}
    real = stream.stream_merge

    def with_stats(*a, **k):
        return real(*a, **k, stats=stats)

    stream.stream_merge = with_stats  # export_merge imports it when it is called
    imports = time.process_time()  # since the process started: interpreter and imports
    wall = time.perf_counter()
    export_merge(args.base, args.aligned, args.out, GroupSpec.parse_arg("blocks:3"),
                 [float(r) for r in args.ratios.split(",")], max_shard_bytes=args.shard_bytes)
    wall = time.perf_counter() - wall
    total = time.process_time() - imports
    threads = sum(v for k, v in stats.items() if k.startswith("cpu_") and k != "cpu_hash")
    print(json.dumps({"imports": imports, "export": total, "wall": wall,
                      "other": total - threads, **stats}))
    return 0


def build(argv: list[str]) -> int:
    """Build one sharded bf16 checkpoint (in a subprocess: the parent never holds torch)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", type=Path, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--shape", required=True, help="JSON: hidden, intermediate, layers, vocab, heads")
    ap.add_argument("--shard-bytes", type=int, required=True)
    args = ap.parse_args(argv)
    import torch
    from _common import llama_config
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    config = llama_config(**json.loads(args.shape))
    config.dtype = "bfloat16"
    stamp = args.build / "bench_config.json"
    want = json.dumps({"config": config.to_dict(), "seed": args.seed,
                       "shard_bytes": args.shard_bytes}, sort_keys=True, default=str)
    if stamp.exists() and stamp.read_text() == want:
        return 0
    shutil.rmtree(args.build, ignore_errors=True)
    args.build.mkdir(parents=True)
    with torch.device("meta"):
        shapes = [(n, t.shape) for n, t in AutoModelForCausalLM.from_config(config).state_dict().items()]
    shards: list[list] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = shape.numel() * 2
        if shards[-1] and size + nbytes > args.shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    gen = torch.Generator().manual_seed(args.seed)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            t = torch.randn(shape, generator=gen) * 0.02 + (1.0 if name.endswith("norm.weight") else 0.0)
            tensors[name] = t.to(torch.bfloat16)
            weight_map[name] = fname
        save_file(tensors, args.build / fname, metadata={"format": "pt"})
    total = sum(s.numel() * 2 for _, s in shapes)
    (args.build / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(args.build)
    stamp.write_text(want)
    return 0


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"{' '.join(cmd[:5])} ... failed with exit code {proc.returncode}")
    return proc.stdout


def _timed(cmd: list[str], cwd: Path, env: dict | None = None) -> dict:
    """Run ``cmd`` in ``cwd``: wall seconds, CPU seconds and peak RSS (``wait4``)."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(cmd[:6])} ... failed:\n{err.read().decode()}")
    return {"seconds": wall, "cpu": usage.ru_utime + usage.ru_stime, "user": usage.ru_utime,
            "sys": usage.ru_stime, "maxrss": usage.ru_maxrss * 1024}


def _load() -> float:
    return os.getloadavg()[0]


def _stats(xs: list[float]) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "n": len(xs)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--floor" in argv:
        return floor(argv)
    if "--build" in argv:
        return build(argv)
    if "--split-child" in argv:
        return split(argv)

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=16, help="decoder layers at 1x (default 16: 269 M params)")
    ap.add_argument("--scales", default="1,4", help="model sizes as multiples of --layers")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=512, help="small: the layers carry the bytes")
    ap.add_argument("--shard-mb", type=float, default=200.0,
                    help="shard size of the inputs and of the export, MB (1e6)")
    ap.add_argument("--ratios", default="0.3,0.3,0.3", help="one ratio per block (blocks:3)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--before", type=Path, default=None,
                    help="another checkout (service/ and workers/) to time the same command from")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep the built checkpoints here and reuse them (default: a temp dir)")
    ap.add_argument("--no-cached", action="store_true",
                    help="leave out the second run of the code under test (sources' digests cached)")
    ap.add_argument("--split", action="store_true",
                    help="then one export per code and size with the per-stage CPU (stream stats)")
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
    codes = ({"after": ROOT} | ({} if args.no_cached else {"after, cached": ROOT})
             | ({"before": args.before.resolve()} if args.before else {}))
    cache = root / "cache"  # HMAOPT_CACHE_DIR of the merges: emptied before "after"
    env = {**os.environ, "HMAOPT_CACHE_DIR": str(cache)}

    print("hmaopt bench_export: hmaopt merge against the I/O floor")
    print(f"  device   : cpu ({cpu_model()}), {info['cpu_count']} cores, "
          f"{human_bytes(info['mem_total_bytes'] or 0)} RAM; load {info['loadavg']}")
    print(f"  code     : {info['code']}" + (f"; before: {args.before}" if args.before else ""))
    print(f"  model    : Llama bf16 hidden={args.hidden} intermediate={args.intermediate} "
          f"heads={args.heads} vocab={args.vocab}, layers {', '.join(str(args.layers * s) for s in scales)}")
    print(f"  merge    : --groups blocks:3 --ratios {args.ratios}, shards {human_bytes(shard_bytes)} "
          f"(in and out), {args.rounds} round(s); page cache warm, output synced")

    results = []
    try:
        for scale in scales:
            shape = {"hidden": args.hidden, "intermediate": args.intermediate,
                     "layers": args.layers * scale, "vocab": args.vocab, "heads": args.heads}
            base, aligned = root / f"x{scale}-base", root / f"x{scale}-aligned"
            for path, seed in ((base, 0), (aligned, 1)):
                _run([sys.executable, os.path.abspath(__file__), "--build", str(path), "--seed",
                      str(seed), "--shape", json.dumps(shape), "--shard-bytes", str(shard_bytes)])
            params = llama_param_count(**shape)
            out_bytes = params * 2
            rounds = []
            for _ in range(args.rounds):
                rnd = {"load": _load()}
                os.sync()
                text = _run([sys.executable, os.path.abspath(__file__), "--floor", str(base),
                                str(aligned), str(root / "floor.bin"), "--bytes", str(out_bytes)])
                rnd["floor"] = json.loads(text.strip().splitlines()[-1])
                for name, code in codes.items():
                    out = root / f"x{scale}-out-{name.split(',')[0]}"
                    shutil.rmtree(out, ignore_errors=True)
                    if name == "after":
                        shutil.rmtree(cache, ignore_errors=True)
                    os.sync()
                    rnd.setdefault("loads", {})[name] = _load()
                    rnd[name] = _timed([sys.executable, "-m", "service.cli", "merge", "--base", str(base),
                                        "--aligned", str(aligned), "--groups", "blocks:3", "--ratios",
                                        args.ratios, "--out", str(out), "--max-shard-size",
                                        str(shard_bytes)], code, env)
                    shutil.rmtree(out, ignore_errors=True)
                rounds.append(rnd)
                print(f"  {scale}x round: load {rnd['load']:.1f}, floor {rnd['floor']['seconds']:.2f} s "
                      f"({rnd['floor']['cpu']:.2f} CPU-s), "
                      + ", ".join(f"{n} {rnd[n]['seconds']:.2f} s ({rnd[n]['cpu']:.2f} CPU-s, "
                                  f"load {rnd['loads'][n]:.1f})" for n in codes), flush=True)
            entry = {"scale": scale, "layers": shape["layers"], "params": params,
                     "bytes": out_bytes, "rounds": rounds}
            if args.split:
                entry["split"] = {}
                for name, code in codes.items():
                    out = root / f"x{scale}-split"
                    shutil.rmtree(out, ignore_errors=True)
                    if name == "after":
                        shutil.rmtree(cache, ignore_errors=True)
                    os.sync()
                    load = _load()
                    proc = subprocess.run(
                        [sys.executable, os.path.abspath(__file__), "--split-child", str(code),
                         str(base), str(aligned), str(out), "--ratios", args.ratios,
                         "--shard-bytes", str(shard_bytes)],
                        cwd=code, env=env, capture_output=True, text=True, check=False)
                    shutil.rmtree(out, ignore_errors=True)
                    if proc.returncode != 0:
                        raise SystemExit(f"split of {name} failed:\n{proc.stderr}")
                    entry["split"][name] = {**json.loads(proc.stdout.strip().splitlines()[-1]),
                                            "load": load}
            results.append(entry)
    finally:
        if tmp is not None:
            tmp.cleanup()

    rows = []
    for r in results:
        floors = [x["floor"]["seconds"] for x in r["rounds"]]
        for name in codes:
            secs = [x[name]["seconds"] for x in r["rounds"]]
            ratio = [x[name]["seconds"] / x["floor"]["seconds"] for x in r["rounds"]]
            r[name] = {"seconds": _stats(secs), "ratio": _stats(ratio),
                       "maxrss": max(x[name]["maxrss"] for x in r["rounds"]),
                       "cpu": _stats([x[name]["cpu"] for x in r["rounds"]])}
            s, q = r[name]["seconds"], r[name]["ratio"]
            rows.append([f"{r['scale']}x", f"{r['params'] / 1e6:.0f} M", f"{r['bytes'] / 1e6:.0f}",
                         name,
                         f"{min(floors):.2f} / {statistics.median(floors):.2f} / {max(floors):.2f}",
                         f"{s['min']:.2f} / {s['median']:.2f} / {s['max']:.2f}",
                         f"{q['min']:.2f} / {q['median']:.2f} / {q['max']:.2f}",
                         f"{r[name]['cpu']['median']:.2f}", f"{r[name]['maxrss'] / 1e6:.0f}",
                         " ".join(f"{x['load']:.1f}" for x in r["rounds"])])
    print()
    print(table(["size", "params", "out MB", "code", "floor s min/med/max", "merge s min/med/max",
                 "merge/floor min/med/max", "CPU s (med)", "peak RSS MB", "load (1 min)"], rows))
    if args.split:
        cols = [("imports", "imports"), ("read", None), ("sha256", None),
                ("merge", "cpu_compute"), ("write", "cpu_write"), ("sync", "cpu_syncer"),
                ("other", "other"), ("total", None)]
        rows = []
        for r in results:
            for name, st in r["split"].items():
                read = st.get("cpu_read", 0) + st.get("cpu_read_aligned", 0) - st.get("cpu_hash", 0)
                # no cpu_hash: nothing hashed (digests cached), or older code that hashes in read
                hashed = st.get("cpu_hash", 0.0 if "cpu_read_aligned" in st else float("nan"))
                vals = {"read": read, "sha256": hashed, "total": st["imports"] + st["export"]}
                rows.append([f"{r['scale']}x", name]
                            + [f"{vals[c] if k is None else st.get(k, float('nan')):.2f}"
                               for c, k in cols]
                            + [f"{st['wall']:.2f}", f"{st['load']:.1f}"])
        print()
        print("CPU seconds by stage (one export each; where sha256 is nan, read includes it):")
        print(table(["size", "code", *[c for c, _ in cols], "export wall s", "load"], rows))
    write_json(args.json_out, {"benchmark": "bench_export", "argv": sys.argv, "machine": info,
                               "shard_bytes": shard_bytes, "ratios": args.ratios, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
