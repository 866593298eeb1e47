"""Job-spec schemas shared by the CLI, the REST API and the workers.

Ratio convention, everywhere in hmaopt: a ratio is the weight on the ALIGNED model,
``merged = base + ratio * (aligned - base)`` (``torch.lerp(base, aligned, ratio)``);
ratio 0 is the base (pre-RLHF) model, ratio 1 the aligned (post-RLHF) one.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.errors import SpecError

Scheme = Literal["uniform", "blocks", "layers", "custom"]
NonLayerRule = Literal["nearest", "mean", "base", "aligned", "own"]

#: The paper's default number of blocks for ``scheme: blocks``.
DEFAULT_BLOCKS = 3


class GroupSpec(BaseModel):
    """How decoder layers are grouped; each group gets one ratio (two with ``split_attn_mlp``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    scheme: Scheme = Field("blocks", description="uniform | blocks | layers | custom")
    k: int | None = Field(
        None, ge=1, description="Number of contiguous blocks (scheme blocks; default 3)."
    )
    boundaries: tuple[int, ...] | None = Field(
        None,
        description="scheme custom: the first decoder layer of every group after the first, "
        "strictly increasing, e.g. [8, 17] splits 26 layers into 0-7, 8-16, 17-25.",
    )
    split_attn_mlp: bool = Field(
        False,
        description="Give the attention and the MLP tensors of each group a ratio of their own.",
    )
    non_layer: NonLayerRule = Field(
        "nearest",
        description="Ratio of tensors outside the decoder layers: nearest (embeddings with the "
        "first group, final norm and head with the last), mean (mean of the ratios), base (0), "
        "aligned (1), own (one extra ratio, last in the vector).",
    )

    @model_validator(mode="after")
    def _check_scheme_fields(self) -> GroupSpec:
        if self.scheme == "blocks":
            if self.boundaries is not None:
                raise ValueError("boundaries is only for scheme custom")
        elif self.scheme == "custom":
            if not self.boundaries:
                raise ValueError("scheme custom needs boundaries, e.g. [8, 17]")
            if self.k is not None:
                raise ValueError("k is only for scheme blocks")
            if any(b <= a for a, b in zip(self.boundaries, self.boundaries[1:])):
                raise ValueError(f"boundaries must be strictly increasing, got {list(self.boundaries)}")
            if self.boundaries[0] <= 0:
                raise ValueError("boundaries must be > 0 (group 0 always starts at layer 0)")
        elif self.k is not None or self.boundaries is not None:
            raise ValueError(f"scheme {self.scheme} takes neither k nor boundaries")
        return self

    @property
    def blocks(self) -> int:
        return self.k if self.k is not None else DEFAULT_BLOCKS

    def describe(self) -> str:
        """Short text form, the inverse of :func:`parse_groups_arg`."""
        if self.scheme == "blocks":
            return f"blocks:{self.blocks}"
        if self.scheme == "custom":
            return "custom:" + ",".join(map(str, self.boundaries or ()))
        return self.scheme

    @classmethod
    def parse_arg(
        cls, text: str, *, split_attn_mlp: bool = False, non_layer: NonLayerRule = "nearest"
    ) -> GroupSpec:
        """Parse the CLI form: ``uniform``, ``layers``, ``blocks[:K]``, ``custom:B1,B2,...``."""
        scheme, _, arg = text.strip().partition(":")
        fields: dict[str, object] = {
            "scheme": scheme,
            "split_attn_mlp": split_attn_mlp,
            "non_layer": non_layer,
        }
        try:
            if scheme == "blocks" and arg:
                fields["k"] = int(arg)
            elif scheme == "custom":
                fields["boundaries"] = tuple(int(b) for b in arg.split(",") if b.strip())
            elif arg:
                raise SpecError(f"scheme {scheme!r} takes no ':' argument", field="groups")
        except ValueError as exc:
            raise SpecError(
                f"cannot read {text!r}: use uniform, layers, blocks:K or custom:B1,B2,...",
                field="groups",
            ) from exc
        try:
            return cls(**fields)
        except ValidationError as exc:
            raise spec_error_from_validation(exc, prefix="groups") from exc


def spec_error_from_validation(exc: ValidationError, *, prefix: str = "") -> SpecError:
    """Turn a pydantic ValidationError into a SpecError naming the first offending field."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    field = ".".join(p for p in (prefix, loc) if p) or None
    msg = err.get("msg", str(exc)).removeprefix("Value error, ")
    if "input" in err and err.get("type") in ("literal_error", "enum"):
        msg = f"{msg} (got {err['input']!r})"
    return SpecError(msg, field=field)


# --------------------------------------------------------------------------- job spec

RewardType = Literal["reward_model", "preference", "python"]
TaxType = Literal["multiple_choice", "exact_match", "perplexity", "lm_eval"]
SamplerName = Literal["tpe", "gp", "cmaes", "nsga2", "random", "local"]


class RewardSpec(BaseModel):
    """How the alignment reward of a merged model is measured (higher is better)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: RewardType
    model: str | None = Field(None, description="reward_model: sequence-classification model folder")
    prompts: str | None = Field(None, description="reward_model: JSONL of {prompt}")
    data: str | None = Field(None, description="preference: JSONL of {prompt, chosen, rejected}")
    function: str | None = Field(None, description="python: 'module:function'")
    max_new_tokens: int = Field(32, ge=1, le=4096)
    batch_size: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _needs(self) -> RewardSpec:
        need = {"reward_model": ("model", "prompts"), "preference": ("data",), "python": ("function",)}
        for f in need[self.type]:
            if getattr(self, f) is None:
                raise ValueError(f"reward type {self.type} needs {f}")
        if self.type == "python" and ":" not in (self.function or ""):
            raise ValueError("function must be 'module:function'")
        return self


class TaxTask(BaseModel):
    """One ability whose loss counts toward the alignment tax."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    type: TaxType
    data: str = Field(description="JSONL data set; for lm_eval, a local lm-evaluation-harness "
                      "task YAML (its data files local too)")
    weight: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(16, ge=1, le=4096, description="exact_match: tokens generated")
    batch_size: int = Field(16, ge=1)
    metric: str | None = Field(None, description="lm_eval: the metric to use (default: the "
                               "task's first metric, e.g. acc)")
    limit: int | None = Field(None, ge=1, description="lm_eval: evaluate the first N documents only")

    @model_validator(mode="after")
    def _lm_eval_only(self) -> TaxTask:
        if self.type != "lm_eval" and (self.metric is not None or self.limit is not None):
            raise ValueError("metric and limit are only for type lm_eval")
        return self


class TaxSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    budget: float = Field(ge=0, description="largest allowed tax (weighted relative degradation)")
    tasks: list[TaxTask] = Field(min_length=1)
    confidence: float | None = Field(
        None, gt=0.5, lt=1, description="feasible means the one-sided upper bound of the tax "
        "at this confidence (tax + z * tax_se) is within the budget; default: the tax itself")

    @model_validator(mode="after")
    def _unique(self) -> TaxSpec:
        names = [t.name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"task names must be unique, repeated: {', '.join(dupes)}")
        return self


#: trials on the warm-start ray (search.warm_start_refine, and a pipeline's setting of it)
RefineSteps = Annotated[int, Field(ge=0, le=10)]


class SearchSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    sampler: SamplerName = "tpe"
    n_trials: int = Field(48, ge=1, le=100_000, description="trials in all, the uniform "
                          "baseline included")
    seed: int = Field(0, ge=0, lt=2**32, description="the sampler's seed, 0 to 2**32 - 1")
    pruning: bool = Field(True, description="stop a trial after stage 1 when its tax is clearly "
                          "over budget")
    prune_fraction: float = Field(0.3, gt=0, lt=1, description="share of each tax set's search "
                                  "part measured in stage 1")
    prune_margin: float = Field(0.05, ge=0, description="prune when the stage-1 tax exceeds "
                                "budget + prune_margin (beyond its noise: prune_confidence)")
    prune_confidence: float = Field(
        0.95, gt=0.5, lt=1, description="prune only when the stage-1 tax's one-sided lower "
        "bound at this confidence exceeds budget + prune_margin: the stage-1 slices are small "
        "(prune_fraction of each tax set's search part), so their tax alone is noisy")
    holdout_fraction: float = Field(0.3, ge=0, lt=1, description="share of every data set "
                                    "held out: measured only for the answer, never to choose it")
    validation_fraction: float = Field(
        0.2, ge=0, lt=1, description="share of every data set on which the best few "
        "candidates are measured again to choose the answer (records the sampler never saw); "
        "0: the answer is the best trial on the search data")
    finalists: int = Field(3, ge=1, le=20, description="feasible trials of highest search "
                           "reward measured on the validation data (plus the two best "
                           "uniform ratios)")
    pooled_uniform_trials: int = Field(
        3, ge=0, le=6, description="uniform trials the answer stage may add, past n_trials, "
        "to tune vanilla averaging to the budget on the search and validation tax pooled when "
        "no uniform finalist is within it there (the baseline then obeys the answer's own "
        "rule); 0: never")
    workers: int = Field(1, ge=1, le=64, description="service only: workers that share this "
                         "job; n_trials stays the cap over all of them")
    uniform_grid: list[float] | None = Field(
        None, min_length=1,
        description="ratios of the vanilla-averaging baseline on a grid (with baseline: grid; "
        "default 0, 0.1, ..., 1)")
    baseline: Literal["bisection", "grid"] | None = Field(
        None, description="how the uniform baseline is found: bisection (the largest "
        "feasible α by secant steps on the budget, about 5 evaluations) or grid "
        "(uniform_grid); default: grid when uniform_grid is given, with mean_ratio or "
        "ratio_bounds above 0, else bisection")
    strategy: Literal["optuna", "gradient", "hybrid"] = Field(
        "optuna", description="optuna: the sampler's trials; gradient: HMA's own method, "
        "ratios learned by gradient descent on a proxy, then scaled to the budget along "
        "their ray by true evaluations (kind 'gradient'); hybrid: the gradient stage's "
        "trials first, then the sampler's")
    gradient_steps: int = Field(30, ge=1, le=10_000, description="Adam steps of the "
                                "gradient stage")
    gradient_refine: RefineSteps = Field(3, description="trials on the gradient result's ray "
                                         "toward the budget")
    local_sigma: float = Field(0.1, ge=0.005, le=0.5, description="sampler local: the "
                               "first step size around the best feasible trial, as a share "
                               "of the ratio range (then the one-fifth success rule)")
    walk_steps: RefineSteps = Field(0, description="whenever a sampler trial becomes the best "
                                    "feasible one, up to this many trials on its ray toward "
                                    "the budget (kind 'walk'); 0 (default: it did not help "
                                    "in docs/benchmarks.md): none")

    warm_start: list[dict[str, float]] | None = Field(
        None, max_length=100,
        description="ratio vectors by slot (e.g. {\"block0\": 0.4, \"block1\": 0.7}) run right "
                    "after the uniform baseline, before the sampler's own trials: the best of an "
                    "earlier search (nightly pipelines set it); kind 'warm'")
    warm_start_refine: RefineSteps = Field(
        0, description="after the warm_start vectors, up to this many trials more on the "
        "ray of the first one (its ratios times a scale), each at the scale where the tax "
        "meets the budget by the secant through the scales tried (kind 'warm'); ignored with "
        "mean_ratio")

    @model_validator(mode="after")
    def _grid(self) -> SearchSpec:
        if self.holdout_fraction + self.validation_fraction >= 0.9:
            raise ValueError(f"holdout_fraction + validation_fraction must leave at least 10 % "
                             f"for the search, got {self.holdout_fraction} + "
                             f"{self.validation_fraction}")
        if self.uniform_grid is not None and not all(0 <= a <= 1 for a in self.uniform_grid):
            raise ValueError(f"uniform_grid ratios must lie in [0, 1], got {self.uniform_grid}")
        for ratios in self.warm_start or []:
            if not ratios or not all(0 <= a <= 1 for a in ratios.values()):
                raise ValueError(f"warm_start ratios must be a non-empty mapping of slot to a "
                                 f"ratio in [0, 1], got {ratios}")
        return self


class ExportSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    dir: str


class JobSpec(BaseModel):
    """One merge-search job: the CLI file, the REST body and the worker input.

    A ratio is the weight on the ALIGNED model: merged = base + ratio * (aligned - base).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False,
                              json_schema_extra={"examples": [{
        "name": "demo",
        "base_model": "models/base", "aligned_model": "models/aligned",
        "groups": {"scheme": "blocks", "k": 3},
        "reward": {"type": "reward_model", "model": "models/reward",
                   "prompts": "data/reward_prompts.jsonl", "max_new_tokens": 32},
        "tax": {"budget": 0.05, "tasks": [
            {"name": "addition", "type": "exact_match", "data": "data/addition.jsonl"},
            {"name": "facts", "type": "multiple_choice", "data": "data/facts_mc.jsonl"},
            {"name": "text", "type": "perplexity", "data": "data/text.jsonl"}]},
        "search": {"sampler": "tpe", "n_trials": 48, "seed": 0, "pruning": True},
        "mode": "constrained",
        "export": {"dir": "exports/demo-best"}}]})

    name: str = Field(min_length=1, max_length=200)
    base_model: str = Field(description="pre-RLHF checkpoint folder (ratio 0)")
    aligned_model: str = Field(description="post-RLHF checkpoint folder (ratio 1)")
    groups: GroupSpec = GroupSpec()
    ratio_bounds: tuple[float, float] = (0.0, 1.0)
    mean_ratio: float | None = Field(None, description="paper constraint: mean of the ratios")
    reward: RewardSpec
    tax: TaxSpec
    search: SearchSpec = SearchSpec()
    mode: Literal["constrained", "pareto"] = "constrained"
    export: ExportSpec | None = None

    @model_validator(mode="after")
    def _bounds(self) -> JobSpec:
        lo, hi = self.ratio_bounds
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"ratio_bounds must satisfy 0 <= low < high <= 1, got [{lo}, {hi}]")
        if self.mean_ratio is not None and not lo <= self.mean_ratio <= hi:
            raise ValueError(f"mean_ratio {self.mean_ratio} is outside ratio_bounds [{lo}, {hi}]")
        return self

    def baseline_mode(self) -> str:
        """bisection or grid: the spec's ``search.baseline``, else its default."""
        if self.search.baseline is not None:
            return self.search.baseline
        grid = (self.search.uniform_grid is not None or self.mean_ratio is not None
                or self.ratio_bounds[0] > 0)
        return "grid" if grid else "bisection"

    def uniform_grid(self) -> list[float]:
        """The vanilla-averaging baseline's ratios, inside ratio_bounds (only the mean under
        mean_ratio)."""
        if self.mean_ratio is not None:
            return [self.mean_ratio]
        lo, hi = self.ratio_bounds
        grid = self.search.uniform_grid
        points = grid if grid is not None else [i / 10 for i in range(11)]
        return sorted({round(p, 10) for p in points if lo <= p <= hi})

    @model_validator(mode="after")
    def _cross_fields(self) -> JobSpec:
        """Checks across fields, each naming its field: raised as SpecError (not wrapped in
        a ValidationError), so that every JobSpec built is a runnable one."""
        grid = self.uniform_grid()
        if not grid:
            raise SpecError(f"no point of the uniform grid lies within ratio_bounds "
                            f"{list(self.ratio_bounds)}", field="search.uniform_grid")
        if self.baseline_mode() == "bisection" and self.ratio_bounds[0] > 0:
            raise SpecError("baseline bisection starts from the base model (α 0): it needs "
                            "ratio_bounds from 0; use baseline: grid", field="search.baseline")
        if self.search.strategy != "optuna" and self.reward.type == "python":
            raise SpecError("search.strategy gradient and hybrid learn from responses: they "
                            "need a reward_model or preference reward", field="search.strategy")
        if self.baseline_mode() == "grid" and self.search.n_trials <= len(grid):
            raise SpecError(
                f"n_trials ({self.search.n_trials}) must exceed the uniform baseline's "
                f"{len(grid)} points (search.uniform_grid), or the search never runs",
                field="search.n_trials")
        if self.search.sampler in ("cmaes", "local") and self.mode == "pareto":
            raise SpecError(f"{self.search.sampler} optimises one objective: use mode "
                            "constrained, or sampler tpe / nsga2 / random for mode pareto",
                            field="search.sampler")
        return self

    def paths(self) -> dict[str, str]:
        """Every file or folder the job reads, by field name."""
        out = {"base_model": self.base_model, "aligned_model": self.aligned_model}
        for f in ("model", "prompts", "data"):
            if getattr(self.reward, f):
                out[f"reward.{f}"] = getattr(self.reward, f)
        for i, t in enumerate(self.tax.tasks):
            out[f"tax.tasks.{i}.data"] = t.data
        return out

    def with_paths(self, resolve) -> JobSpec:
        """A copy with every input path passed through ``resolve(field, path)``."""
        data = self.model_dump()
        for field, path in self.paths().items():
            node = data
            *parents, leaf = field.split(".")
            for p in parents:
                node = node[int(p)] if p.isdigit() else node[p]
            node[leaf] = resolve(field, path)
        return JobSpec.model_validate(data)


def load_spec(path, *, resolve: bool = True) -> JobSpec:
    """Read a YAML or JSON job spec; relative paths resolve against the spec's folder
    (``resolve=False``: kept as written, e.g. to resolve in a server's roots)."""
    from pathlib import Path

    import yaml

    from service.files import read_mapping

    file = Path(path)
    raw = read_mapping(file, what="job spec", loads=yaml.safe_load, errors=(yaml.YAMLError,),
                       error=SpecError, missing="does not exist", shape="a mapping of job fields")
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise spec_error_from_validation(exc) from exc
    if not resolve:
        return spec
    folder = file.parent.resolve()
    return spec.with_paths(lambda _f, p: str(p if Path(p).is_absolute() else folder / p))
