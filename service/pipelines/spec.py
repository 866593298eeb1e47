"""The pipeline spec: what `POST /v1/pipelines` and `hmaopt pipeline create` take."""

from __future__ import annotations

import secrets
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.spec import JobSpec, RefineSteps

#: webhook events a pipeline can send
EVENTS = ("run.started", "run.finished", "run.failed", "run.skipped", "run.promoted")


class Schedule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cron: str = Field(description="five-field cron expression, e.g. '0 2 * * *' (02:00 daily)")
    timezone: str = Field("UTC", description="IANA time zone the cron expression is read in")
    missed: Literal["run_once", "skip"] = Field(
        "run_once", description="a scheduled time that passed while no scheduler ran: run "
        "it once when a scheduler starts (run_once) or record it as skipped (skip)")

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        from croniter import croniter

        value = " ".join(value.split())
        if len(value.split()) != 5 or not croniter.is_valid(value):
            raise ValueError(f"{value!r} is not a valid five-field cron expression "
                             "(minute hour day-of-month month day-of-week), e.g. '0 2 * * *'")
        return value

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}; use an IANA name such as "
                             "'UTC' or 'Europe/Paris'") from None
        return value


class Source(BaseModel):
    """Where a model comes from: the newest complete checkpoint in ``dir``, or ``path``."""

    model_config = ConfigDict(extra="forbid")

    dir: str | None = Field(None, description="folder whose newest complete checkpoint "
                            "(a subfolder) each run takes")
    path: str | None = Field(None, description="one fixed checkpoint")
    marker: str | None = Field(None, description="a file that must exist in a checkpoint "
                               "before it counts as complete (e.g. 'COMPLETE')")
    settle_seconds: float = Field(60, ge=0, description="a checkpoint whose newest file is "
                                  "younger than this is still being written")

    @model_validator(mode="after")
    def _one(self) -> Source:
        if (self.dir is None) == (self.path is None):
            raise ValueError("give exactly one of dir (newest checkpoint in a folder) or path "
                             "(a fixed checkpoint)")
        if self.marker is not None and ("/" in self.marker or self.marker in ("", ".", "..")):
            raise ValueError(f"marker must be a file name, got {self.marker!r}")
        return self


class Promote(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dir: str = Field(description="folder (inside the model roots) of the promoted merges: "
                     "<dir>/<run id>/ each, and the alias <dir>/current")
    margin: float = Field(0.0, ge=0, description="the candidate's reward must beat the "
                          "champion's by more than this")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="the candidate's holdout gain "
                              "over the champion, paired prompt by prompt, must clear the "
                              "margin at this one-sided confidence (its lower bound); a "
                              "holdout tax whose lower bound at it is over the budget keeps "
                              "the run")


class Webhook(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="http(s) URL that receives the events (POST, JSON)")
    events: list[Literal[EVENTS]] = Field(list(EVENTS), min_length=1)  # type: ignore[valid-type]
    secret: str | None = Field(None, description="Standard Webhooks secret ('whsec_' + "
                               "base64); generated when absent; never returned by the API")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value

    @model_validator(mode="after")
    def _secret(self) -> Webhook:
        if self.secret is None:
            self.secret = "whsec_" + _b64(secrets.token_bytes(24))
        else:
            from standardwebhooks.webhooks import Webhook as Signer

            try:
                Signer(self.secret)
            except Exception as exc:
                raise ValueError(f"secret: not a Standard Webhooks secret ({exc})") from None
        return self


class PipelineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "name": "nightly-rlhf",
        "job": {"name": "nightly", "base_model": "models/sft",
                "aligned_model": "models/rlhf/latest",
                "reward": {"type": "reward_model", "model": "models/reward",
                           "prompts": "data/reward_prompts.jsonl"},
                "tax": {"budget": 0.05, "tasks": [
                    {"name": "facts", "type": "multiple_choice", "data": "data/facts_mc.jsonl"}]},
                "search": {"n_trials": 40}},
        "schedule": {"cron": "0 2 * * *", "timezone": "Europe/Paris"},
        "aligned": {"dir": "models/rlhf", "marker": "COMPLETE"},
        "promote": {"dir": "promoted/nightly-rlhf", "margin": 0.01},
        "webhooks": [{"url": "https://ci.example.com/hooks/hmaopt"}]}]})

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    job: JobSpec = Field(description="the job-spec template; each run replaces aligned_model "
                         "(and base_model with a base source) by the checkpoint it picked")
    schedule: Schedule
    aligned: Source
    base: Source | None = Field(None, description="default: the template's base_model")
    promote: Promote
    warm_start: bool = Field(True, description="enqueue the previous run's best ratios "
                             "first (and its best uniform α in the baseline grid)")
    warm_start_scales: list[float] = Field(
        [1.0, 0.95, 0.9], min_length=1, max_length=10,
        description="the previous best ratios are enqueued times each of these (a scale "
        "under 1 moves toward the base model, lowering the tax: the previous best often sits "
        "at the budget, and a new checkpoint may push it over)")
    warm_start_refine: RefineSteps = Field(
        3, description="then up to this many trials more on the previous best's ray (its ratios "
        "times a scale), each where the secant through the scales tried puts the tax at the "
        "budget (search.warm_start_refine)")

    @field_validator("warm_start_scales")
    @classmethod
    def _scales(cls, value: list[float]) -> list[float]:
        if not all(0 < v <= 1 for v in value):
            raise ValueError(f"warm_start_scales must lie in (0, 1], got {value}")
        return value
    webhooks: list[Webhook] = Field([], max_length=10)

    def public(self) -> dict:
        """The spec as the API returns it: webhook secrets left out."""
        out = self.model_dump(mode="json")
        for hook in out["webhooks"]:
            hook.pop("secret", None)
            hook["has_secret"] = True
        return out


class PublicWebhook(BaseModel):
    """A webhook as the API returns it: the secret is stored, never shown."""

    url: str
    events: list[Literal[EVENTS]]  # type: ignore[valid-type]
    has_secret: bool = Field(description="a secret is stored; it signs each delivery")


class PublicPipelineSpec(PipelineSpec):
    """The pipeline spec as the API returns it (``PipelineSpec.public``): a webhook's
    ``secret`` gives way to ``has_secret``. (The OpenAPI's shape of the response.)"""

    webhooks: list[PublicWebhook] = Field([], max_length=10)  # type: ignore[assignment]


def apply_warm_start(job: dict, ratios: dict[str, float], uniform: float | None,
                     scales: list[float], refine: int = 0) -> dict:
    """A job-spec dict warm started from an earlier search's best: ``ratios`` times each of
    ``scales`` run first after the uniform baseline (``search.warm_start``), then up to
    ``refine`` trials on their ray toward the budget (``search.warm_start_refine``); the
    earlier best uniform α joins a grid baseline when missing (a bisection baseline finds
    the new one by itself)."""
    job = {**job, "search": dict(job.get("search") or {})}
    search = job["search"]
    vectors = []
    for scale in scales:
        v = {k: round(a * scale, 6) for k, a in ratios.items()}
        if v not in vectors:
            vectors.append(v)
    search["warm_start"] = vectors + (search.get("warm_start") or [])
    search["warm_start_refine"] = refine
    spec = JobSpec.model_validate(job)
    if uniform is not None and spec.baseline_mode() == "grid":  # bisection finds its own
        grid = spec.uniform_grid()
        if uniform not in grid:
            search["uniform_grid"] = sorted(grid + [uniform])
    return job


def _b64(raw: bytes) -> str:
    import base64

    return base64.b64encode(raw).decode()
