"""Databases saved at old revisions of the hmaopt_* tables, for tests/service/test_migrations.py.

Like optuna's ``tests/storages_tests/rdb_tests/test_upgrade_assets/``: each ``<revision>.db``
here is a SQLite database that Alembic upgraded to exactly that revision (0001: jobs, trials,
tokens, workers; 0002: + the job's layout), holding the rows a service of that revision
would have written (a finished job with three trials, a queued job, an operator token, a
stopped worker), inserted with plain SQL (the models describe the head, not the revision).
The committed files are the test's input: build them again only to add a revision's asset,
never to "fix" an old one (that would hide the very break the test is there to catch).

    .venv/bin/python -m tests.service.upgrade_assets.make_assets 0001 0002

The PostgreSQL side of the test calls :func:`build` on a fresh database instead (there is no
file to keep); both read their expectations from :func:`rows`.
"""

from __future__ import annotations

import sqlite3
import sys
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).parent
REVISIONS = ("0001", "0002")

#: the operator token whose SHA-256 the asset holds (the token itself is never stored)
TOKEN = "hmaopt_upgrade-asset-operator-token-0000000000000000000"
TOKEN_ID = "7f1c0a4e9b2d4c6f8a3e5b7d9c1f2a4b"
JOB_ID = "3b8e2f6a1c4d4e9f8b7a6c5d4e3f2a1b"
QUEUED_JOB_ID = "9a8b7c6d5e4f4a3b2c1d0e9f8a7b6c5d"
WORKER_ID = "c0ffee00c0ffee00c0ffee00c0ffee00"

SPEC = {
    "name": "nightly-qwen", "base_model": "/models/qwen-sft",
    "aligned_model": "/models/qwen-rlhf",
    "groups": {"scheme": "blocks", "k": 2, "boundaries": None, "split_attn_mlp": False,
               "non_layer": "nearest"},
    "ratio_bounds": [0.0, 1.0], "mean_ratio": None,
    "reward": {"type": "preference", "model": None, "prompts": None,
               "data": "/data/pref.jsonl", "function": None, "max_new_tokens": 32,
               "batch_size": 16},
    "tax": {"budget": 0.05, "tasks": [
        {"name": "mmlu-mini", "type": "multiple_choice", "data": "/data/mmlu.jsonl",
         "weight": 1.0, "max_new_tokens": 16, "batch_size": 16, "metric": None,
         "limit": None}]},
    "search": {"sampler": "tpe", "n_trials": 3, "seed": 0, "pruning": True,
               "prune_fraction": 0.3, "prune_margin": 0.05, "holdout_fraction": 0.3,
               "workers": 1, "uniform_grid": None},
    "mode": "constrained", "export": {"dir": "/models/exports/nightly-qwen"},
}
QUEUED_SPEC = {**SPEC, "name": "nightly-qwen-next", "tax": {**SPEC["tax"], "budget": 0.1}}
#: Grouping.describe() of SPEC's grouping on a 4-layer model (revision 0002 keeps it)
LAYOUT = {"scheme": "blocks", "spec": SPEC["groups"], "num_layers": 4,
          "groups": [{"name": "block0", "layers": [0, 1]}, {"name": "block1", "layers": [2, 3]}],
          "slots": ["block0", "block1"], "non_layer_rule": "nearest", "tied_embeddings": True}


def _at(hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 11, 21, hour, minute, tzinfo=UTC)


def _trial(number: int, **fields) -> dict:
    return {"job_id": JOB_ID, "number": number, "stage": 2, "metrics": {}, "task_tax": {},
            "merge_seconds": 0.4, "eval_seconds": 2.5, "worker_id": WORKER_ID,
            "finished_at": _at(2, 10 + number), **fields}


