"""The OpenAPI document of the live API: every error status documented as the JSON error body
the server sends, every body and response typed, short operation ids, examples that are
valid specs; and a client generated from it by openapi-python-client that drives a real job
(submit, read, list trials) against a real stack with a worker."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
#: the only free-form object left: the export manifest (hma_manifest.json, its own format)
FREE_FORM = {"ExportState.manifest"}


@pytest.fixture(scope="module")
def doc(tmp_path_factory) -> dict:
    """The document /openapi.json serves (built without a database: it needs none)."""
    from service.api.app import create_app
    from service.settings import Settings

    home = tmp_path_factory.mktemp("openapi")
    app = create_app(Settings(database_url=f"sqlite:///{home / 'db'}", home=home),
                     maintenance=False)
    return json.loads(json.dumps(app.openapi()))


def _operations(doc):
    for path, item in doc["paths"].items():
        for method, op in item.items():
            yield path, method, op


def test_every_error_status_is_documented_as_the_error_body(doc):
    assert "HTTPValidationError" not in json.dumps(doc)
    ids = [op["operationId"] for _, _, op in _operations(doc)]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"[a-z]+(_[a-z]+)*", i) and len(i) <= 20 for i in ids), ids
    assert {"list_jobs", "submit_job", "get_job", "list_trials", "create_pipeline"} <= set(ids)
    for path, method, op in _operations(doc):
        where = f"{method.upper()} {path}"
        statuses = {int(s) for s in op["responses"]}
        if path.startswith("/v1/"):
            assert {401, 503} <= statuses, where
        if op.get("parameters") or "requestBody" in op:
            assert 422 in statuses, where
        if "requestBody" in op:
            assert {400, 413, 422} <= statuses, where
        if "{" in path:
            assert 404 in statuses, where
        if method in ("post", "put", "delete") and path.startswith("/v1/"):
            assert 403 in statuses, where
        for status, response in op["responses"].items():
            if int(status) < 400 or path == "/readyz":
                continue
            assert response["content"] == {"application/json": {"schema": ERROR_REF}}, (
                where, status, response)
    events = doc["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]
    assert list(events["200"]["content"]) == ["text/event-stream"]
    assert events["422"]["content"]["application/json"]["schema"] == ERROR_REF
    body = doc["components"]["schemas"]["ErrorBody"]
    assert set(body["properties"]) == {"error", "message", "field"}


def _free_form(name: str, schema: dict, out: set[str]) -> None:
    """Collect the properties of ``schema`` that are objects of any shape."""
    def untyped(s: dict) -> bool:
        if "anyOf" in s:
            return any(untyped(x) for x in s["anyOf"] if x.get("type") != "null")
        if s.get("type") == "array":
            if "prefixItems" in s:  # a tuple
                return any(untyped(x) for x in s["prefixItems"])
            return untyped(s.get("items") or {})
        if "$ref" in s or "enum" in s or s.get("type") in ("string", "number", "integer",
                                                           "boolean", "null"):
            return False
        if s.get("type") == "object" and "properties" not in s:
            extra = s.get("additionalProperties", True)
            return extra is True or (isinstance(extra, dict) and untyped(extra))
        return "properties" not in s and "const" not in s
    for prop, sub in schema.get("properties", {}).items():
        if untyped(sub):
            out.add(f"{name}.{prop}")


def test_every_body_and_response_is_typed(doc):
    schemas = doc["components"]["schemas"]
    loose: set[str] = set()
    for name, schema in schemas.items():
        _free_form(name, schema, loose)
    assert loose == FREE_FORM
    for name in ("JobList", "TrialList", "WorkerList", "PipelineList", "RunList",
                 "PromotionList", "DeliveryList"):
        items = schemas[name]["properties"]["data"]["items"]
        assert "$ref" in items, name
    detail = schemas["JobDetail"]["properties"]
    assert detail["spec"]["$ref"].endswith("/JobSpec")
    assert {"$ref": "#/components/schemas/JobResult"} in detail["result"]["anyOf"]
    assert {"$ref": "#/components/schemas/Layout"} in detail["layout"]["anyOf"]
    assert schemas["PipelineOut"]["properties"]["spec"]["$ref"].endswith("/PublicPipelineSpec")
    for path, method, op in _operations(doc):
        for status, response in op["responses"].items():
            for media, content in response.get("content", {}).items():
                if media == "application/json":
                    assert content.get("schema"), (method, path, status)
        if "requestBody" in op:
            schema = op["requestBody"]["content"]["application/json"]["schema"]
            refs = json.dumps(schema)
            assert "$ref" in refs, (method, path, schema)
    create = doc["paths"]["/v1/pipelines"]["post"]["requestBody"]["content"]["application/json"]
    assert create["schema"]["$ref"].endswith("/PipelineSpec")


def test_the_examples_are_valid_specs(doc):
    from service.pipelines.spec import PipelineSpec
    from service.spec import JobSpec

    submit = doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
    create = doc["paths"]["/v1/pipelines"]["post"]["requestBody"]["content"]["application/json"]
    assert len(submit["examples"]) >= 3 and len(create["examples"]) >= 2
    for example in submit["examples"].values():
        JobSpec.model_validate(example["value"])
    for example in create["examples"].values():
        PipelineSpec.model_validate(example["value"])
    put = doc["paths"]["/v1/pipelines/{ref}"]["put"]["requestBody"]["content"]
    assert put["application/json"]["examples"]


def _strict(model, value, where: str = "result") -> None:
    """``value`` validates against ``model`` and no key of it falls outside the model."""
    from pydantic import BaseModel

    def walk(obj, at):
        if isinstance(obj, BaseModel):
            assert not obj.model_extra, f"{at}: keys the schema does not name: {obj.model_extra}"
            for name in type(obj).model_fields:
                walk(getattr(obj, name), f"{at}.{name}")
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{at}.{k}")
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                walk(v, f"{at}[{i}]")
    walk(model.model_validate(value), where)


def _generate(url: str, out: Path, name: str):
    """openapi-python-client's CLI, offline, on the live document; the package imported."""
    spec = out / "openapi.json"
    spec.write_text(httpx.get(f"{url}/openapi.json").text)
    exe = Path(sys.executable).parent / "openapi-python-client"
    env = {"PATH": f"{exe.parent}:/usr/bin:/bin", "HOME": str(out)}
    proc = subprocess.run([str(exe), "generate", "--path", str(spec), "--output-path",
                           str(out / name), "--meta", "none"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Warning" not in proc.stdout, proc.stdout
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(out))


@pytest.fixture
def generated(stack, tmp_path):
    name = f"hmaopt_generated_{tmp_path.name.replace('-', '_')}"
    package = _generate(stack.url, tmp_path, name)
    yield name, package
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]


