"""Settings: the only reader of the environment (variables prefixed ``HMAOPT_``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Default maximum size of one exported safetensors shard, in bytes (5 GB, as Hugging Face).
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3


class Settings(BaseSettings):
    """Process-wide settings, validated once at start-up."""

    model_config = SettingsConfigDict(env_prefix="HMAOPT_", extra="ignore")

    allow_pickle: bool = Field(
        False,
        description="Admin setting: allow pickle (.bin/.pt) checkpoints. Pickle can run code "
        "on load; leave off unless every checkpoint is trusted.",
    )
    trust_remote_code: bool = Field(
        False, description="Admin setting: allow models whose code lives in the checkpoint."
    )
    max_shard_bytes: int = Field(
        DEFAULT_MAX_SHARD_BYTES, gt=0, description="Maximum bytes per exported shard."
    )
    cache_dir: Path = Field(
        Path.home() / ".cache" / "hmaopt",
        description="Cache folder: θ_base figures per checkpoint and data, the reference world.",
    )
    log_level: str = Field("WARNING", description="Logging level of the hmaopt entry points.")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings (read from the environment on first use)."""
    return Settings()
