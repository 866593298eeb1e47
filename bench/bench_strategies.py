"""Search strategies on the reference world and the GPT-2 world: evaluations to a good
feasible merge.

Per world (``--world``: ``reference`` is the cache's default world, ``gpt2`` the cache's
``world-gpt2``, built with ``hmaopt world build --arch gpt2`` when missing, or a folder) and
per seed, in-memory studies on the world's own job spec (``blocks:3``, budget 0.1, bisection
baseline). Arms:

- cold samplers: tpe (the default), random, cmaes, gp, 40 evaluations each;
- local (``sampler: local``: Gaussian steps around the best feasible trial, workers/local.py),
  40 evaluations, and local-layers, 20;
- hybrid (the gradient stage, then tpe), 40 evaluations;
- gradient alone: the hybrid run's trials before the sampler's first (``strategy:
  gradient`` runs exactly these: the baseline, the gradient direction and its ray), so it is
  read off the hybrid run, not run again (``--arms gradient`` runs it on its own);
- the same with ``groups: layers`` (one ratio per decoder layer, 6 on both worlds):
  hybrid-layers and tpe-layers, 20 evaluations, against blocks:3 at the same count.

Reported per world: the best feasible search reward after N evaluations (the gradient stage
counted in evaluation equivalents: its seconds over a trial's median), evaluations to 99 % of
the way from the lowest reward any run measured to the best feasible reward any run found,
and the gradient stage's wall time beside a trial's.

Runs go in priority order (``--arms`` first, every seed and world, then ``--extra-arms``
seed by seed) and stop being started after ``--deadline-minutes``; the JSON is rewritten
after every run, so a cut run keeps what it measured. Evaluations are memoised per world (a
ratio vector measured once is not measured again: the same merged weights and data give the
same figures, greedy decoding): every run still counts them, only the wall time is saved
(mostly the bisection baseline, which every run of a world repeats). Torch runs with
``--threads`` threads (default 1: on a shared 2-core machine one thread was 5x faster than
two).

    python bench/bench_strategies.py [--world reference --world gpt2] [--seeds 5]
        [--arms tpe,hybrid,hybrid-layers] [--extra-arms tpe-layers,random,cmaes,gp]
        [--deadline-minutes 42] [--json FILE]
    python bench/bench_strategies.py --combine FILE [FILE ...]   # earlier runs, together
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

from _common import machine_info, table  # bench/ is the script's folder

#: name -> (spec.search overrides, groups (None: the spec's), evaluations)
ARMS: dict[str, tuple[dict, dict | None, int]] = {
    "tpe": ({"sampler": "tpe"}, None, 40),
    "random": ({"sampler": "random"}, None, 40),
    "cmaes": ({"sampler": "cmaes"}, None, 40),
    "gp": ({"sampler": "gp"}, None, 40),
    "hybrid": ({"sampler": "tpe", "strategy": "hybrid"}, None, 40),
    "gradient": ({"sampler": "tpe", "strategy": "gradient"}, None, 20),
    "hybrid-layers": ({"sampler": "tpe", "strategy": "hybrid"}, {"scheme": "layers"}, 20),
    "tpe-layers": ({"sampler": "tpe"}, {"scheme": "layers"}, 20),
    "local": ({"sampler": "local"}, None, 40),
    "local-layers": ({"sampler": "local"}, {"scheme": "layers"}, 20),
}
COLD = ("tpe", "random", "cmaes", "gp")
AT = (10, 15, 20, 30, 40)


def world_folder(name: str) -> Path:
    from service.settings import get_settings
    from workers.world import WorldConfig, ensure_world

    cache = get_settings().cache_dir
    if name == "reference":
        return ensure_world(cache / "world")
    if name == "gpt2":
        return ensure_world(cache / "world-gpt2", WorldConfig(arch="gpt2"))
    return Path(name)


class World:
    """One world's spec, and a merger and evaluator per grouping, evaluations memoised."""

    def __init__(self, name: str) -> None:
        from service.spec import load_spec

        self.name = name
        self.folder = world_folder(name)
        self.spec = load_spec(self.folder / "spec.yaml")
        self.jobs: dict[str, tuple] = {}
        self.memo: dict[tuple, object] = {}
        self.hits = self.misses = 0
        self.seconds_saved = 0.0

    def job(self, groups: dict | None):
        from service.spec import JobSpec
        from workers.search import load_job, measure_base

        key = json.dumps(groups, sort_keys=True)
        if key not in self.jobs:
            data = self.spec.model_dump(mode="json")
            if groups is not None:
                data["groups"] = groups
            merger, ev = load_job(JobSpec.model_validate(data), device="auto")
            measure_base(merger, ev)
            self._memoise(merger, ev)
            self.jobs[key] = (merger, ev)
        return self.jobs[key]

    def _memoise(self, merger, ev) -> None:
        evaluate = ev.evaluate

        def memoised(*, budget=None, prune_margin=0.0, prune_confidence=None, on_batch=None,
                     on_stage=None):
            ratios = tuple(merger.ratios)
            # one ratio everywhere is the same merge under any grouping (the nearest rule)
            vector = ("uniform", ratios[0]) if len(set(ratios)) == 1 else ratios
            key = (vector, budget, prune_margin, prune_confidence)
            if key in self.memo and on_stage is None:
                self.hits += 1
                m = copy.deepcopy(self.memo[key])
                self.seconds_saved += m.seconds
                return m
            self.misses += 1
            m = evaluate(budget=budget, prune_margin=prune_margin,
                         prune_confidence=prune_confidence, on_batch=on_batch, on_stage=on_stage)
            self.memo[key] = copy.deepcopy(m)
            return m

        ev.evaluate = memoised


