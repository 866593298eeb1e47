"""What a search found: trial records read back from the study, the best and Pareto rules,
and the result written by ``hmaopt search --json`` and stored with the job.

Nothing here touches Optuna beyond reading a finished trial's user attributes, so the rules
(:func:`best_of`, :func:`pareto_of`) are plain functions of records.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from service._version import __version__
from service.status import TrialStatus

RATIO_CONVENTION = "ratio = weight on the aligned model"


@dataclass
class TrialRecord:
    """One finished (complete or pruned) trial, as the search's user attributes hold it."""

    number: int
    kind: str
    ratios: list[float]
    reward: float | None
    tax: float
    feasible: bool
    stage: int
    metrics: dict[str, float]
    merge_seconds: float
    eval_seconds: float
    uniform_ratio: float | None = None
    task_tax: dict[str, float] = field(default_factory=dict)
    reward_se: float | None = None
    tax_se: float | None = None
    n_reward: int = 0
    n_tax: int = 0

    @classmethod
    def from_attrs(cls, number: int, a: dict) -> TrialRecord | None:
        """The record of a trial's user attributes; None for a trial without figures."""
        if "tax" not in a or "ratios" not in a:
            return None
        return cls(number, a.get("kind", "search"), list(a["ratios"].values()), a.get("reward"),
                   a["tax"], bool(a.get("feasible")), int(a.get("stage", 2)),
                   a.get("metrics", {}), float(a.get("merge_seconds", 0.0)),
                   float(a.get("eval_seconds", 0.0)), a.get("uniform_ratio"),
                   a.get("task_tax", {}), a.get("reward_se"), a.get("tax_se"),
                   int(a.get("n_reward", 0)), int(a.get("n_tax", 0)))

    def brief(self, slots: Sequence[str]) -> dict:
        return {"trial": self.number, "kind": self.kind,
                "ratios": dict(zip(slots, self.ratios)), "reward": self.reward, "tax": self.tax,
                "reward_se": self.reward_se, "tax_se": self.tax_se, "n_reward": self.n_reward,
                "n_tax": self.n_tax, "metrics": self.metrics}

    def row(self, slots: Sequence[str]) -> dict:
        """The hmaopt_trials columns of this record (JSON-safe)."""
        status = TrialStatus.PRUNED if self.stage == 1 else TrialStatus.COMPLETE
        return jsonable({
            "number": self.number, "kind": self.kind, "state": status.value,
            "ratios": dict(zip(slots, self.ratios)), "reward": self.reward, "tax": self.tax,
            "feasible": self.feasible, "stage": self.stage, "metrics": self.metrics,
            "task_tax": self.task_tax, "uniform_ratio": self.uniform_ratio,
            "merge_seconds": self.merge_seconds, "eval_seconds": self.eval_seconds,
            "reward_se": self.reward_se, "tax_se": self.tax_se, "n_reward": self.n_reward,
            "n_tax": self.n_tax})


def best_of(records: Iterable[TrialRecord], kind: str | None = None) -> TrialRecord | None:
    """The feasible record of highest reward (of ``kind`` only when given); ties go to the
    lower tax, then the earlier trial."""
    feasible = [r for r in records if r.feasible and r.reward is not None
                and (kind is None or r.kind == kind)]
    return max(feasible, key=lambda r: (r.reward, -r.tax, -r.number), default=None)


def pareto_of(records: Iterable[TrialRecord]) -> list[TrialRecord]:
    """Feasible records not dominated in (higher reward, lower tax), by tax."""
    pts = [r for r in records if r.feasible and r.reward is not None]
    front = [r for r in pts if not any(
        (o.reward >= r.reward and o.tax <= r.tax) and (o.reward > r.reward or o.tax < r.tax)
        for o in pts)]
    return sorted(front, key=lambda r: r.tax)


def summary(records: Sequence[TrialRecord], *, base_seconds: float,
            total_seconds: float) -> tuple[dict[str, int], dict[str, float]]:
    """(counts, seconds) of a search's records: how many finished, complete, pruned, uniform;
    the wall time and the mean merge and evaluation time per trial."""
    n = len(records)
    counts = {"finished": n, "complete": sum(r.stage == 2 for r in records),
              "pruned": sum(r.stage == 1 for r in records),
              "uniform": sum(r.kind == "uniform" for r in records)}
    merge = sum(r.merge_seconds for r in records)
    evaluation = sum(r.eval_seconds for r in records)
    seconds = {"total": total_seconds, "base": base_seconds,
               "per_trial": (merge + evaluation) / n if n else math.nan,
               "merge_per_trial": merge / n if n else math.nan,
               "eval_per_trial": evaluation / n if n else math.nan}
    return counts, seconds


