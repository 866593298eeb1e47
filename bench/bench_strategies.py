"""Search strategies on the reference world: evaluations to a good feasible merge.

Per seed, on one loaded world (in-memory studies): tpe cold (the default, with the walk to
the budget), tpe without the walk (walk_steps 0), random, cmaes, gp, hybrid (the gradient
stage, then tpe) and gradient alone. Reported: the best feasible search reward after N
evaluations (the gradient stage counted in evaluation equivalents), evaluations to 99 % of
the way from the base reward to the best feasible reward any run found, and the gradient
stage's wall time beside a trial's.

    python bench/bench_strategies.py [--world DIR] [--seeds 3] [--trials 40] [--json FILE]
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import machine_info, table, world_job, write_json  # bench/ is the script's folder

ARMS = {  # name -> (spec.search overrides, trials)
    "tpe": ({"sampler": "tpe"}, None),
    "tpe-nowalk": ({"sampler": "tpe", "walk_steps": 0}, None),
    "random": ({"sampler": "random"}, None),
    "cmaes": ({"sampler": "cmaes"}, None),
    "gp": ({"sampler": "gp"}, None),
    "hybrid": ({"sampler": "tpe", "strategy": "hybrid"}, 20),
    "gradient": ({"sampler": "tpe", "strategy": "gradient"}, 20),
}


def curve(records, offset: float, n: int) -> list[float | None]:
    """Best feasible reward after each evaluation (the gradient stage's cost first)."""
    out, best = [None] * int(round(offset)), None
    for r in sorted(records, key=lambda r: r.number):
        if r.feasible and r.reward is not None and (best is None or r.reward > best):
            best = r.reward
        out.append(best)
    return out[:n]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", default=None)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args()

    from service.spec import JobSpec
    from workers.search import Search

    _, spec, merger, ev = world_job(args.world)
    arms = [a for a in args.arms.split(",") if a]
    runs: dict[str, list] = {}
    for arm in arms:
        overrides, trials = ARMS[arm]
        for seed in range(args.seeds):
            data = spec.model_dump(mode="json")
            data["search"].update(overrides, seed=seed, n_trials=trials or args.trials)
            s = JobSpec.model_validate(data)
            search = Search(s, merger, ev, name=f"{arm}-{seed}")
            t0 = time.perf_counter()
            search.run()
            wall = time.perf_counter() - t0
            recs = search.records()
            grad = search.study.user_attrs.get("gradient")
            per_trial = statistics.median(r.eval_seconds + r.merge_seconds for r in recs)
            runs.setdefault(arm, []).append({
                "records": recs, "wall": wall, "per_trial": per_trial, "gradient": grad,
                "offset": (grad or {}).get("eval_equivalents") or 0.0})
            best = max((r.reward for r in recs if r.feasible and r.reward is not None),
                       default=None)
            print(f"{arm} seed {seed}: {len(recs)} trials, best {best}, {wall:.0f} s"
                  + (f", gradient stage {grad['seconds']:.1f} s = "
                     f"{grad['eval_equivalents']:.1f} evaluations" if grad else ""), flush=True)
    best_known = max(r.reward for rs in runs.values() for run in rs for r in run["records"]
                     if r.feasible and r.reward is not None)
    r0 = min(r.reward for rs in runs.values() for run in rs for r in run["records"]
             if r.reward is not None)
    threshold = r0 + 0.99 * (best_known - r0)
    n_max = args.trials + 10
    rows, summary = [], {}
    for arm, rs in runs.items():
        curves = [curve(run["records"], run["offset"], n_max) for run in rs]
        reach = [next((i + 1 for i, v in enumerate(c) if v is not None and v >= threshold),
                      None) for c in curves]
        at = {n: [c[n - 1] if len(c) >= n else c[-1] for c in curves] for n in (15, 20, 40)}
        summary[arm] = {"reach_99": reach, "best_at": at,
                        "per_trial_s": statistics.median(run["per_trial"] for run in rs),
                        "gradient_s": [run["gradient"]["seconds"] for run in rs
                                       if run["gradient"]],
                        "evaluations": [len(run["records"]) + run["offset"] for run in rs]}
        fmt = lambda xs: " ".join("-" if x is None else f"{x:.3f}" for x in xs)  # noqa: E731
        rows.append([arm, " ".join(str(x) if x else ">" for x in reach), fmt(at[15]),
                     fmt(at[20]), fmt(at[40]),
                     f"{statistics.median(run['per_trial'] for run in rs):.2f}",
                     fmt(summary[arm]["gradient_s"]) or "-"])
    print(f"best feasible reward found by any run: {best_known:.4f}; 99 % of the way from "
          f"{r0:.4f}: {threshold:.4f}")
    print(table(["arm", "evals to 99 % (per seed)", "best @15", "best @20", "best @40",
                 "s / trial", "gradient stage s"], rows))
    write_json(args.json_out, {"machine": machine_info(), "best_known": best_known,
                               "threshold": threshold, "summary": summary})


if __name__ == "__main__":
    main()
