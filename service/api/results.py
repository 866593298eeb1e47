"""The shapes of the JSON a job stores, for the OpenAPI: its result (``SearchResult.to_dict``
in workers/results.py, the measurements of workers/answer.py's ``part_dict``) and its layout
(``Grouping.describe`` in workers/grouping.py).

The API passes the stored JSON through as it is (an old row is never refused for a field
added since); these models only describe it (see :class:`SchemaOf`), and a test checks that
a real job's result and layout validate against them with no field left out. Figures that
were NaN or infinite are stored as null. Ratios: the weight on the ALIGNED model,
merged = base + ratio * (aligned - base).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.spec import GroupSpec

RATIOS = "ratio per group slot (the weight on the ALIGNED model; 0 = base, 1 = aligned)"


class SchemaOf:
    """``Annotated`` metadata: the value stays the JSON it is (a dict), the OpenAPI shows
    ``model``'s schema (e.g. ``Annotated[dict, SchemaOf(JobSpec)]``)."""

    def __init__(self, model: type[BaseModel]) -> None:
        self.model = model

    def __get_pydantic_json_schema__(self, core_schema, handler):
        schema = self.model.__pydantic_core_schema__
        if schema.get("ref"):  # as a definition, so that the OpenAPI names it (a $ref)
            schema = {"type": "definitions", "definitions": [schema],
                      "schema": {"type": "definition-ref", "schema_ref": schema["ref"]}}
        return handler(schema)


class _Stored(BaseModel):
    model_config = ConfigDict(extra="allow")


class PartFigures(_Stored):
    """One merge measured on the validation or the holdout records."""

    reward: float | None
    reward_se: float | None = None
    tax: float | None
    tax_se: float | None = None
    n_reward: int | None = None
    n_tax: int | None = None
    held_out: bool = Field(True, description="false: some figures are from the search data "
                           "(sets that cannot be split, such as lm-eval tasks)")
    from_search_data: list[str] = Field([], description="the sets whose figures here are "
                                        "their search data: tax task names, `reward`")
    feasible: bool = Field(description="tax (its upper bound at tax.confidence) <= budget; "
                           "on the validation records: the pooled tax's")
    pooled_tax: float | None = Field(None, description="validation only: the tax on the "
                                     "search and validation records together")
    pooled_tax_se: float | None = None
    metrics: dict[str, float | None] = {}


class TrialBrief(_Stored):
    trial: int
    kind: str = Field(description="uniform, warm, gradient, search or walk")
    ratios: dict[str, float] = Field(description=RATIOS)
    reward: float | None
    tax: float | None
    reward_se: float | None = None
    tax_se: float | None = None
    n_reward: int | None = None
    n_tax: int | None = None
    metrics: dict[str, float | None] = {}


class ChosenTrial(TrialBrief):
    """The answer: search figures, and the validation and holdout measurements."""

    validation: PartFigures | None = None
    holdout: PartFigures | None = None
    chosen_by: str = Field("search", description="validation (the finalists re-measured on "
                           "records the sampler never saw) or search")


class UniformBest(_Stored):
    """The best feasible uniform ratio (vanilla averaging) at the same budget."""

    trial: int
    ratio: float | None
    reward: float | None
    tax: float | None
    reward_se: float | None = None
    tax_se: float | None = None
    n_reward: int | None = None
    n_tax: int | None = None
    metrics: dict[str, float | None] = {}
    validation: PartFigures | None = None
    holdout: PartFigures | None = None


class Finalist(_Stored):
    trial: int
    kind: str
    search_reward: float | None
    search_tax: float | None
    validation_reward: float | None
    validation_tax: float | None
    pooled_tax: float | None = Field(None, description="the tax on the search and validation "
                                     "records together, which decides feasibility")
    validation_feasible: bool = Field(description="within the budget on the pooled tax")


class StageStats(_Stored):
    evaluations: int = Field(description="trials the stage ran, complete and pruned")
    pruned: int
    best_reward: float | None = Field(description="its best feasible reward")


class GradientStage(_Stored):
    """The gradient stage's learned ratios and cost (strategy gradient or hybrid)."""

    ratios: list[float] = Field(description=RATIOS + ", in slot order")
    seconds: float | None
    steps: int | None
    responses: int | None = None
    eval_equivalents: float | None = Field(None, description="its seconds over one trial's")
    target_uniform_ratio: float | None = None
    final_loss: float | None = None


class Flag(BaseModel):
    """A reason not to trust a result as it stands (e.g. ``holdout_over_budget``)."""

    code: str = Field(description="holdout_over_budget | holdout_gain_negative | "
                      "holdout_gain_not_significant | not_held_out | validation_over_budget | "
                      "uniform_over_budget | no_holdout")
    message: str


class JobResult(_Stored):
    """The final result of a job, as ``hmaopt search --json`` prints it (the per-record
    figures left out)."""

    study: str
    storage: str | None = None
    mode: str = Field(description="constrained or pareto")
    budget: float
    ratio_convention: str
    slots: list[str] = Field(description="the ratio slots, in order")
    feasible: bool = Field(description="a merge within the budget was found")
    best: ChosenTrial | None
    best_uniform: UniformBest | None
    gain: float | None = Field(description="best reward minus the best uniform ratio's "
                               "(search data)")
    gain_ci95: list[float | None] | None = None
    holdout_gain: float | None = None
    holdout_gain_ci95: list[float | None] | None = None
    n_gain: int | None = None
    n_holdout_gain: int | None = None
    finalists: list[Finalist] = []
    flags: list[Flag] = []
    found_by: str | None = Field(None, description="the stage (trial kind) of the answer")
    stages: dict[str, StageStats] = Field({}, description="per stage (trial kind)")
    gradient: GradientStage | None = None
    pareto: list[TrialBrief] = Field([], description="feasible trials not dominated in "
                                     "(higher reward, lower tax), by tax")
    trials: dict[str, int] = Field(description="finished, complete, pruned, uniform")
    seconds: dict[str, float | None] = Field(description="total, base, per_trial, "
                                             "merge_per_trial, eval_per_trial")
    base_cached: bool = Field(description="θ_base's figures came from the cache")
    version: str = Field(description="the hmaopt version that wrote it")


class LayoutGroup(_Stored):
    name: str
    layers: list[int] = Field(description="decoder layer indices of the group")


class Layout(_Stored):
    """The grouping of the job's model: decoder layers per group and the ratio slots."""

    scheme: str
    spec: GroupSpec
    num_layers: int
    groups: list[LayoutGroup]
    slots: list[str]
    non_layer_rule: str = Field(description="how tensors outside the decoder layers are "
                                "merged (groups.non_layer)")
    tied_embeddings: bool


def described(model: type[BaseModel]) -> Any:
    """``Annotated[dict[str, Any], SchemaOf(model)]``: stored JSON documented as ``model``."""
    from typing import Annotated

    return Annotated[dict[str, Any], SchemaOf(model)]