def curve(records, offset: float, n: int) -> list[float | None]:
    """Best feasible reward after each evaluation (the gradient stage's cost first)."""
    out, best = [None] * int(round(offset)), None
    for r in sorted(records, key=lambda r: r.number):
        if r.feasible and r.reward is not None and (best is None or r.reward > best):
            best = r.reward
        out.append(best)
    return out[:n]


def run_one(world: World, arm: str, seed: int, max_trials: int | None = None) -> dict:
    from service.spec import JobSpec
    from workers.search import Search

    overrides, groups, trials = ARMS[arm]
    trials = min(trials, max_trials or trials)
    merger, ev = world.job(groups)
    data = world.spec.model_dump(mode="json")
    if groups is not None:
        data["groups"] = groups
    data["search"].update(overrides, seed=seed, n_trials=trials)
    search = Search(JobSpec.model_validate(data), merger, ev, name=f"{world.name}-{arm}-{seed}")
    t0 = time.perf_counter()
    search.run()
    wall = time.perf_counter() - t0
    recs = search.records()
    grad = search.study.user_attrs.get("gradient")
    full = [r.eval_seconds + r.merge_seconds for r in recs if r.stage == 2]
    return {"arm": arm, "seed": seed, "records": recs, "wall": wall,
            "per_trial": statistics.median(full) if full else None, "gradient": grad,
            "offset": (grad or {}).get("eval_equivalents") or 0.0,
            "best_uniform": max((r.reward for r in recs if r.kind == "uniform" and r.feasible
                                 and r.reward is not None), default=None)}


def derived_gradient(run: dict) -> dict:
    """The gradient strategy's run, read off a hybrid run: its trials before the sampler's."""
    recs = sorted(run["records"], key=lambda r: r.number)
    first = next((i for i, r in enumerate(recs) if r.kind == "search"), len(recs))
    return {**run, "arm": "gradient", "records": recs[:first], "derived": True}


