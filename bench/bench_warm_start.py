"""Warm start on the reference world: does a new checkpoint's search get there sooner when it
starts from the previous checkpoint's best ratios?

What a nightly pipeline does, on real models:

1. A second aligned checkpoint ("aligned2"): the world's aligned model trained a little
   further with the world's own alignment objective and data (``workers.world.train_lm`` on
   the style data, ``--align2-steps`` more steps, seed ``--align2-seed``), saved as safetensors
   with the tokenizer files in ``<cache>/world-aligned2-<hash>`` and reused from there.
2. Run A: the world spec on (base, aligned), seed 0: its best feasible ratios and its best
   feasible uniform α (what the previous night's job stored).
3. On (base, aligned2), seeds 0..S-1: a cold search (the world spec) and a warm one, built
   by the pipelines' own ``apply_warm_start``: ``search.warm_start`` = A's best ratios times
   each of ``--scales`` (default 1, 0.95, 0.9, the pipelines' default), then up to
   ``--refine`` trials on that ray toward the budget (``search.warm_start_refine``; default
   the pipelines' ``warm_start_refine``), and A's best uniform α added to
   ``search.uniform_grid`` when missing. Each
   search has its own SQLite study in a temp folder; θ_base figures come from the cache.
4. Trials needed: the 1-based trial number at which the best feasible reward so far first
   reaches T = R* - 0.01 (R* - R0), 99 % of the way from R0 (the reward of the uniform α = 0
   trial, the base model) to R* (the best feasible reward any aligned2 search found, cold or
   warm, any seed). Rewards can be negative, so 99 % of R* would mean nothing. The uniform
   baseline grid comes first in both arms and is counted; a search that never reaches T
   counts as n_trials + 1.

    python bench/bench_warm_start.py [--world DIR] [--seeds 5] [--trials N] [--json FILE]
                                     [--align2-steps N] [--align2-seed 100] [--scales 1 .95 .9]
                                     [--refine N]

Ratios are the weight on the ALIGNED model: merged = base + α (aligned - base).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _common import machine_info, table, write_json  # bench/ is the script's folder

#: files of a checkpoint folder that are the model itself; everything else is tokenizer
MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors"}


# --------------------------------------------------------------------------- aligned2


def aligned2_checkpoint(world: Path, cache_dir: Path, *, steps: int | None, seed: int,
                        lr: float | None) -> tuple[Path, dict]:
    """The world's aligned model trained ``steps`` more steps of its preference stage (the
    world's alignment data, on the parameters that stage trains: same objective and recipe as
    ``build_world``); cached by a hash of its inputs."""
    import torch

    from workers.checkpoint import sha256_file
    from workers.world import WorldConfig, load_world_info, make_data

    info = load_world_info(world)
    if info is None:
        raise SystemExit(f"{world} holds no reference world of the current version")
    cfg = WorldConfig(**info["config"])
    steps = steps if steps is not None else max(1, round(cfg.align_steps / 3))
    lr = lr if lr is not None else cfg.align_lr
    src = world / "models" / "aligned"
    recipe = {"world_version": info["version"], "world_config": info["config"],
              "aligned_sha256": sha256_file(src / "model.safetensors"),
              "steps": steps, "seed": seed, "lr": lr, "objective": "world.train_lm on align data",
              "torch": torch.__version__}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    out = cache_dir / f"world-aligned2-{digest}"
    stamp = out / "aligned2.json"
    if stamp.is_file():
        made = json.loads(stamp.read_text())
        made["cached"] = True
        return out, made

    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from workers.chartok import char_tokenizer
    from workers.world import skill_scores
    from workers.world_train import top_parameters, train_lm

    hf_logging.disable_progress_bar()
    print(f"training aligned2: {steps} more alignment steps (world: {cfg.align_steps}), "
          f"lr {lr:g}, seed {seed} -> {out}", flush=True)
    t0 = time.perf_counter()
    data = make_data(cfg.seed)
    tok = char_tokenizer()  # the tokenizer build_world trains with
    model = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32)
    before = skill_scores(model.eval(), tok, data.sets)
    losses = train_lm(model, data.align, tok, steps=steps, lr=lr, batch_size=cfg.batch_size,
                       seq_len=cfg.seq_len, seed=seed, progress=None, stage="align2",
                       params=top_parameters(model, cfg.layers, cfg.align_layers))
    after = skill_scores(model, tok, data.sets)
    tmp = out.with_name(f".{out.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in src.iterdir():  # the tokenizer files, as in the world's aligned folder
        if f.is_file() and f.name not in MODEL_FILES:
            shutil.copy2(f, tmp / f.name)
    _check_same_format(src, tmp)
    tail = losses[-min(50, len(losses)):]
    made = {"recipe": recipe, "steps": steps, "seed": seed, "lr": lr,
            "world_align_steps": cfg.align_steps,
            "loss_first": losses[0], "loss_final": sum(tail) / len(tail),
            "skills_aligned": before, "skills_aligned2": after,
            "seconds": round(time.perf_counter() - t0, 1), "cached": False}
    (tmp / "aligned2.json").write_text(json.dumps(made, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out, made


def _check_same_format(a: Path, b: Path) -> None:
    """Same tensor names, shapes and dtypes as the world's aligned checkpoint."""
    from safetensors import safe_open

    def layout(folder: Path) -> dict:
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                    for k in f.keys()}

    if layout(a) != layout(b):
        raise SystemExit(f"aligned2 checkpoint {b} does not match the layout of {a}")


