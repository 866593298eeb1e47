"""lm-eval tasks that are broken fail fast and say why (workers/evaluate/lmeval.py checks,
lmeval_env.py's offline run and collected warnings), against lm-eval itself on a tiny model.

The broken YAMLs are the ones a user writes: a doc_to_target naming a field the data does
not have (lm-eval then scores every model 0 and warns once per document), a hub data set
(lm-eval retries the hub for tens of seconds), a doc_to_choice that ties every choice
(θ_base scores the same on every document).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from service.errors import EvaluationError, SpecError
from service.spec import JobSpec
from tests.models import make_tiny_job
from workers.evaluate.lmeval import check_base, check_task, lm_eval_records

TASK_DIR = Path(__file__).parent / "lmeval_task"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _task(tmp_path: Path, old: str | None = None, new: str = "") -> Path:
    folder = tmp_path / "task"
    shutil.copytree(TASK_DIR, folder)
    yaml_file = folder / "tiny_mc.yaml"
    if old is not None:
        text = yaml_file.read_text()
        assert old in text
        yaml_file.write_text(text.replace(old, new))
    return yaml_file


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.models import make_char_lm

    path = make_char_lm(tmp_path_factory.mktemp("lm") / "m")
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_a_good_task_passes_the_checks(tmp_path):
    assert check_task(_task(tmp_path), metric="acc_norm") == "hmaopt_tiny_mc"
    check_base("tax task 'x'", _task(tmp_path / "b"), 0.4, [0.0, 1.0, 1.0, 0.0])


def test_wrong_doc_to_target_fails_before_any_model_loads(tmp_path):
    yaml_file = _task(tmp_path, "doc_to_target: label", "doc_to_target: answer")
    with pytest.raises(SpecError, match=r"tax task 'harness': lm-eval task 'hmaopt_tiny_mc' "
                       r".*document 0: its target 'answer' \(doc_to_target\) is not one of "
                       r"its 3 choices"):
        check_task(yaml_file, label="tax task 'harness'")


def test_wrong_doc_to_target_measured_is_an_error_naming_the_task(lm, tmp_path, caplog):
    """Without the check first, θ_base scores 0; check_base refuses it with lm-eval's own
    complaint, and lm-eval's ten warnings reach the log as one line."""
    model, tok = lm
    yaml_file = _task(tmp_path, "doc_to_target: label", "doc_to_target: answer")
    with caplog.at_level(logging.WARNING):
        value, _, per_doc = lm_eval_records(model, tok, yaml_file)
    assert value == 0 and per_doc == [0.0] * 10
    assert not [r for r in caplog.records if r.name.startswith("lm_eval")]
    summary = [r for r in caplog.records if r.name == "workers.evaluate.lmeval_env"]
    assert len(summary) == 1, [r.getMessage() for r in caplog.records]
    assert "10 warning(s)" in summary[0].getMessage()
    assert "Label index was not in within range" in summary[0].getMessage()
    with pytest.raises(EvaluationError, match=r"tax task 'harness' .*θ_base scores 0.*"
                       r"doc_to_target.*lm-eval warned: 'Label index was not in within range"):
        check_base("tax task 'harness'", yaml_file, value, per_doc)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="workers.evaluate.lmeval_env"):
        lm_eval_records(model, tok, yaml_file)  # the same warnings again: not repeated
    again = [r for r in caplog.records if r.name == "workers.evaluate.lmeval_env"]
    assert [r.levelno for r in again] == [logging.DEBUG]


def test_degenerate_figures_are_refused(tmp_path):
    yaml_file = _task(tmp_path)
    for value, per_doc, fragment in [(math.nan, None, "figure is nan"),
                                     (0.0, None, "scores 0"),
                                     (1.0, [1.0] * 10, "scores 1 on each of its 10 documents")]:
        with pytest.raises(EvaluationError, match=fragment):
            check_base("tax task 'harness'", yaml_file, value, per_doc)
    check_base("tax task 'harness'", yaml_file, 1.0, [1.0])  # one document: no spread to see


def test_a_hub_dataset_fails_at_once(tmp_path, monkeypatch):
    yaml_file = _task(tmp_path, "dataset_path: json", "dataset_path: someorg/some_dataset")
    started = time.monotonic()
    with pytest.raises(SpecError, match="dataset_path 'someorg/some_dataset' is not a local "
                       "file or folder: it names a hub data set, and hmaopt runs lm-eval "
                       "offline"):
        check_task(yaml_file)
    assert time.monotonic() - started < 5


