"""workers/job.py: a worker checks a job again when it loads it, as the API admitted it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from service.admission import admit_job
from service.errors import PathNotAllowedError, PermissionDeniedError
from service.settings import get_settings
from service.spec import JobSpec
from tests.models import make_tiny_job
from workers.job import load_job


@pytest.fixture
def rooted(tmp_path, monkeypatch):
    """A tiny job admitted under model and data roots that the process's settings name."""
    models, data, outside = tmp_path / "models", tmp_path / "data", tmp_path / "outside"
    for folder in (models, data, outside):
        folder.mkdir()
    raw = make_tiny_job(models)
    (models / "data").rename(data / "sets")
    raw = JobSpec.model_validate(raw).with_paths(
        lambda _f, p: p.replace(str(models / "data"), str(data / "sets")))
    monkeypatch.setenv("HMAOPT_MODEL_ROOTS", str(models))
    monkeypatch.setenv("HMAOPT_DATA_ROOTS", str(data))
    get_settings.cache_clear()
    settings = get_settings()
    assert settings.model_roots == [models.resolve()]
    yield admit_job(raw, settings), outside
    get_settings.cache_clear()


def _swap_for_link(file: Path, outside: Path) -> None:
    """Move ``file`` out of the roots and leave a link to it where it was."""
    moved = outside / file.name
    shutil.move(file, moved)
    file.symlink_to(moved)


def test_a_weight_file_swapped_for_a_link_is_refused_at_load(rooted):
    spec, outside = rooted
    _swap_for_link(Path(spec.aligned_model) / "model.safetensors", outside)
    with pytest.raises(PathNotAllowedError, match=r"aligned_model: .*model\.safetensors is a "
                                                   r"link that resolves outside") as info:
        load_job(spec, device="cpu", confine=True)
    assert str(outside) not in str(info.value)  # the message names the entry, not its target
    merger, _ = load_job(spec, device="cpu")  # a local search (CLI) has no roots to keep
    assert merger.grouping.n_ratios == 2


def test_a_data_file_swapped_for_a_link_is_refused_at_load(rooted):
    spec, outside = rooted
    _swap_for_link(Path(spec.tax.tasks[0].data), outside)
    with pytest.raises(PathNotAllowedError, match=r"tax\.tasks\.0\.data: .* resolves outside "
                                                   "the allowed data roots"):
        load_job(spec, device="cpu", confine=True)


def test_checkpoint_code_added_since_submission_is_refused_at_load(rooted):
    import json

    spec, _ = rooted
    config = Path(spec.base_model) / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()),
                                  "auto_map": {"AutoModelForCausalLM": "m.M"}}))
    with pytest.raises(PermissionDeniedError, match="HMAOPT_TRUST_REMOTE_CODE"):
        load_job(spec, device="cpu", confine=True)


def test_a_local_search_gets_the_same_file_checks_before_loading(tmp_path):
    """No roots for a local run (hmaopt search), but a spec the API would refuse for its
    files fails before the models load, with the same message and field."""
    from service.errors import SpecError

    raw = make_tiny_job(tmp_path, groups={"scheme": "blocks", "k": 9})
    with pytest.raises(SpecError, match=r"groups\.k: k=9 blocks but the model has 4 layers "
                       r"\(.*config\.json\)"):
        load_job(JobSpec.model_validate(raw), device="cpu")
    raw = make_tiny_job(tmp_path / "b")
    data = Path(raw["tax"]["tasks"][0]["data"])
    data.write_text(data.read_text() + "{not json\n")
    with pytest.raises(SpecError, match=r"tax\.tasks\.0\.data: .*add\.jsonl, line 13: not "
                       "valid JSON") as info:
        load_job(JobSpec.model_validate(raw), device="cpu")
    assert info.value.field == "tax.tasks.0.data"