@dataclass
class SearchResult:
    """What a search found; :meth:`to_dict` is the JSON written by ``hmaopt search --json``
    (and stored as the job's result). ``best`` is the answer chosen on the validation data
    (workers/answer.py), not necessarily the trial of highest search reward."""

    study: str
    storage: str | None
    mode: str
    budget: float
    slots: list[str]
    best: TrialRecord | None
    uniform: TrialRecord | None
    best_holdout: dict | None
    uniform_holdout: dict | None
    pareto: list[TrialRecord]
    counts: dict[str, int]
    seconds: dict[str, float]
    base_cached: bool
    trials: list[TrialRecord] = field(default_factory=list, repr=False)
    best_validation: dict | None = None
    uniform_validation: dict | None = None
    gain_interval: object | None = None  # service.stats.Interval
    holdout_gain_interval: object | None = None
    chosen_by: str = "search"
    finalists: list[dict] = field(default_factory=list)
    flags: list[dict] = field(default_factory=list)
    per_record: dict = field(default_factory=dict, repr=False)
    gradient: dict | None = None  # the gradient stage's result and cost, when it ran

    @property
    def feasible(self) -> bool:
        return self.best is not None

    @property
    def gain(self) -> float | None:
        if self.best is None or self.uniform is None:
            return None
        return self.best.reward - self.uniform.reward

    @property
    def holdout_gain(self) -> float | None:
        if self.best_holdout is None or self.uniform_holdout is None:
            return None
        return self.best_holdout["reward"] - self.uniform_holdout["reward"]

    def to_dict(self, *, per_record: bool = False) -> dict:
        """The result as JSON; ``per_record`` adds the holdout reward per prompt of the
        best and the best uniform merge (the pipelines compare champions with them)."""
        best = self.best.brief(self.slots) if self.best else None
        if best is not None:
            best["validation"] = self.best_validation
            best["holdout"] = self.best_holdout
            best["chosen_by"] = self.chosen_by
        uniform = None
        if self.uniform is not None:
            u = self.uniform
            uniform = {"trial": u.number, "ratio": u.uniform_ratio, "reward": u.reward,
                       "tax": u.tax, "reward_se": u.reward_se, "tax_se": u.tax_se,
                       "n_reward": u.n_reward, "n_tax": u.n_tax, "metrics": u.metrics,
                       "validation": self.uniform_validation, "holdout": self.uniform_holdout}
        out = {
            "study": self.study, "storage": self.storage, "mode": self.mode,
            "budget": self.budget, "ratio_convention": RATIO_CONVENTION,
            "slots": self.slots, "feasible": self.feasible, "best": best,
            "best_uniform": uniform, "gain": self.gain,
            "gain_ci95": _interval(self.gain_interval), "holdout_gain": self.holdout_gain,
            "holdout_gain_ci95": _interval(self.holdout_gain_interval),
            "n_gain": getattr(self.gain_interval, "n", None),
            "n_holdout_gain": getattr(self.holdout_gain_interval, "n", None),
            "finalists": self.finalists, "flags": self.flags,
            "found_by": self.best.kind if self.best else None,
            "stages": stages(self.trials), "gradient": self.gradient,
            "pareto": [t.brief(self.slots) for t in self.pareto],
            "trials": self.counts, "seconds": self.seconds, "base_cached": self.base_cached,
            "version": __version__,
        }
        if per_record:
            out["per_record"] = self.per_record
        return out


def stages(records: Sequence[TrialRecord]) -> dict[str, dict]:
    """Per stage (trial kind: uniform, warm, gradient, search): evaluations spent (trials,
    complete and pruned), and its best feasible reward."""
    out: dict[str, dict] = {}
    for r in records:
        s = out.setdefault(r.kind, {"evaluations": 0, "pruned": 0, "best_reward": None})
        s["evaluations"] += 1
        s["pruned"] += r.stage == 1
        if r.feasible and r.reward is not None and (s["best_reward"] is None
                                                    or r.reward > s["best_reward"]):
            s["best_reward"] = r.reward
    return out


def _interval(iv) -> list[float] | None:
    return None if iv is None else iv.to_list()


def jsonable(value):
    """NaN/inf -> None, for JSON and Optuna's storage."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value
