"""Admission (service/admission.py) through the real API: every spec that can be known bad at
submission is refused there with the field named, never accepted to fail on a worker.

The checks read files only, never the database: these tests run on SQLite alone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.service.conftest import make_settings, start_stack

TASK_DIR = Path(__file__).parents[1] / "workers" / "evaluate" / "lmeval_task"



@pytest.fixture
def db_url(tmp_path):
    """SQLite only: admission reads files, never the database."""
    return f"sqlite:///{tmp_path / 'hmaopt.db'}"


def _post(stack, spec):
    """POST the spec as Python's json writes it: NaN and Infinity as JSON's extensions."""
    with stack.client() as c:
        return c.post("/v1/jobs", content=json.dumps(spec),
                      headers={"Content-Type": "application/json"})


def _refused(stack, spec, status, field, *fragments):
    r = _post(stack, spec)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["field"] == field, body
    for fragment in fragments:
        assert fragment in body["message"], body
    return body


@pytest.fixture
def settings_stack(db_url, redis_url, tmp_path, roots):
    """start(**settings): a second API with admin settings changed, stopped after the test."""
    started = []

    def start(**extra):
        s = start_stack(make_settings(db_url, redis_url, tmp_path / f"home{len(started)}",
                                      roots, **extra))
        started.append(s)
        return s

    yield start
    for s in started:
        s.api.stop()


@pytest.mark.parametrize("edit,field,fragment", [
    (lambda s: s["search"].update(seed=2**32), "search.seed", "less than 4294967296"),
    (lambda s: s["search"].update(seed=-1), "search.seed", "greater than or equal to 0"),
    (lambda s: s["tax"].update(budget="Infinity"), "tax.budget", "finite number"),
    (lambda s: s["tax"].update(budget=float("nan")), "tax.budget", "finite number"),
    (lambda s: s["tax"].update(budget=float("inf")), "tax.budget", "finite number"),
    (lambda s: s["tax"]["tasks"][0].update(weight="Infinity"), "tax.tasks.0.weight", "finite"),
    (lambda s: s["search"].update(prune_margin=float("inf")), "search.prune_margin", "finite"),
    (lambda s: s["groups"].update(k=5), "groups.k", "k=5 blocks but the model has 4 layers"),
    (lambda s: s.update(groups={"scheme": "custom", "boundaries": [2, 4]}), "groups.boundaries",
     "boundary 4 is not inside the model's 4 layers"),
])
def test_numbers_and_groups_are_checked_at_submission(stack, tiny_spec, edit, field, fragment):
    edit(tiny_spec)
    _refused(stack, tiny_spec, 422, field, fragment)


def test_budget_reads_back_as_given(stack, tiny_spec):
    tiny_spec["tax"]["budget"] = 0.25
    r = _post(stack, tiny_spec)
    assert r.status_code == 201 and r.json()["spec"]["tax"]["budget"] == 0.25


#: paths no file system holds (the API refuses a NUL or a lone surrogate in any text before
#: the paths are looked at; resolve_path refuses them for every other caller)
UNUSABLE = [("x" * 256, "256 bytes long"),
            ("é" * 128, "256 bytes long"),                 # 128 characters, 256 bytes
            ("base\x00/../../etc", "NUL"),
            ("base\udc80", "surrogate"),
            ("/".join(["d" * 200] * 25), "paths are under 4096 bytes")]


@pytest.mark.parametrize("raw,fragment", UNUSABLE)
def test_unusable_paths_are_a_422_naming_the_field(stack, tiny_spec, raw, fragment):
    tiny_spec["base_model"] = raw
    _refused(stack, tiny_spec, 422, "base_model", fragment)
    tiny_spec["base_model"] = str(stack.settings.model_roots[0] / "base")
    tiny_spec["tax"]["tasks"][1]["data"] = raw
    _refused(stack, tiny_spec, 422, "tax.tasks.1.data", fragment)
    with stack.client() as c:  # and the connection serves the next request
        assert c.get("/v1/jobs").status_code == 200


@pytest.mark.parametrize("raw,fragment", [*UNUSABLE[:2], ("base\x00/x", "NUL byte"),
                                          ("base\ud800", "not valid file-name text"),
                                          UNUSABLE[4]])
def test_resolve_path_names_the_field_of_an_unusable_path(roots, raw, fragment):
    from service.errors import SpecError
    from service.paths import resolve_path

    for must_exist in (True, False):
        with pytest.raises(SpecError, match=fragment) as info:
            resolve_path("export.dir", raw, [roots[0]], must_exist=must_exist)
        assert info.value.field == "export.dir"


def test_long_path_under_a_root_is_a_422(stack, tiny_spec):
    """Each component fits, the path does not once joined onto the root."""
    tiny_spec["base_model"] = "/".join(["d" * 250] * 16)  # 4015 bytes, relative
    _refused(stack, tiny_spec, 422, "base_model")


def _to_pickle(folder: Path) -> None:
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def test_pickle_only_checkpoint_needs_the_admin_setting(stack, tiny_spec, settings_stack):
    _to_pickle(Path(tiny_spec["aligned_model"]))
    _refused(stack, tiny_spec, 403, "aligned_model", "pickle weights", "HMAOPT_ALLOW_PICKLE")
    allowed = settings_stack(allow_pickle=True)
    assert _post(allowed, tiny_spec).status_code == 201


def test_checkpoint_code_needs_the_admin_setting(stack, tiny_spec, settings_stack):
    config_file = Path(tiny_spec["base_model"]) / "config.json"
    config = json.loads(config_file.read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    config_file.write_text(json.dumps(config))
    _refused(stack, tiny_spec, 403, "base_model", "auto_map in config.json",
             "HMAOPT_TRUST_REMOTE_CODE")
    tok_file = Path(tiny_spec["aligned_model"]) / "tokenizer_config.json"
    tok = json.loads(tok_file.read_text())
    tok["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    tok_file.write_text(json.dumps(tok))
    config.pop("auto_map")
    config_file.write_text(json.dumps(config))
    _refused(stack, tiny_spec, 403, "aligned_model", "tokenizer_config.json")
    trusted = settings_stack(trust_remote_code=True)
    assert _post(trusted, tiny_spec).status_code == 201


def test_base_and_aligned_must_match(stack, tiny_spec):
    config_file = Path(tiny_spec["aligned_model"]) / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "num_hidden_layers": 6}))
    _refused(stack, tiny_spec, 422, "aligned_model", "6 layers against the base model's 4")
    config_file.write_text(json.dumps({**config, "model_type": "mistral"}))
    _refused(stack, tiny_spec, 422, "aligned_model", "model_type 'mistral' differs")
    config_file.write_text("{not json")
    _refused(stack, tiny_spec, 422, "aligned_model", "no readable config.json")


def test_a_broken_jsonl_line_is_named_with_its_line(stack, tiny_spec):
    task = tiny_spec["tax"]["tasks"][1]  # multiple_choice
    lines = Path(task["data"]).read_text().splitlines()
    lines[4] = '{"prompt": "q", "choices": [" a", " b"]'
    Path(task["data"]).write_text("\n".join(lines) + "\n")
    _refused(stack, tiny_spec, 422, "tax.tasks.1.data", "line 5: not valid JSON")
    lines[4] = '{"prompt": "q", "choices": [" a", " b"], "answer": 2}'
    Path(task["data"]).write_text("\n".join(lines) + "\n")
    _refused(stack, tiny_spec, 422, "tax.tasks.1.data", "line 5: answer 2 is out of range")
    pref = Path(tiny_spec["reward"]["data"])
    Path(task["data"]).write_text("\n".join(lines[:4]) + "\n")
    pref.write_text(pref.read_text() + '{"prompt": "p", "chosen": "c"}\n')
    _refused(stack, tiny_spec, 422, "reward.data", "line 11: missing field 'rejected'")
    pref.write_text("\n\n")
    _refused(stack, tiny_spec, 422, "reward.data", "holds no preference records")
    pref.write_bytes(b'{"prompt": "\xff"}\n')
    _refused(stack, tiny_spec, 422, "reward.data", "not UTF-8")


def test_a_large_jsonl_file_is_checked_by_its_first_lines(stack, tiny_spec, monkeypatch):
    from service import admission

    monkeypatch.setattr(admission, "FULL_CHECK_BYTES", 1000)  # the API runs in this process
    monkeypatch.setattr(admission, "HEAD_LINES", 20)
    text = Path(tiny_spec["tax"]["tasks"][2]["data"])  # perplexity: {"text": ...}
    good = [json.dumps({"text": f"line {i} " + "x" * 40}) for i in range(40)]
    text.write_text("\n".join(good[:30] + ["{broken"] + good[30:]) + "\n")
    assert text.stat().st_size > 1000
    assert _post(stack, tiny_spec).status_code == 201  # line 31: past the lines checked
    text.write_text("\n".join(good[:10] + ["{broken"] + good[10:]) + "\n")
    _refused(stack, tiny_spec, 422, "tax.tasks.2.data", "line 11: not valid JSON")


# ------------------------------------------------------------------ lm-eval task YAMLs

@pytest.fixture
def lm_spec(tiny_spec, roots):
    """tiny_spec with an lm_eval tax task whose YAML and data lie in the data root."""
    task_dir = roots[1] / "task"
    shutil.copytree(TASK_DIR, task_dir)
    tiny_spec["tax"]["tasks"] = [{"name": "harness", "type": "lm_eval",
                                  "data": str(task_dir / "tiny_mc.yaml")}]
    return tiny_spec, task_dir / "tiny_mc.yaml"


def _edit(yaml_file: Path, old: str, new: str) -> None:
    text = yaml_file.read_text()
    assert old in text
    yaml_file.write_text(text.replace(old, new))


def test_a_good_task_yaml_is_accepted(stack, lm_spec):
    spec, _ = lm_spec
    assert _post(stack, spec).status_code == 201


@pytest.mark.parametrize("old,new,fragment", [
    ("doc_to_target: label", "doc_to_target: answer",
     "doc_to_target 'answer' is not a field of the records of 'test'"),
    ('doc_to_text: "Question: {{question}}\\nAnswer:"', 'doc_to_text: "Q: {{query}}"',
     "doc_to_text uses query, which the records of 'test' do not have"),
    ("doc_to_target: label", "doc_to_target: 7", "the target 7 (doc_to_target) is not one of"),
    ("dataset_path: json", "dataset_path: someorg/some_dataset",
     "names a hub data set; hmaopt runs lm-eval offline"),
    ("    test: questions.jsonl", "    test: https://example.com/q.jsonl", "is a URL"),
    ("    test: questions.jsonl", "    test: gone.jsonl", "data file 'gone.jsonl' does not exist"),
    ("test_split: test", "test_split: validation",
     "test_split 'validation' is not a split of its data_files (it has: test)"),
    ("output_type: multiple_choice", "output_type: ranking", "output_type 'ranking' is not one"),
    ("task: hmaopt_tiny_mc\n", "", "has no 'task:' name"),
    ("task: hmaopt_tiny_mc\n", "task: [unclosed\n", "is not valid YAML"),
])
def test_a_bad_task_yaml_is_refused_at_submission(stack, lm_spec, old, new, fragment):
    spec, yaml_file = lm_spec
    _edit(yaml_file, old, new)
    _refused(stack, spec, 422, "tax.tasks.0.data", fragment)


def test_task_yaml_metric_and_includes(stack, lm_spec, tmp_path):
    spec, yaml_file = lm_spec
    spec["tax"]["tasks"][0]["metric"] = "f1"
    _refused(stack, spec, 422, "tax.tasks.0.metric", "no metric 'f1' (it has: acc, acc_norm)")
    spec["tax"]["tasks"][0]["metric"] = "acc_norm"
    assert _post(stack, spec).status_code == 201
    # an include is merged as lm-eval merges it, and must lie in the data roots too
    base = yaml_file.with_name("_base.yaml")
    text = yaml_file.read_text()
    base.write_text(text.replace("task: hmaopt_tiny_mc\n", ""))
    yaml_file.write_text("include: _base.yaml\ntask: hmaopt_tiny_mc\n")
    assert _post(stack, spec).status_code == 201
    outside = tmp_path / "outside.yaml"
    shutil.move(base, outside)
    base.symlink_to(outside)
    _refused(stack, spec, 403, "tax.tasks.0.data", "outside the allowed data roots")


def test_task_data_outside_the_roots_is_refused(stack, lm_spec, tmp_path):
    spec, yaml_file = lm_spec
    secret = tmp_path / "secret.jsonl"
    shutil.copy(yaml_file.with_name("questions.jsonl"), secret)
    _edit(yaml_file, "    test: questions.jsonl", f"    test: {secret}")
    body = _refused(stack, spec, 403, "tax.tasks.0.data", "outside the allowed data roots")
    assert "HMAOPT_DATA_ROOTS" in body["message"]


def test_task_code_needs_the_admin_setting(stack, lm_spec, settings_stack):
    spec, yaml_file = lm_spec
    yaml_file.with_name("utils.py").write_text("def docs(dataset):\n    return dataset\n")
    _edit(yaml_file, "output_type:", "process_docs: !function utils.docs\noutput_type:")
    _refused(stack, spec, 403, "tax.tasks.0.data", "!function utils.docs",
             "HMAOPT_ALLOW_TASK_CODE")
    allowed = settings_stack(allow_task_code=True)
    assert _post(allowed, spec).status_code == 201


# ------------------------------------------------------------------ the worker checks again

def test_a_link_swapped_in_after_submission_fails_the_job_on_the_worker(stack, tiny_spec,
                                                                          tmp_path):
    """Admitted, then a weight file replaced by a link out of the roots: the worker refuses
    it when it loads the job (a failed job naming the field), and loads nothing."""
    r = _post(stack, tiny_spec)
    assert r.status_code == 201, r.text
    job = r.json()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    weights = Path(job["spec"]["aligned_model"]) / "model.safetensors"
    shutil.move(weights, outside / "model.safetensors")
    weights.symlink_to(outside / "model.safetensors")
    stack.start_worker()
    final = stack.wait_job(job["id"], timeout=120)
    assert final["status"] == "failed", final
    assert final["error"].startswith("aligned_model: "), final["error"]
    assert "model.safetensors is a link that resolves outside the allowed model roots" \
        in final["error"]
    assert final["progress"]["trials_finished"] == 0


def test_a_link_swapped_in_before_an_export_fails_the_export(stack, tiny_spec, tmp_path,
                                                              monkeypatch):
    """An export reads the checkpoints again, later: it checks them again too."""
    from service.db import jobs as job_db
    from service.db import session_scope
    from service.settings import get_settings
    from tests.service.conftest import settings_env
    from workers import loop

    for key, value in settings_env(stack.settings).items():  # what a worker process gets
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    job = _post(stack, tiny_spec).json()
    with session_scope(stack.settings.database()) as s:
        row = job_db.get_job(s, job["id"])
        row.status, row.best_ratios = "succeeded", {"block0": 0.5, "block1": 0.5}
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    weights = Path(job["spec"]["base_model"]) / "model.safetensors"
    shutil.move(weights, outside / weights.name)
    weights.symlink_to(outside / weights.name)
    out = stack.settings.model_roots[0] / "out"
    try:
        assert loop.export_job(job["id"], str(out)) == "failed"
    finally:
        loop.current_worker().close()
        get_settings.cache_clear()
    with stack.client("viewer") as c:
        export = c.get(f"/v1/jobs/{job['id']}").json()["export"]
    assert export["status"] == "failed", export
    assert export["error"].startswith("base_model: ") and "is a link that resolves outside" \
        in export["error"], export
    assert not out.exists()
