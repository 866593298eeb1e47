"""Does the reference world have a real per-group effect? A grid, no search.

Evaluates (full search data, no pruning) the uniform ratios 0, 0.05, ..., 1 and every
block ratio vector on a grid {0, 0.2, ..., 1}^3, then reports the block vectors that beat
every uniform α at equal or lower tax, and what that means at the world's budget.

    python bench/world_effect.py [WORLD_DIR] [--step 0.2]

``--json FILE`` also writes every measured point.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

from _common import machine_info, write_json  # noqa: E402  (bench/ is the script's folder)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("world", nargs="?", default=None)
    parser.add_argument("--step", type=float, default=0.2)
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args()

    from service.settings import get_settings
    from service.spec import load_spec
    from workers.search import load_job, measure_base
    from workers.world import ensure_world

    world = Path(args.world) if args.world else ensure_world(get_settings().cache_dir / "world")
    spec = load_spec(world / "spec.yaml")
    merger, ev = load_job(spec, device="cpu")
    measure_base(merger, ev)

    def measure(ratios):
        merger.apply(ratios)
        m = ev.evaluate()
        return {"ratios": list(ratios), "reward": m.reward, "tax": m.tax, "metrics": m.metrics}

    started = time.perf_counter()
    n = round(1 / args.step)
    uniform = [measure([i / 20] * 3) for i in range(21)]
    blocks = [measure(list(v)) for v in itertools.product([i / n for i in range(n + 1)], repeat=3)]
    seconds = time.perf_counter() - started

    def best_uniform_at(tax: float):
        ok = [u for u in uniform if u["tax"] <= tax]
        return max(ok, key=lambda u: u["reward"]) if ok else None

    beats = []
    for b in blocks:
        u = best_uniform_at(b["tax"])
        if u is not None and b["reward"] > u["reward"]:
            beats.append({**b, "uniform": u, "margin": b["reward"] - u["reward"]})
    beats.sort(key=lambda b: -b["margin"])
    budget = spec.tax.budget
    u_budget = best_uniform_at(budget)
    feasible_blocks = [b for b in blocks if b["tax"] <= budget]
    b_budget = max(feasible_blocks, key=lambda b: b["reward"]) if feasible_blocks else None
    out = {
        "world": str(world), "budget": budget, "seconds": seconds,
        "evaluations": len(uniform) + len(blocks), "uniform": uniform,
        "n_block_vectors_beating_uniform": len(beats), "top_beating": beats[:10],
        "at_budget": {"best_uniform": u_budget, "best_block": b_budget},
        "blocks": blocks, "machine": machine_info(),
    }
    write_json(args.json_out, out)
    print(f"{len(uniform) + len(blocks)} evaluations in {seconds:.0f} s")
    print("uniform alpha: reward / tax")
    for u in uniform:
        print(f"  {u['ratios'][0]:.2f}  {u['reward']:+.3f}  {u['tax']:.4f}  {u['metrics']}")
    print(f"{len(beats)} of {len(blocks)} block vectors beat every uniform alpha at equal or "
          "lower tax; top 5:")
    for b in beats[:5]:
        print(f"  {b['ratios']}  reward {b['reward']:+.3f} tax {b['tax']:.4f}  vs uniform "
              f"{b['uniform']['ratios'][0]:.2f} reward {b['uniform']['reward']:+.3f} tax "
              f"{b['uniform']['tax']:.4f}  margin {b['margin']:+.3f}")
    if u_budget and b_budget:
        print(f"at budget {budget}: best uniform {u_budget['ratios'][0]:.2f} reward "
              f"{u_budget['reward']:+.3f} tax {u_budget['tax']:.4f}; best grid block vector "
              f"{b_budget['ratios']} reward {b_budget['reward']:+.3f} tax {b_budget['tax']:.4f}")


if __name__ == "__main__":
    main()
