"""Figures a team can trust: do held-out gains and their intervals hold on fresh data?

On the reference world, SEEDS seeds x TRIALS trials of the default search (tpe). Per seed:

- the search gain of the answer over the best uniform ratio (paired, search data);
- the holdout gain with its 95 % interval (the answer's own figures: workers/answer.py);
- the gain of the same two merges on a fresh test set that no part of the job saw (the
  world's data/fresh/ prompts), paired prompt by prompt; whether the holdout interval
  covers it;
- the winner's curse: how far the winner's search reward overstates its holdout reward, in
  units of its standard error, for the answer chosen on the validation data ("after") and
  for the trial of highest search reward, the rule before ("before"), on the same search;
- the same curse on the gain ("gain curse"): (search gain - holdout gain) over the search
  gain's SE, both paired with the best uniform ratio on the same prompts. The split of the
  data is the same in every seed, so a harder search part than holdout part shifts every
  merge's reward alike: the reward curse carries that offset, the gain curse cancels it.
  A merge equal to the uniform ratio has a gain curse of 0.
- why the answer won: each finalist's search and validation reward and its pooled tax
  (search + validation records, the rule of workers/answer.py), and, for the sampler's
  finalists the answer beat, whether they lost on the validation reward or failed the
  pooled tax test (kept in the JSON per seed; counted in the summary).

    python bench/bench_uncertainty.py [--world DIR] [--seeds 10] [--trials 40]
        [--sampler tpe] [--json FILE]

Targets (issue 15): holdout gain positive in 10/10 seeds, its interval excludes 0 in >= 8/10,
the interval covers the fresh-test gain in >= 8/10, the curse under one SE on average.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import get_args

from _common import machine_info, table, world_job, write_json  # bench/ is the script's folder

from service.spec import SamplerName


def why_lost(finalists: list[dict], winner: int) -> dict:
    """How the sampler's finalists (not uniform ratios) other than the answer lost: on the
    pooled tax test (``over_budget``) or, feasible, on the validation reward."""
    lost = [f for f in finalists if f["kind"] != "uniform" and f["trial"] != winner]
    over = sum(not f["validation_feasible"] for f in lost)
    return {"lower_validation_reward": len(lost) - over, "over_budget": over}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", default=None, help="reference world folder (default: the cache)")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--sampler", default=None, choices=list(get_args(SamplerName)),
                    help="override the spec's search.sampler")
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args()

    from service.stats import paired_interval
    from workers.evaluate.job import JobEvaluator
    from workers.results import best_of
    from workers.search import Search

    world, spec, merger, ev = world_job(args.world)
    fresh_prompts = world / "data" / "fresh" / Path(spec.reward.prompts).name
    if not fresh_prompts.is_file():
        raise SystemExit(f"{fresh_prompts} is missing: rebuild the world (hmaopt world build)")
    fresh_spec = spec.model_copy(deep=True)
    fresh_spec.reward.prompts = str(fresh_prompts)
    fresh_spec.search.holdout_fraction = fresh_spec.search.validation_fraction = 0.0
    fresh = JobEvaluator(fresh_spec, merger.model, ev.tokenizer, reward_model=ev.reward_model,
                         reward_tokenizer=ev.reward_tokenizer)

    def fresh_rewards(ratios) -> list[float]:
        merger.apply(ratios)
        values, _ = fresh.reward_records("search")
        return values

    def rewards(ratios, part: str) -> list[float]:
        merger.apply(ratios)
        values, _ = ev.reward_records(part)
        return values

    def gain_curse(record, uniform) -> float:
        """(search gain - holdout gain) / the search gain's SE, paired with ``uniform``."""
        if list(record.ratios) == list(uniform.ratios):
            return 0.0
        search = paired_interval(rewards(record.ratios, "search"),
                                 rewards(uniform.ratios, "search"))
        holdout = paired_interval(rewards(record.ratios, "holdout"),
                                  rewards(uniform.ratios, "holdout"))
        return (search.mean - holdout.mean) / search.se if search.se else 0.0

    rows, per_seed = [], []
    started = time.perf_counter()
    for seed in range(args.seeds):
        s = spec.model_copy(deep=True)
        s.search.seed, s.search.n_trials = seed, args.trials
        if args.sampler:
            s.search.sampler = args.sampler
        search = Search(s, merger, ev, name=f"uncertainty-{seed}")
        search.run()
        result = search.result(base_cached=True, base_seconds=0.0, total_seconds=0.0)
        best, uniform = result.best, result.uniform
        if best is None or uniform is None or result.holdout_gain_interval is None:
            raise SystemExit(f"seed {seed}: no feasible answer or no holdout: {result.flags}")
        hg = result.holdout_gain_interval
        fg = paired_interval(fresh_rewards(best.ratios), fresh_rewards(uniform.ratios))
        lucky = best_of(result.trials)  # the rule before: the best search trial
        lucky_holdout = search.measure_holdout(lucky)
        after = (best.reward - result.best_holdout["reward"]) / best.reward_se
        before = (lucky.reward - lucky_holdout["reward"]) / lucky.reward_se
        covered = hg.lo <= fg.mean <= hg.hi
        gain_after, gain_before = gain_curse(best, uniform), gain_curse(lucky, uniform)
        why = why_lost(result.finalists, best.number)
        per_seed.append({
            "seed": seed, "winner": best.number, "lucky": lucky.number,
            "search_gain": result.gain, "gain_ci95": result.gain_interval.to_list(),
            "holdout_gain": hg.mean, "holdout_gain_ci95": hg.to_list(), "n_holdout": hg.n,
            "fresh_gain": fg.mean, "fresh_gain_ci95": fg.to_list(), "n_fresh": fg.n,
            "covered": covered, "curse_after_se": after, "curse_before_se": before,
            "gain_curse_after_se": gain_after, "gain_curse_before_se": gain_before,
            "best_search_reward": best.reward, "best_holdout_reward": result.best_holdout["reward"],
            "best_reward_se": best.reward_se, "best_tax": best.tax,
            "best_holdout_tax": result.best_holdout["tax"], "flags": result.flags,
            "answer_kind": best.kind, "finalists": result.finalists, "finalists_lost": why,
            "uniform": uniform.number, "uniform_ratio": uniform.ratios[0]})
        rows.append([seed, best.number, f"{result.gain:+.3f}",
                     f"{hg.mean:+.3f} [{hg.lo:+.3f}, {hg.hi:+.3f}]",
                     f"{fg.mean:+.3f} [{fg.lo:+.3f}, {fg.hi:+.3f}]", "yes" if covered else "no",
                     f"{before:+.2f}", f"{after:+.2f}", f"{gain_before:+.2f}",
                     f"{gain_after:+.2f}", best.kind,
                     f"{why['lower_validation_reward']}/{why['over_budget']}"])
        print(f"seed {seed}: holdout gain {hg.mean:+.3f} [{hg.lo:+.3f}, {hg.hi:+.3f}], fresh "
              f"{fg.mean:+.3f}, curse before {before:+.2f} SE after {after:+.2f} SE, gain curse "
              f"before {gain_before:+.2f} after {gain_after:+.2f}", flush=True)
    n = len(per_seed)
    summary = {
        "seeds": n, "trials": args.trials, "sampler": args.sampler or spec.search.sampler,
        "holdout_gain_positive": sum(p["holdout_gain"] > 0 for p in per_seed),
        "holdout_ci_excludes_zero": sum(p["holdout_gain_ci95"][0] > 0 or p["holdout_gain_ci95"][1] < 0
                                        for p in per_seed),
        "ci_covers_fresh": sum(p["covered"] for p in per_seed),
        "curse_before_mean_se": statistics.mean(p["curse_before_se"] for p in per_seed),
        "curse_after_mean_se": statistics.mean(p["curse_after_se"] for p in per_seed),
        "curse_before_sd_se": statistics.stdev(p["curse_before_se"] for p in per_seed) if n > 1 else None,
        "curse_after_sd_se": statistics.stdev(p["curse_after_se"] for p in per_seed) if n > 1 else None,
        "gain_curse_before_mean_se": statistics.mean(p["gain_curse_before_se"] for p in per_seed),
        "gain_curse_after_mean_se": statistics.mean(p["gain_curse_after_se"] for p in per_seed),
        "holdout_gain_mean": statistics.mean(p["holdout_gain"] for p in per_seed),
        "holdout_gain_sd": statistics.stdev(p["holdout_gain"] for p in per_seed) if n > 1 else None,
        "fresh_gain_mean": statistics.mean(p["fresh_gain"] for p in per_seed),
        "seconds": round(time.perf_counter() - started, 1),
        "n_reward": {part: len(ev.reward_sets.get(part, [])) for part in
                     ("search", "validation", "holdout")},
        "n_fresh": per_seed[0]["n_fresh"],
        "answer_uniform": sum(p["answer_kind"] == "uniform" for p in per_seed),
        "finalists_lost_on_reward": sum(p["finalists_lost"]["lower_validation_reward"]
                                        for p in per_seed),
        "finalists_lost_on_tax": sum(p["finalists_lost"]["over_budget"] for p in per_seed),
    }
    print(table(["seed", "answer", "search gain", "holdout gain [95 %]", "fresh gain [95 %]",
                 "covers", "curse before", "curse after", "gain curse before",
                 "gain curse after", "answer kind", "finalists lost: reward/tax"], rows))
    print(f"holdout gain > 0: {summary['holdout_gain_positive']}/{n}; interval excludes 0: "
          f"{summary['holdout_ci_excludes_zero']}/{n}; covers the fresh gain: "
          f"{summary['ci_covers_fresh']}/{n}; winner's curse (search - holdout reward, in "
          f"SE): before {summary['curse_before_mean_se']:+.2f} (sd "
          f"{summary['curse_before_sd_se'] or 0:.2f}), after "
          f"{summary['curse_after_mean_se']:+.2f} (sd {summary['curse_after_sd_se'] or 0:.2f}); "
          f"gain curse: before {summary['gain_curse_before_mean_se']:+.2f}, after "
          f"{summary['gain_curse_after_mean_se']:+.2f}; answer is a uniform ratio in "
          f"{summary['answer_uniform']}/{n}; the sampler's finalists the answer beat lost on the "
          f"validation reward {summary['finalists_lost_on_reward']} times and on the pooled tax "
          f"{summary['finalists_lost_on_tax']} times")
    write_json(args.json_out, {"machine": machine_info(), "summary": summary,
                               "per_seed": per_seed})


if __name__ == "__main__":
    main()