def test_a_generated_client_drives_a_job(stack, tiny_spec, generated):
    import time

    from service.api.results import JobResult, Layout

    name, package = generated
    api = importlib.import_module(f"{name}.api.jobs")
    for op in ("submit_job", "get_job", "list_trials", "list_jobs", "get_trial"):
        importlib.import_module(f"{name}.api.jobs.{op}")
    models = importlib.import_module(f"{name}.models")
    client = package.AuthenticatedClient(base_url=stack.url, token=stack.tokens["operator"],
                                         raise_on_unexpected_status=True)
    viewer = package.AuthenticatedClient(base_url=stack.url, token=stack.tokens["viewer"],
                                         raise_on_unexpected_status=True)

    # errors come back as the typed error body
    refused = api.submit_job.sync_detailed(client=viewer,
                                           body=models.JobSpec.from_dict(tiny_spec))
    assert refused.status_code == 403 and isinstance(refused.parsed, models.ErrorBody)
    assert refused.parsed.field == "role"
    missing = api.get_job.sync(client=viewer, job_id="0" * 32)
    assert isinstance(missing, models.ErrorBody) and missing.error == "not_found"
    paged = api.list_jobs.sync_detailed(client=viewer, offset=2**63)
    assert paged.status_code == 422 and paged.parsed.field == "offset"

    stack.start_worker()
    submitted = api.submit_job.sync(client=client, body=models.JobSpec.from_dict(tiny_spec),
                                    idempotency_key="generated-1")
    assert isinstance(submitted, models.JobDetail) and submitted.status == models.JobStatus.QUEUED
    deadline = time.monotonic() + 240
    while True:
        job = api.get_job.sync(client=viewer, job_id=submitted.id)
        assert isinstance(job, models.JobDetail)
        if job.status in (models.JobStatus.SUCCEEDED, models.JobStatus.FAILED):
            break
        assert time.monotonic() < deadline, stack.worker_log()[-3000:]
        time.sleep(0.5)
    assert job.status == models.JobStatus.SUCCEEDED, (job.error, stack.worker_log()[-3000:])
    assert isinstance(job.result, models.JobResult) and job.result.feasible
    assert isinstance(job.layout, models.Layout) and job.layout.slots == job.result.slots
    assert isinstance(job.spec, models.JobSpec) and job.spec.name == tiny_spec["name"]
    assert isinstance(job.result.best, models.ChosenTrial)
    assert job.result.best.trial == job.best.trial

    trials = api.list_trials.sync(client=viewer, job_id=job.id, limit=3,
                                  sort=models.ListTrialsSort.REWARD,
                                  order=models.ListTrialsOrder.DESC)
    assert isinstance(trials, models.TrialList) and trials.count == job.progress.trials_finished
    assert len(trials.data) == 3 and all(isinstance(t, models.TrialPublic) for t in trials.data)
    rewards = [t.reward for t in trials.data]
    assert rewards == sorted(rewards, reverse=True)
    one = api.get_trial.sync(client=viewer, job_id=job.id, number=trials.data[0].number)
    assert isinstance(one, models.TrialPublic)
    assert one.ratios.to_dict() == trials.data[0].ratios.to_dict()
    listed = api.list_jobs.sync(client=viewer, limit=5)
    assert listed.count == 1 and listed.data[0].id == job.id

    # the stored JSON the API passes through matches its documented shapes exactly
    raw = httpx.get(f"{stack.url}/v1/jobs/{job.id}",
                    headers={"Authorization": f"Bearer {stack.tokens['viewer']}"}).json()
    _strict(JobResult, raw["result"])
    _strict(Layout, raw["layout"], "layout")
