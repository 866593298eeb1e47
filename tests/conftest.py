from __future__ import annotations

import os

# No model hub anywhere: everything is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path

import pytest

from tests.models import make_pair


@pytest.fixture(scope="session")
def llama_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny untied Llama base/aligned pair (4 layers), built once per session."""
    return make_pair(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def gemma_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Gemma pair: tied input/output embeddings."""
    return make_pair(tmp_path_factory.mktemp("gemma"), "gemma")


@pytest.fixture(scope="session")
def world() -> Path:
    """The reference world, built once per machine (5–9 minutes) and cached.

    Cached in ``HMAOPT_CACHE_DIR/world`` (default ``~/.cache/hmaopt/world``); a world of an
    older recipe version is rebuilt.
    """
    from service.settings import Settings
    from workers.world import ensure_world

    return ensure_world(Settings().cache_dir / "world")