def summarise(runs: list[dict]) -> dict:
    """Per arm of one world: reach to 99 %, best @N per seed, costs."""
    feasible = [r.reward for run in runs for r in run["records"]
                if r.feasible and r.reward is not None]
    if not feasible:
        return {}
    best_known = max(feasible)
    r0 = min(r.reward for run in runs for r in run["records"] if r.reward is not None)
    threshold = r0 + 0.99 * (best_known - r0)
    arms: dict[str, list[dict]] = {}
    for run in runs:
        arms.setdefault(run["arm"], []).append(run)
        if run["arm"] == "hybrid":
            arms.setdefault("gradient", []).append(derived_gradient(run))
    out = {"best_known": best_known, "lowest": r0, "threshold": threshold, "arms": {}}
    for arm, rs in arms.items():
        rs = sorted(rs, key=lambda run: run["seed"])
        n_max = max(AT)
        curves = [curve(run["records"], run["offset"], n_max) for run in rs]
        reach = [next((i + 1 for i, v in enumerate(c) if v is not None and v >= threshold),
                      None) for c in curves]
        at = {n: [(c[n - 1] if len(c) >= n else (c[-1] if c else None)) for c in curves]
              for n in AT}
        out["arms"][arm] = {
            "seeds": [run["seed"] for run in rs], "reach_99": reach,
            "best_at": at, "final": [c[-1] if c else None for c in curves],
            "evaluations": [round(len(run["records"]) + run["offset"], 1) for run in rs],
            "per_trial_s": [run["per_trial"] for run in rs],
            "wall_s": [round(run["wall"], 1) for run in rs],
            "gradient_s": [run["gradient"]["seconds"] for run in rs if run.get("gradient")],
            "gradient_evals": [run["gradient"]["eval_equivalents"] for run in rs
                               if run.get("gradient")],
            "best_uniform": [run["best_uniform"] for run in rs],
            "found_by": [max((r for r in run["records"] if r.feasible and r.reward is not None),
                             key=lambda r: r.reward, default=None) for run in rs],
            "derived": any(run.get("derived") for run in rs),
        }
        out["arms"][arm]["found_by"] = [r.kind if r else None
                                        for r in out["arms"][arm]["found_by"]]
    return out


def fmt(xs) -> str:
    return " ".join("-" if x is None else f"{x:.3f}" for x in xs)


def report(world: str, s: dict) -> None:
    if not s:
        print(f"{world}: no feasible trial yet")
        return
    print(f"\n== {world}: best feasible reward found by any run {s['best_known']:.4f}; 99 % of "
          f"the way from {s['lowest']:.4f}: {s['threshold']:.4f}")
    rows = []
    for arm, a in s["arms"].items():
        per = [x for x in a["per_trial_s"] if x is not None]
        rows.append([arm + (" (read off hybrid)" if a["derived"] else ""),
                     " ".join(str(x) if x else ">" for x in a["reach_99"]),
                     fmt(a["best_at"][15]), fmt(a["best_at"][20]), fmt(a["best_at"][40]),
                     f"{statistics.median(per):.2f}" if per else "-",
                     fmt(a["gradient_s"]) or "-", fmt(a["gradient_evals"]) or "-"])
    print(table(["arm", "evals to 99 % (per seed)", "best @15", "best @20", "best @40",
                 "s / trial", "gradient stage s", "= evaluations"], rows))
    lines = [paired(s, arm, ref, n) for arm, ref, n in PAIRS]
    print("\n".join(x for x in lines if x))


#: (arm, against, at N evaluations) compared seed by seed in the report
PAIRS = [(a, "tpe", 40) for a in ("local", "hybrid", "random", "cmaes", "gp")] + [
    ("local-layers", "local", 20), ("hybrid-layers", "hybrid", 20), ("tpe-layers", "tpe", 20)]


def paired(s: dict, arm: str, ref: str, n: int) -> str | None:
    """``arm`` against ``ref`` at ``n`` evaluations on the same seeds: higher / equal / lower,
    and the mean difference with its SE over seeds."""
    a, b = s["arms"].get(arm), s["arms"].get(ref)
    if a is None or b is None:
        return None
    mine, theirs = dict(zip(a["seeds"], a["best_at"][n])), dict(zip(b["seeds"], b["best_at"][n]))
    diffs = [mine[k] - theirs[k] for k in sorted(set(mine) & set(theirs))
             if mine[k] is not None and theirs[k] is not None]
    if not diffs:
        return None
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return (f"{arm} vs {ref} @{n}, paired by seed (n = {len(diffs)}): higher "
            f"{sum(d > 1e-9 for d in diffs)}, equal {sum(abs(d) <= 1e-9 for d in diffs)}, lower "
            f"{sum(d < -1e-9 for d in diffs)}; mean difference {statistics.mean(diffs):+.3f} "
            f"(SE {se:.3f})")


def jsonable_summary(s: dict) -> dict:
    return json.loads(json.dumps(s, default=str))