def rows(revision: str) -> dict[str, list[dict]]:
    """The rows of each table at ``revision``, in insertion order (None: the column is left
    out, NULL)."""
    from service.db.jobs import request_hash

    result = {
        "study": "hmaopt:" + JOB_ID, "mode": "constrained", "budget": 0.05,
        "ratio_convention": "ratio = weight on the aligned model", "slots": ["block0", "block1"],
        "feasible": True,
        "best": {"trial": 1, "reward": 0.74, "tax": 0.041,
                 "ratios": {"block0": 0.35, "block1": 0.8},
                 "holdout": {"reward": 0.71, "tax": 0.045}},
        "best_uniform": {"trial": 0, "ratio": 0.5, "reward": 0.61, "tax": 0.03,
                         "metrics": {}, "holdout": {"reward": 0.6, "tax": 0.032}},
        "gain": 0.13, "holdout_gain": 0.11, "pareto": [],
        "trials": {"complete": 2, "pruned": 1}, "seconds": {"search": 9.1},
        "base_cached": False, "version": "0.1.0",
    }
    job = {
        "id": JOB_ID, "name": SPEC["name"], "status": "succeeded", "spec": SPEC,
        "token_id": TOKEN_ID, "submitted_by": "ci-operator", "idempotency_key": "nightly-1",
        "request_hash": request_hash(SPEC), "created_at": _at(2), "updated_at": _at(2, 20),
        "started_at": _at(2, 1), "finished_at": _at(2, 20), "n_trials": 3, "parallel": 1,
        "trials_finished": 3, "trials_pruned": 1, "best_trial": 1, "best_reward": 0.74,
        "best_tax": 0.041, "best_ratios": {"block0": 0.35, "block1": 0.8},
        "baseline_ratio": 0.5, "baseline_reward": 0.61, "baseline_tax": 0.03,
        "result": result, "cancel_requested": False, "runs_enqueued": 1,
        "finalizer": WORKER_ID, "export_status": "succeeded",
        "export_dir": "/models/exports/nightly-qwen",
        "export_manifest": {"format": "safetensors", "ratios": {"block0": 0.35, "block1": 0.8}},
    }
    queued = {
        "id": QUEUED_JOB_ID, "name": QUEUED_SPEC["name"], "status": "queued",
        "spec": QUEUED_SPEC, "token_id": TOKEN_ID, "submitted_by": "ci-operator",
        "request_hash": request_hash(QUEUED_SPEC), "created_at": _at(3),
        "updated_at": _at(3), "n_trials": 3, "parallel": 1, "trials_finished": 0,
        "trials_pruned": 0, "cancel_requested": False, "runs_enqueued": 1,
    }
    if revision >= "0002":
        job["layout"] = LAYOUT
    return {
        "hmaopt_tokens": [{"id": TOKEN_ID, "name": "ci-operator", "role": "operator",
                           "token_hash": _token_hash(), "created_at": _at(1),
                           "last_used_at": _at(3)}],
        "hmaopt_workers": [{"id": WORKER_ID, "name": "gpu0", "hostname": "node-7", "pid": 4242,
                            "device": "cuda:0", "state": "stopped", "started_at": _at(1, 30),
                            "heartbeat_at": _at(2, 21), "stopped_at": _at(2, 22)}],
        "hmaopt_jobs": [job, queued],
        "hmaopt_trials": [
            _trial(0, kind="uniform", state="complete", ratios={"block0": 0.5, "block1": 0.5},
                   reward=0.61, tax=0.03, feasible=True, uniform_ratio=0.5,
                   metrics={"mmlu-mini/accuracy": 0.58}, task_tax={"mmlu-mini": 0.03}),
            _trial(1, kind="search", state="complete", ratios={"block0": 0.35, "block1": 0.8},
                   reward=0.74, tax=0.041, feasible=True,
                   metrics={"mmlu-mini/accuracy": 0.57}, task_tax={"mmlu-mini": 0.041}),
            _trial(2, kind="search", state="pruned", ratios={"block0": 0.9, "block1": 1.0},
                   tax=0.12, feasible=False, stage=1, task_tax={"mmlu-mini": 0.12}),
        ],
    }


def _token_hash() -> str:
    from service.db.tokens import hash_token

    return hash_token(TOKEN)


def _insert(conn, table: str, row: dict) -> None:
    """One plain INSERT, its parameters typed from their values (JSON, timestamps, booleans)."""
    from sqlalchemy import JSON, Boolean, DateTime, bindparam, text

    row = {k: v for k, v in row.items() if v is not None}
    types = {dict: JSON(), list: JSON(), datetime: DateTime(timezone=True), bool: Boolean()}
    stmt = text(f"INSERT INTO {table} ({', '.join(row)}) "
                f"VALUES ({', '.join(':' + c for c in row)})")
    stmt = stmt.bindparams(*(bindparam(c, type_=types.get(type(v))) for c, v in row.items()))
    conn.execute(stmt, row)


def build(url: str, revision: str) -> None:
    """Upgrade an empty database at ``url`` to exactly ``revision`` and insert its rows."""
    from service.db.migrate import upgrade
    from service.db.session import get_engine

    assert upgrade(url, revision) == (None, revision)
    with get_engine(url).begin() as conn:
        for table, table_rows in rows(revision).items():
            for row in table_rows:
                _insert(conn, table, row)


def make(revision: str) -> Path:
    """``<revision>.db`` here, built afresh: one file (no WAL beside it), compacted."""
    from service.db.session import dispose_engines

    path = HERE / f"{revision}.db"
    for stale in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        stale.unlink(missing_ok=True)
    build(f"sqlite:///{path}", revision)
    dispose_engines()
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode=DELETE")
        conn.execute("VACUUM")
    finally:
        conn.close()
    return path


if __name__ == "__main__":
    for rev in sys.argv[1:] or REVISIONS:
        print(make(rev))
