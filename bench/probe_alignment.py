"""Does the destination's alignment change torch's copy_ / lerp bandwidth? (CPU probe)

bench_merge.py found that, on CPU, copying into the LiveMerger's live tensors is much slower
than copying into fresh tensors: the live tensors are views into a memory map of the base
checkpoint at 16-byte (not 64-byte) aligned offsets. This probe times ``dst.copy_(src)`` and
``torch.lerp(a, b, w, out=dst)`` with ``dst`` at several byte offsets from a 64-byte boundary.

    .venv/bin/python bench/probe_alignment.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _common import table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=64.0, help="tensor size in MB (float32)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = int(args.mb * 1e6) // 4
    buf = torch.empty(n + 64, dtype=torch.float32)
    a, b = torch.rand(n), torch.rand(n)

    def median_s(fn) -> float:
        fn()
        fn()
        ts = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    rows = []
    for off in (0, 1, 2, 4, 8):
        dst = buf[off:off + n]
        tc = median_s(lambda: dst.copy_(a))
        tl = median_s(lambda: torch.lerp(a, b, 0.3, out=dst))
        rows.append([f"{dst.data_ptr() % 64}", f"{2 * 4 * n / tc / 1e9:.2f}", f"{3 * 4 * n / tl / 1e9:.2f}"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32, "
          f"{4 * n / 1e6:.0f} MB per tensor; sources 64-byte aligned; median of {args.repeats}")
    print(table(["dst address % 64", "copy_ GB/s (2x bytes)", "lerp GB/s (3x bytes)"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
