"""A job's export, written by a real worker at the end of its run, is a Hugging Face model whose
card and manifest say which job, trial, figures and data chose it (workers/modelcard.py)."""

from __future__ import annotations

import hashlib
import json
import shlex
import time
from pathlib import Path

import pytest


def _wait_export(stack, job_id: str, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    with stack.client("viewer") as c:
        while True:
            detail = c.get(f"/v1/jobs/{job_id}").json()
            if detail["export"]["status"] in ("succeeded", "failed"):
                return detail
            assert time.monotonic() < deadline, (detail["export"], stack.worker_log()[-3000:])
            time.sleep(0.2)


def test_a_job_s_export_carries_its_provenance(pg_stack, tiny_spec, tmp_path):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM

    from service.cli import main
    from workers.modelcard import spec_digest

    stack = pg_stack
    tiny_spec["export"] = {"dir": "exports/card"}
    stack.start_worker()
    with stack.client() as c:
        job_id = c.post("/v1/jobs", json=tiny_spec).json()["id"]
    assert stack.wait_job(job_id)["status"] == "succeeded"
    detail = _wait_export(stack, job_id)
    assert detail["export"]["status"] == "succeeded", detail["export"]
    out = Path(detail["export"]["dir"])
    manifest = json.loads((out / "hma_manifest.json").read_text())
    assert detail["export"]["manifest"] == manifest

    job, best, result = manifest["job"], detail["best"], detail["result"]
    assert (job["id"], job["name"], job["trial"]) == (job_id, "tiny", best["trial"])
    assert job["found_by"] == result["found_by"] and job["spec_sha256"] == spec_digest(detail["spec"])
    f = job["figures"]
    assert f["budget"] == detail["budget"] == 0.5
    assert (f["search"]["reward"], f["search"]["reward_se"]) == (best["reward"], best["reward_se"])
    assert (f["search"]["tax"], f["search"]["tax_se"]) == (best["tax"], best["tax_se"])
    assert f["holdout"] == {k: result["best"]["holdout"][k] for k in f["holdout"]}
    assert f["gain_ci95"] == detail["gain_ci95"] and f["gain_ci95"] is not None
    assert f["holdout_gain_ci95"] == detail["holdout_gain_ci95"]
    assert f["uniform"]["ratio"] == detail["baseline"]["ratio"]
    for i, task in enumerate(detail["spec"]["tax"]["tasks"]):
        entry = job["data"][f"tax.tasks.{i}.data"]
        assert entry["path"] == task["data"] and entry["task"] == task["name"]
        assert entry["sha256"] == hashlib.sha256(Path(task["data"]).read_bytes()).hexdigest()
    assert job["data"]["reward.data"]["sha256"] is not None

    card = ModelCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert meta["base_model"] == [detail["base_model"], detail["aligned_model"]]
    assert {"merge", "hmaopt"} <= set(meta["tags"])
    assert meta["hmaopt"]["merge"]["ratios"] == pytest.approx(best["ratios"])
    assert meta["hmaopt"]["job"]["id"] == job_id and meta["hmaopt"]["job"]["trial"] == best["trial"]
    assert meta["hmaopt"]["figures"]["search"]["reward_se"] == best["reward_se"]
    assert meta["hmaopt"]["figures"]["gain_ci95"] == detail["gain_ci95"]
    assert f"Job `{job_id}`" in card.text and "95 % interval" in card.text
    AutoModelForCausalLM.from_pretrained(out)

    argv = shlex.split(manifest["reproduce"])
    assert argv[-2:] == ["--out", str(out)]
    again = tmp_path / "again"
    assert main([*argv[1:-1], str(again)]) == 0
    for shard in manifest["shards"]:
        assert (again / shard).read_bytes() == (out / shard).read_bytes()
