from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings


def test_environment_names(monkeypatch, tmp_path):
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:pw@db/hmaopt")
    monkeypatch.setenv("REDIS_URL", "redis://q:6379/0")
    monkeypatch.setenv("HMAOPT_MODEL_ROOTS", f"{tmp_path}/a:{tmp_path}/b")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HMAOPT_DATA_ROOTS", "rel")
    s = Settings()
    assert s.database() == "postgresql+psycopg://u:pw@db/hmaopt"
    assert s.redis_url == "redis://q:6379/0"
    assert s.model_roots == [tmp_path / "a", tmp_path / "b"]
    assert s.data_roots == [(tmp_path / "rel").resolve()]  # roots are absolute


def test_embedded_default(monkeypatch, tmp_path):
    for name in ("DATABASE_URL", "REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    s = Settings(home=tmp_path)
    assert s.embedded_database and s.database() == f"sqlite:///{tmp_path / 'hmaopt.db'}"
    assert s.model_roots == [Path.cwd().resolve()]


def test_invalid_settings_are_refused():
    with pytest.raises(ValidationError, match="log_level"):
        Settings(log_level="LOUD")
    with pytest.raises(ValidationError, match="at least twice heartbeat_seconds"):
        Settings(heartbeat_seconds=10, worker_stale_seconds=15)