# --------------------------------------------------------------------------- searches


def trials_needed(records, threshold: float) -> int | None:
    """1-based trial number at which the best feasible reward so far first reaches
    ``threshold``; None when it never does."""
    best = None
    for r in sorted(records, key=lambda r: r.number):
        if r.feasible and r.reward is not None and (best is None or r.reward > best):
            best = r.reward
        if best is not None and best >= threshold:
            return r.number + 1
    return None


def best_so_far(records) -> list[float | None]:
    """Best feasible reward after each trial (by trial number)."""
    out, best = [], None
    for r in sorted(records, key=lambda r: r.number):
        if r.feasible and r.reward is not None and (best is None or r.reward > best):
            best = r.reward
        out.append(best)
    return out


def best_feasible(records) -> float | None:
    return max((r.reward for r in records if r.feasible and r.reward is not None), default=None)


def fmt(v, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", default=None, help="reference world folder (default: the cache)")
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0..S-1 per arm on aligned2")
    ap.add_argument("--trials", type=int, default=None,
                    help="trials per search, baseline grid included (default: the world spec's)")
    ap.add_argument("--align2-steps", type=int, default=None,
                    help="extra alignment steps for aligned2 (default: a third of the world's)")
    ap.add_argument("--align2-seed", type=int, default=100)
    ap.add_argument("--align2-lr", type=float, default=None,
                    help="peak lr of the continued training (default: the world's align_lr)")
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.95, 0.9],
                    help="warm start: A's best ratios times each of these (the pipelines' "
                    "warm_start_scales default)")
    ap.add_argument("--refine", type=int, default=None,
                    help="warm start: trials on the previous best's ray toward the budget "
                    "(default: the pipelines' warm_start_refine)")
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args()

    import optuna
    from transformers.utils import logging as hf_logging

    from service.settings import get_settings
    from service.pipelines.spec import PipelineSpec, apply_warm_start
    from service.spec import JobSpec, load_spec
    from workers.search import run_search
    from workers.world import ensure_world

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    hf_logging.set_verbosity_error()
    settings = get_settings()
    cache_dir = Path(settings.cache_dir)
    world = Path(args.world) if args.world else ensure_world(cache_dir / "world")
    started = time.perf_counter()

    aligned2, made = aligned2_checkpoint(world, cache_dir, steps=args.align2_steps,
                                         seed=args.align2_seed, lr=args.align2_lr)
    print(f"aligned2: {aligned2} ({'cached' if made['cached'] else 'trained'}; "
          f"{made['steps']} more steps after the world's {made['world_align_steps']}, "
          f"lr {made['lr']:g}, seed {made['seed']}; loss {made['loss_first']:.4f} -> "
          f"{made['loss_final']:.4f})")
    for label in ("aligned", "aligned2"):
        s = made[f"skills_{label}"]
        print(f"  {label:9s} addition {s['addition']:.3f}  facts {s['facts']:.3f}  "
              f"text ppl {s['text']:.3f}")

    world_spec = load_spec(world / "spec.yaml")
    refine = (args.refine if args.refine is not None
              else PipelineSpec.model_fields["warm_start_refine"].default)
    n_trials = args.trials or world_spec.search.n_trials

    def make_spec(*, aligned: Path | None = None, seed: int, warm: dict | None = None,
                  uniform: float | None = None) -> JobSpec:
        data = world_spec.model_dump(mode="json")
        if aligned is not None:
            data["aligned_model"] = str(aligned)
        data["search"].update(seed=seed, n_trials=n_trials)
        if warm is not None:  # what the pipeline scheduler does
            data = apply_warm_start(data, warm, uniform, args.scales, refine)
        return JobSpec.model_validate(data)  # validated, cross-field checks too

    tmpdir = Path(tempfile.mkdtemp(prefix="bench-warm-start-"))

    def search(spec: JobSpec, label: str):
        t0 = time.perf_counter()
        result = run_search(spec, storage=f"sqlite:///{tmpdir / label}.db", name=label,
                            cache_dir=cache_dir)
        seconds = time.perf_counter() - t0
        warm_recs = [r for r in result.trials if r.kind == "warm"]
        note = ""
        if warm_recs:
            note = "; warm trials " + ", ".join(
                f"#{w.number + 1}: reward {fmt(w.reward)} tax {w.tax:.4f}"
                f"{'' if w.feasible else ' (infeasible)'}" for w in warm_recs)
        print(f"{label}: best {fmt(result.best.reward if result.best else None)} "
              f"({len(result.trials)} trials, {seconds:.1f} s{note})", flush=True)
        return result, seconds

    try:
        # run A: the previous checkpoint's search
        res_a, sec_a = search(make_spec(seed=0), "A-aligned-seed0")
        if res_a.best is None:
            raise SystemExit("run A found no feasible ratios: nothing to warm start from")
        a = res_a.to_dict()
        warm_ratios = a["best"]["ratios"]
        warm_uniform = (a["best_uniform"] or {}).get("ratio")
        print(f"run A best ratios {warm_ratios} (reward {res_a.best.reward:.4f}, tax "
              f"{res_a.best.tax:.4f}); best uniform alpha {warm_uniform}")

        cold, warm = [], []
        for seed in range(args.seeds):
            cold.append(search(make_spec(aligned=aligned2, seed=seed), f"cold-seed{seed}"))
            warm.append(search(make_spec(aligned=aligned2, seed=seed, warm=warm_ratios,
                                         uniform=warm_uniform), f"warm-seed{seed}"))
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)

    cold_grid = len(make_spec(aligned=aligned2, seed=0).uniform_grid())
    warm_spec = make_spec(aligned=aligned2, seed=0, warm=warm_ratios, uniform=warm_uniform)
    warm_grid = len(warm_spec.uniform_grid())

    all_records = [r for res, _ in cold + warm for r in res.trials]
    r_star = best_feasible(all_records)
    r0s = {r.reward for res, _ in cold + warm for r in res.trials
           if r.kind == "uniform" and r.uniform_ratio == 0.0}
    if r_star is None or not r0s:
        raise SystemExit("no feasible trial or no uniform alpha = 0 trial on aligned2")
    r0 = statistics.mean(r0s)
    threshold = r_star - 0.01 * (r_star - r0)

    def needed(res) -> tuple[int, bool]:
        hit = trials_needed(res.trials, threshold)
        return (n_trials + 1, False) if hit is None else (hit, True)

    rows, per_seed = [], []
    cold_n, warm_n = [], []
    for seed, ((rc, sc), (rw, sw)) in enumerate(zip(cold, warm)):
        (nc, okc), (nw, okw) = needed(rc), needed(rw)
        cold_n.append(nc)
        warm_n.append(nw)
        bc, bw = best_feasible(rc.trials), best_feasible(rw.trials)
        per_seed.append({"seed": seed, "cold_needed": nc, "cold_reached": okc,
                         "warm_needed": nw, "warm_reached": okw, "cold_best": bc,
                         "warm_best": bw, "cold_seconds": sc, "warm_seconds": sw})
        rows.append([seed, f"{nc}" + ("" if okc else " (never)"),
                     f"{nw}" + ("" if okw else " (never)"), fmt(bc, ".4f"), fmt(bw, ".4f")])

    med_c, med_w = statistics.median(cold_n), statistics.median(warm_n)
    mean_c, mean_w = statistics.mean(cold_n), statistics.mean(warm_n)
    ratio = med_w / med_c if med_c else math.nan
    met = med_w <= 0.5 * med_c
    def uniform_at(res, alpha: float):
        return next((r for r in res.trials if r.kind == "uniform" and r.uniform_ratio == alpha),
                    None)

    def best_uniform(res):
        return max((r for r in res.trials if r.kind == "uniform" and r.feasible
                    and r.reward is not None), key=lambda r: r.reward, default=None)

    print(f"\nreference world {world}, budget {world_spec.tax.budget:g}, sampler "
          f"{world_spec.search.sampler}, {n_trials} trials per search (uniform grid included)")
    print(f"uniform baseline grid: cold {cold_grid} points, warm {warm_grid} points"
          + (" (A's best uniform alpha was already on the grid)" if warm_grid == cold_grid
             else " (A's best uniform alpha added)")
          + f"; warm then runs A's best ratios as trial #{warm_grid + 1}")
    print(f"R0 = reward of the uniform alpha = 0 trial (the base model) = {r0:.4f}; "
          f"R* = best feasible reward of any aligned2 search (cold or warm, all seeds) = "
          f"{r_star:.4f}")
    print(f"threshold T = R* - 0.01 (R* - R0) = {threshold:.4f} (99% of the way from R0 to R*); "
          f"a search that never reaches T counts as {n_trials + 1}")
    if len(r0s) > 1:
        print(f"  (the alpha = 0 trials differ between searches: {sorted(r0s)}; R0 is their mean)")
    for label, res in (("aligned (run A)", res_a), ("aligned2 (cold seed 0)", cold[0][0])):
        one, uni = uniform_at(res, 1.0), best_uniform(res)
        print(f"{label}: alpha = 1 reward {fmt(one and one.reward, '.4f')}, tax "
              f"{fmt(one and one.tax, '.4f')}; best feasible uniform alpha "
              f"{uni.uniform_ratio if uni else '-'} (reward {fmt(uni and uni.reward, '.4f')}, "
              f"tax {fmt(uni and uni.tax, '.4f')}); best feasible overall "
              f"{fmt(best_feasible(res.trials), '.4f')}")
    print()
    print(table(["seed", "cold trials needed", "warm trials needed", "cold best", "warm best"],
                rows))
    print(table(["", "cold", "warm"], [
        ["median trials needed", f"{med_c:g}", f"{med_w:g}"],
        ["mean trials needed", f"{mean_c:.1f}", f"{mean_w:.1f}"],
        ["never reached T", f"{sum(n > n_trials for n in cold_n)}/{len(cold_n)}",
         f"{sum(n > n_trials for n in warm_n)}/{len(warm_n)}"],
        ["median best reward", fmt(statistics.median(p["cold_best"] for p in per_seed), ".4f"),
         fmt(statistics.median(p["warm_best"] for p in per_seed), ".4f")],
    ]))
    curves = {arm: [best_so_far(res.trials) for res, _ in runs]
              for arm, runs in (("cold", cold), ("warm", warm))}
    marks = sorted({n for n in (cold_grid, warm_grid + 1, 15, 20, 25, 30, 40, n_trials)
                    if n <= n_trials})

    def mean_at(arm: str, n: int) -> str:
        vals = [c[n - 1] for c in curves[arm] if len(c) >= n and c[n - 1] is not None]
        return f"{statistics.mean(vals):.3f}" if vals else "-"

    print("\nmean best feasible reward so far, by trial number:")
    print(table(["arm"] + [f"@{n}" for n in marks],
                [[arm] + [mean_at(arm, n) for n in marks] for arm in curves]))
    # the same count at looser thresholds: how far along the way a warm start gets early
    sweep = []
    for frac in (0.99, 0.95, 0.9, 0.8):
        t = r_star - (1 - frac) * (r_star - r0)
        hits = {arm: [next((i + 1 for i, v in enumerate(c) if v is not None and v >= t),
                           n_trials + 1) for c in curves[arm]] for arm in curves}
        mc, mw = statistics.median(hits["cold"]), statistics.median(hits["warm"])
        sweep.append([f"{frac:.0%}", f"{t:.3f}", " ".join(map(str, hits["cold"])), mc,
                      " ".join(map(str, hits["warm"])), mw, f"{mw / mc:.2f}"])
    print("\ntrials needed per seed at other thresholds (share of the way from R0 to R*):")
    print(table(["way", "T", "cold", "median", "warm", "median", "warm/cold"], sweep))
    print(f"\nwarm/cold ratio of the median trials needed: {ratio:.2f}; target \"warm start "
          f"needs at most half the trials\" (ratio <= 0.5): {'MET' if met else 'NOT MET'}")
    print(f"total {time.perf_counter() - started:.0f} s (run A {sec_a:.1f} s)")

    def records(res) -> list[dict]:
        return [{"trial": r.number + 1, "kind": r.kind, "ratios": r.ratios, "reward": r.reward,
                 "tax": r.tax, "feasible": r.feasible, "stage": r.stage,
                 "uniform_ratio": r.uniform_ratio} for r in sorted(res.trials,
                                                                    key=lambda r: r.number)]

    write_json(args.json_out, {
        "world": str(world), "aligned2": str(aligned2), "aligned2_made": made,
        "trials": n_trials, "seeds": args.seeds, "budget": world_spec.tax.budget,
        "ratio_convention": "ratio = weight on the aligned model",
        "run_a": {"result": a, "seconds": sec_a},
        "warm_start": {"ratios": warm_ratios, "uniform": warm_uniform, "scales": args.scales,
                       "refine": refine,
                       "grid_cold": cold_grid, "grid_warm": warm_grid},
        "r0": r0, "r_star": r_star, "threshold": threshold,
        "per_seed": per_seed,
        "summary": {"cold_median": med_c, "warm_median": med_w, "cold_mean": mean_c,
                    "warm_mean": mean_w, "ratio_of_medians": ratio, "target_met": met,
                    "cold_never": sum(n > n_trials for n in cold_n),
                    "warm_never": sum(n > n_trials for n in warm_n)},
        "best_so_far": curves,
        "threshold_sweep": [dict(zip(["way", "T", "cold", "cold_median", "warm", "warm_median",
                                      "ratio"], row)) for row in sweep],
        "searches": {"cold": [records(r) for r, _ in cold], "warm": [records(r) for r, _ in warm]},
        "machine": machine_info(),
    })


if __name__ == "__main__":
    main()
