"""The lm-evaluation-harness adapter against hmaopt's own multiple-choice scorer, on a tiny model."""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.errors import DependencyUnavailableError, EvaluationError, SpecError
from tests.models import make_char_lm
from workers.evaluate.lmeval import lm_eval_metric
from workers.evaluate.tasks import multiple_choice_accuracy

TASK_DIR = Path(__file__).parent / "lmeval_task"
TASK_YAML = TASK_DIR / "tiny_mc.yaml"


def _records() -> list[dict]:
    """The task's questions in hmaopt's format: lm-eval's doc_to_text, " " + choice, label."""
    docs = [json.loads(line) for line in (TASK_DIR / "questions.jsonl").read_text().splitlines()]
    return [{"prompt": f"Question: {d['question']}\nAnswer:", "choices": [" " + c for c in d["choices"]],
             "answer": d["label"]} for d in docs]


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine spinning
    OpenMP workers make each forward pass up to 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    return make_char_lm(root / "a", seed=0), make_char_lm(root / "b", seed=4)


@pytest.fixture(scope="module")
def lm(paths):
    return _load(paths[0])


def test_accuracy_equals_hmaopt_multiple_choice(lm, tmp_path, monkeypatch):
    model, tok = lm
    monkeypatch.chdir(tmp_path)  # the data file is found relative to the YAML, not the cwd
    acc, higher = lm_eval_metric(model, tok, TASK_YAML, batch_size=4)
    assert higher is True
    assert acc == multiple_choice_accuracy(model, tok, _records(), batch_size=4)
    assert 0 < acc < 1
    assert lm_eval_metric(model, tok, str(TASK_YAML), metric="acc,none") == (acc, True)
    records = _records()[:4]
    assert lm_eval_metric(model, tok, TASK_YAML, limit=4)[0] == multiple_choice_accuracy(model, tok, records)


def test_sees_weights_changed_in_place(paths):
    model, tok = _load(paths[0])
    other, _ = _load(paths[1])
    records = _records()
    first, _ = lm_eval_metric(model, tok, TASK_YAML)
    with torch.no_grad():  # in place, as the merger writes: same Parameter objects
        for p, q in zip(model.parameters(), other.parameters(), strict=True):
            p.copy_(q)
    second, _ = lm_eval_metric(model, tok, TASK_YAML)
    assert second == multiple_choice_accuracy(model, tok, records) == lm_eval_metric(other, tok, TASK_YAML)[0]
    assert second != first
    model.lm_head.weight.data.mul_(0)  # uniform next token: every choice ties, the first wins
    assert lm_eval_metric(model, tok, TASK_YAML) == (pytest.approx(0.3), True)
    assert lm_eval_metric(model, tok, TASK_YAML, metric="acc_norm") == (pytest.approx(0.3), True)
    assert multiple_choice_accuracy(model, tok, records) == pytest.approx(0.3)


def test_batch_hook_runs_per_batch_and_can_stop(lm):
    model, tok = lm
    calls = []
    lm_eval_metric(model, tok, TASK_YAML, batch_size=4, on_batch=lambda: calls.append(1))
    assert len(calls) >= 2

    class Cancelled(Exception):
        pass

    def cancel():
        raise Cancelled

    with pytest.raises(Cancelled):  # propagated as is, not wrapped in an EvaluationError
        lm_eval_metric(model, tok, TASK_YAML, on_batch=cancel)


def test_caller_random_state_is_kept(lm):
    model, tok = lm
    random.seed(7)
    torch.manual_seed(7)
    py, pt = random.getstate(), torch.get_rng_state()
    lm_eval_metric(model, tok, TASK_YAML)
    assert random.getstate() == py
    assert torch.equal(torch.get_rng_state(), pt)


def _task_copy(tmp_path: Path, yaml_text: str | None = None, data: str | None = None) -> Path:
    shutil.copytree(TASK_DIR, tmp_path / "task")
    yaml_path = tmp_path / "task" / "tiny_mc.yaml"
    if yaml_text is not None:
        yaml_path.write_text(yaml_text)
    if data is not None:
        (tmp_path / "task" / "questions.jsonl").write_text(data)
    return yaml_path


def test_bad_input_is_a_spec_error(lm, tmp_path):
    model, tok = lm
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SpecError, match=r"nope\.yaml.*does not exist"):
        lm_eval_metric(model, tok, missing)
    with pytest.raises(SpecError, match=r"tiny_mc\.yaml.*no metric 'f1' \(it has: acc, acc_norm\)"):
        lm_eval_metric(model, tok, TASK_YAML, metric="f1")
    text = TASK_YAML.read_text()
    no_name = _task_copy(tmp_path / "a", text.replace("task: hmaopt_tiny_mc\n", ""))
    with pytest.raises(SpecError, match=r"tiny_mc\.yaml.*no 'task:' name"):
        lm_eval_metric(model, tok, no_name)
    bad_yaml = _task_copy(tmp_path / "b", "task: [unclosed\n")
    with pytest.raises(SpecError, match=r"tiny_mc\.yaml.*not valid YAML"):
        lm_eval_metric(model, tok, bad_yaml)
    no_data = _task_copy(tmp_path / "c", text.replace("test: questions.jsonl", "test: gone.jsonl"))
    with pytest.raises(SpecError, match=r"data file '.*gone\.jsonl' does not exist"):
        lm_eval_metric(model, tok, no_data)


def test_failure_inside_lm_eval_is_an_evaluation_error(lm, tmp_path):
    model, tok = lm
    broken = _task_copy(tmp_path, data="{not json\n")
    with pytest.raises(EvaluationError, match="lm-eval task 'hmaopt_tiny_mc'") as info:
        lm_eval_metric(model, tok, broken)
    assert info.value.__cause__ is not None


def test_missing_lm_eval_is_a_dependency_error(lm, monkeypatch):
    model, tok = lm
    monkeypatch.setitem(sys.modules, "lm_eval.evaluator", None)  # import fails
    with pytest.raises(DependencyUnavailableError, match=r"pip install 'hmaopt\[lmeval\]'"):
        lm_eval_metric(model, tok, TASK_YAML)