def loaded_runs(files: list[str]) -> dict[str, list[dict]]:
    """The runs of earlier ``--json`` files by world, as :func:`summarise` reads them (runs
    of one world build only: a rebuilt world's figures are not comparable)."""
    from types import SimpleNamespace

    out: dict[str, list[dict]] = {}
    for f in files:
        for name, w in json.loads(Path(f).read_text())["worlds"].items():
            for r in w["runs"]:
                recs = [SimpleNamespace(**t) for t in r["trials"]]
                out.setdefault(name, []).append({
                    "arm": r["arm"], "seed": r["seed"], "records": recs, "wall": r["wall"],
                    "per_trial": r["per_trial"], "gradient": r["gradient"],
                    "offset": (r["gradient"] or {}).get("eval_equivalents") or 0.0,
                    "best_uniform": max((t.reward for t in recs if t.kind == "uniform"
                                         and t.feasible and t.reward is not None),
                                        default=None)})
    return out


def main() -> None:
    import optuna
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                    help="report the runs of these --json files together (no new run): "
                    "99 %% of the best any of them found")
    ap.add_argument("--world", action="append", default=None,
                    help="reference, gpt2 or a world folder (repeatable; default both)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--arms", default="tpe,hybrid,hybrid-layers",
                    help="run for every seed and world first")
    ap.add_argument("--extra-arms", default="tpe-layers,random,cmaes,gp",
                    help="then these, seed by seed, while the deadline allows")
    ap.add_argument("--deadline-minutes", type=float, default=None,
                    help="start no run after this many minutes")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-trials", type=int, default=None, help="cap every arm (smoke runs)")
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args()
    if args.combine:
        for name, rs in loaded_runs(args.combine).items():
            report(name, summarise(rs))
        return

    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    names = args.world or ["reference", "gpt2"]
    started = time.perf_counter()
    worlds = {n: World(n) for n in names}
    primary = [a for a in args.arms.split(",") if a]
    extra = [a for a in args.extra_arms.split(",") if a]
    plan = ([(a, seed, w) for seed in range(args.seeds) for w in names for a in primary]
            + [(a, seed, w) for seed in range(args.seeds) for w in names for a in extra])
    runs: dict[str, list[dict]] = {n: [] for n in names}
    skipped: list[str] = []

    def save() -> None:
        if not args.json_out:
            return
        payload = {"machine": machine_info(), "threads": args.threads, "seeds": args.seeds,
                   "elapsed_s": round(time.perf_counter() - started, 1), "skipped": skipped,
                   "worlds": {}}
        for n, w in worlds.items():
            payload["worlds"][n] = {
                "folder": str(w.folder), "spec_name": w.spec.name,
                "memo": {"hits": w.hits, "misses": w.misses,
                         "seconds_saved": round(w.seconds_saved, 1)},
                "summary": jsonable_summary(summarise(runs[n])),
                "runs": [{"arm": r["arm"], "seed": r["seed"], "wall": r["wall"],
                          "per_trial": r["per_trial"], "gradient": r["gradient"],
                          "trials": [{"number": t.number, "kind": t.kind, "ratios": t.ratios,
                                      "reward": t.reward, "tax": t.tax, "feasible": t.feasible,
                                      "stage": t.stage} for t in r["records"]]}
                         for r in runs[n]]}
        Path(args.json_out).write_text(json.dumps(payload, indent=1, default=str) + "\n")

    for arm, seed, name in plan:
        minutes = (time.perf_counter() - started) / 60
        if args.deadline_minutes is not None and minutes > args.deadline_minutes:
            skipped.append(f"{name}/{arm}/{seed}")
            continue
        run = run_one(worlds[name], arm, seed, args.max_trials)
        runs[name].append(run)
        best = max((r.reward for r in run["records"] if r.feasible and r.reward is not None),
                   default=None)
        grad = run["gradient"]
        print(f"[{minutes:5.1f} min] {name} {arm} seed {seed}: {len(run['records'])} trials, "
              f"best {best if best is None else round(best, 4)}, {run['wall']:.0f} s"
              + (f", gradient stage {grad['seconds']:.1f} s = "
                 f"{grad['eval_equivalents']:.1f} evaluations" if grad else ""), flush=True)
        save()
    for name in names:
        report(name, summarise(runs[name]))
        w = worlds[name]
        print(f"{name}: memo {w.hits} hits / {w.misses} evaluations, {w.seconds_saved:.0f} s saved")
    if skipped:
        print(f"\nnot started (deadline): {len(skipped)} runs: {', '.join(skipped)}")
    print(f"total {(time.perf_counter() - started) / 60:.1f} min")
    save()


if __name__ == "__main__":
    main()
