"""Search quality and speed on the reference world, per sampler.

For samplers tpe, gp, cmaes, random (SEEDS seeds each; nsga2 on request) and the uniform
grid alone: best feasible reward against the number of trials, trials needed to reach 99 %
of the best feasible reward any run found, time per trial split into merge and evaluation.
Then pruning under a tight budget: the same tpe searches with pruning on and off, and the
evaluation time saved.

    python bench/bench_search.py [--world DIR] [--trials 40] [--seeds 3] [--png FILE]
                                 [--json FILE] [--tight-budget 0.03]

The models are loaded once; every search is its own in-memory Optuna study on them.
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import machine_info, table, world_job, write_json  # bench/ is the script's folder

SAMPLERS = ("tpe", "gp", "cmaes", "random")


def best_so_far(records, n: int) -> list[float | None]:
    """Best feasible reward after each of the first ``n`` trials (by trial number)."""
    out, best = [], None
    by_number = sorted(records, key=lambda r: r.number)
    for r in by_number[:n]:
        if r.feasible and r.reward is not None and (best is None or r.reward > best):
            best = r.reward
        out.append(best)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", default=None, help="reference world folder (default: the cache)")
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--samplers", default=",".join(SAMPLERS))
    ap.add_argument("--tight-budget", type=float, default=0.03)
    ap.add_argument("--prune-margin", type=float, default=None,
                    help="override search.prune_margin in the pruning comparison")
    ap.add_argument("--png", default=None, help="write the best-so-far plot here")
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args()

    from workers.search import Search

    world, spec, merger, ev = world_job(args.world)

    def run(sampler: str, seed: int, *, n: int, budget: float | None = None,
            pruning: bool = True):
        s = spec.model_copy(deep=True)
        s.search.sampler, s.search.seed, s.search.n_trials = sampler, seed, n
        s.search.pruning = pruning
        if budget is not None:
            s.tax.budget = budget
            if args.prune_margin is not None:
                s.search.prune_margin = args.prune_margin
        search = Search(s, merger, ev, name=f"{sampler}-{seed}-{budget}-{pruning}")
        t0 = time.perf_counter()
        search.run()
        return search, time.perf_counter() - t0

    samplers = [x for x in args.samplers.split(",") if x]
    runs: dict[str, list] = {}
    wall: dict[str, list[float]] = {}
    for sampler in samplers:
        for seed in range(args.seeds):
            search, seconds = run(sampler, seed, n=args.trials)
            runs.setdefault(sampler, []).append(search.records())
            wall.setdefault(sampler, []).append(seconds)
            b = search.best()
            print(f"{sampler} seed {seed}: best {b.reward if b else None} in {seconds:.1f} s",
                  flush=True)
    first = next(iter(runs.values()))[0]
    grid_n = sum(r.kind == "uniform" for r in first)

    best_known = max(r.reward for rs in runs.values() for recs in rs for r in recs
                     if r.feasible and r.reward is not None)
    threshold = best_known - 0.01 * abs(best_known)
    uniform_best = max(r.reward for r in first if r.kind == "uniform" and r.feasible)
    checkpoints = [n for n in (grid_n, 15, 20, 25, 30, 40, 60, 80) if n <= args.trials]
    rows, summary = [], {}
    for sampler, rs in runs.items():
        curves = [best_so_far(recs, args.trials) for recs in rs]
        reach = []
        for c in curves:
            hit = next((i + 1 for i, v in enumerate(c) if v is not None and v >= threshold), None)
            reach.append(hit)
        merge = [r.merge_seconds for recs in rs for r in recs]
        evals = [r.eval_seconds for recs in rs for r in recs]
        final = [c[-1] for c in curves]
        summary[sampler] = {
            "curves": curves, "reach_99": reach, "final": final,
            "seeds_reaching_99": sum(h is not None for h in reach),
            "seeds_beating_uniform": sum(f is not None and f > uniform_best for f in final),
            "merge_s": statistics.mean(merge), "eval_s": statistics.mean(evals),
            "merge_share": sum(merge) / (sum(merge) + sum(evals)),
            "pruned": sum(r.stage == 1 for recs in rs for r in recs),
            "wall_s": wall[sampler],
        }
        rows.append([sampler] + [
            f"{statistics.mean(c[n - 1] for c in curves):.3f}" for n in checkpoints] + [
            f"{summary[sampler]['seeds_reaching_99']}/{len(rs)}",
            ", ".join("-" if h is None else str(h) for h in reach),
            f"{summary[sampler]['seeds_beating_uniform']}/{len(rs)}",
            f"{summary[sampler]['merge_s'] * 1e3:.1f}", f"{summary[sampler]['eval_s'] * 1e3:.0f}",
            f"{100 * summary[sampler]['merge_share']:.1f}%"])
    print(f"\nbest feasible reward any run found: {best_known:.4f}; 99% threshold "
          f"{threshold:.4f}; best feasible uniform alpha: {uniform_best:.4f}")
    print(table(["sampler"] + [f"@{n}" for n in checkpoints] +
                ["reach 99%", "trials to 99%", "> uniform", "merge ms", "eval ms", "merge share"],
                rows))

    # pruning under a tight budget: tpe, pruning on vs off, same seeds
    prune_rows, prune = [], {}
    for pruning in (True, False):
        evals, n_pruned, bests = [], 0, []
        for seed in range(args.seeds):
            search, _ = run("tpe", seed, n=args.trials, budget=args.tight_budget, pruning=pruning)
            recs = search.records()
            evals.append(sum(r.eval_seconds for r in recs if r.kind != "uniform"))
            over = sum(r.tax > args.tight_budget for r in recs if r.kind != "uniform")
            print(f"pruning {'on' if pruning else 'off'} seed {seed}: {over} non-baseline "
                  f"trials over budget, eval {evals[-1]:.1f} s", flush=True)
            n_pruned += sum(r.stage == 1 for r in recs)
            b = search.best()
            bests.append(b.reward if b else None)
        prune[pruning] = {"eval_s": evals, "pruned": n_pruned, "best": bests}
        prune_rows.append(["on" if pruning else "off", f"{sum(evals):.1f}", n_pruned,
                           ", ".join(f"{b:.3f}" if b is not None else "-" for b in bests)])
    saved = 1 - sum(prune[True]["eval_s"]) / sum(prune[False]["eval_s"])
    print(f"\npruning under budget {args.tight_budget} (tpe, {args.seeds} seeds x "
          f"{args.trials} trials; evaluation seconds of the non-baseline trials):")
    print(table(["pruning", "eval s", "pruned", "best per seed"], prune_rows))
    print(f"evaluation time saved by pruning: {100 * saved:.0f}%")

    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
        xs = list(range(1, args.trials + 1))
        for sampler, info in summary.items():
            for i, c in enumerate(info["curves"]):
                ax.plot(xs, [v if v is not None else float("nan") for v in c],
                        label=sampler if i == 0 else None,
                        color=f"C{list(summary).index(sampler)}", alpha=0.8, lw=1.4,
                        ls=("-", "--", ":", "-.")[i % 4])
        ax.axhline(uniform_best, color="k", lw=1, ls="--", label="best feasible uniform α")
        ax.axvline(grid_n, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("trial (the first %d are the uniform baseline)" % grid_n)
        ax.set_ylabel("best feasible reward so far")
        ax.set_title(f"reference world, tax budget {spec.tax.budget:g} "
                     "(α = weight on the aligned model)", fontsize=9)
        ax.set_ylim(bottom=uniform_best - 0.5)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        fig.savefig(args.png)
        print(f"wrote {args.png}")

    write_json(args.json_out, {
        "world": str(world), "trials": args.trials, "seeds": args.seeds,
        "budget": spec.tax.budget, "best_known": best_known, "threshold_99": threshold,
        "uniform_best": uniform_best, "samplers": summary,
        "pruning": {"budget": args.tight_budget, "saved": saved,
                    **{("on" if k else "off"): v for k, v in prune.items()}},
        "machine": machine_info(),
    })


if __name__ == "__main__":
    main()