def test_the_run_is_offline(lm, tmp_path, monkeypatch):
    """With the hub reachable by every flag, a remote data file still fails at once: the
    run sets the flags the libraries read at import time, and puts them back after."""
    import datasets.config
    import huggingface_hub.constants

    for module, name in ((huggingface_hub.constants, "HF_HUB_OFFLINE"),
                         (datasets.config, "HF_HUB_OFFLINE"),
                         (datasets.config, "HF_DATASETS_OFFLINE")):
        monkeypatch.setattr(module, name, False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    yaml_file = _task(tmp_path, "    test: questions.jsonl",
                      "    test: https://huggingface.co/datasets/someorg/x/resolve/main/q.jsonl")
    started = time.monotonic()
    with pytest.raises(EvaluationError, match="hmaopt runs lm-eval offline"):
        check_task(yaml_file)
    assert time.monotonic() - started < 10
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False and datasets.config.HF_HUB_OFFLINE is False
    assert "HF_HUB_OFFLINE" not in os.environ


def test_ties_on_every_document_fail_the_job_after_theta_base(tmp_path):
    """doc_to_choice giving every document the same three choices: each scores 1 (the first
    choice wins the tie and is the target): θ_base constant, the job stops there."""
    from workers.job import load_job, measure_base

    yaml_file = _task(tmp_path / "t", "doc_to_choice: choices",
                      'doc_to_choice: ["x", "x", "x"]')
    text = yaml_file.read_text().replace("doc_to_target: label", "doc_to_target: 0")
    yaml_file.write_text(text)
    raw = make_tiny_job(tmp_path / "job")
    raw["tax"]["tasks"] = [{"name": "harness", "type": "lm_eval", "data": str(yaml_file)}]
    merger, evaluator = load_job(JobSpec.model_validate(raw), device="cpu")
    with pytest.raises(EvaluationError, match=r"tax task 'harness' .*θ_base scores 1 on each "
                       "of its 10 documents: the task cannot tell models apart"):
        measure_base(merger, evaluator)


def test_a_broken_task_stops_the_search_before_the_models_load(tmp_path):
    from workers.search import run_search

    yaml_file = _task(tmp_path / "t", "doc_to_target: label", "doc_to_target: answer")
    raw = make_tiny_job(tmp_path / "job")
    raw["tax"]["tasks"] = [{"name": "harness", "type": "lm_eval", "data": str(yaml_file)}]
    # weights that cannot be read: never reached, the task is checked first
    (Path(raw["base_model"]) / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(SpecError, match="doc_to_target 'answer' is not a field of the records "
                       "of 'test'") as info:  # service/lmeval_task.py, as at submission
        run_search(JobSpec.model_validate(raw), device="cpu")
    assert info.value.field == "tax.tasks.0.data"


def test_an_lm_eval_task_is_marked_not_held_out_wherever_holdout_figures_appear(tmp_path):
    """lm-eval tasks are never split: their validation and holdout figures are their search
    figures, and the result, its flag and the CLI summary say so by name."""
    from service.api.results import PartFigures
    from service.cli.helpers import format_summary
    from workers.search import jsonable, run_search

    raw = make_tiny_job(tmp_path / "job")
    raw["tax"]["tasks"].append({"name": "harness", "type": "lm_eval",
                                "data": str(_task(tmp_path))})
    raw["tax"]["budget"] = 5.0  # feasible whatever the random models do
    result = jsonable(run_search(JobSpec.model_validate(raw), device="cpu").to_dict())
    for part in (result["best"]["validation"], result["best"]["holdout"],
                 result["best_uniform"]["holdout"]):
        assert part["held_out"] is False and part["from_search_data"] == ["harness"]
        assert PartFigures.model_validate(part).from_search_data == ["harness"]
    flag = next(f for f in result["flags"] if f["code"] == "not_held_out")
    assert "search data: harness" in flag["message"]
    holdout_lines = [line for line in format_summary(result).splitlines()
                     if line.strip().startswith(("validation", "holdout"))]
    assert holdout_lines and all(line.endswith("(search data: harness)") for line in holdout_lines
                                 if "reward" in line)
