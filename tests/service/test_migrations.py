"""Upgrades from databases saved at earlier revisions (optuna's upgrade assets), on SQLite
(the committed files of upgrade_assets/) and PostgreSQL (the same rows, built at the revision).

After ``upgrade`` the database is at the head, agrees with the models, and the old rows read
and write through the service's own queries and response shapes. The upgrade from an empty
database lives in test_db.py.
"""

from __future__ import annotations

import shutil

import pytest

from service.api.schemas import job_summary, trial_public
from service.db import jobs as job_db
from service.db import session_scope
from service.db import tokens as token_db
from service.db import workers as worker_db
from service.db.migrate import check_schema, head_revision, schema_diff, upgrade
from service.db.models import Worker
from service.db.session import current_revision, dispose_engines
from service.errors import DependencyUnavailableError
from tests.service.upgrade_assets import make_assets
from tests.service.upgrade_assets.make_assets import (JOB_ID, LAYOUT, QUEUED_JOB_ID, REVISIONS,
                                                       SPEC, TOKEN, TOKEN_ID, WORKER_ID, rows)


@pytest.fixture
def sqlite_asset(revision, tmp_path):
    """A copy of ``upgrade_assets/<revision>.db`` (the asset itself is never written)."""
    path = tmp_path / "hmaopt.db"
    shutil.copyfile(make_assets.HERE / f"{revision}.db", path)
    yield f"sqlite:///{path}"
    dispose_engines()


@pytest.mark.parametrize("revision", REVISIONS)
def test_upgrade_saved_sqlite_database(sqlite_asset, revision):
    _upgrade_and_read(sqlite_asset, revision)


@pytest.mark.parametrize("revision", REVISIONS)
def test_upgrade_postgresql_database_at_revision(pg_url, revision):
    make_assets.build(pg_url, revision)
    _upgrade_and_read(pg_url, revision)


def _upgrade_and_read(url: str, revision: str) -> None:
    assert current_revision(url) == revision
    with pytest.raises(DependencyUnavailableError, match=f"is at revision {revision}"):
        check_schema(url)  # the service refuses an old schema until it is upgraded

    assert upgrade(url) == (revision, head_revision())
    check_schema(url)
    assert schema_diff(url) == []  # the old database now has exactly the models' tables
    assert upgrade(url) == (head_revision(), head_revision())

    saved = rows(revision)
    job_row = saved["hmaopt_jobs"][0]
    with session_scope(url) as s:
        job = job_db.get_job(s, JOB_ID)
        detail = job_summary(job, detail=True)
        assert (detail.status, detail.name, detail.submitted_by) == ("succeeded", SPEC["name"],
                                                                     "ci-operator")
        assert detail.spec == SPEC and detail.result == job_row["result"]
        assert detail.created_at == job_row["created_at"]  # timezone-aware UTC, as written
        assert detail.finished_at == job_row["finished_at"]
        assert (detail.best.trial, detail.best.reward, detail.best.ratios) == (
            1, 0.74, {"block0": 0.35, "block1": 0.8})
        assert (detail.baseline.ratio, detail.baseline.reward) == (0.5, 0.61)
        assert detail.gain == pytest.approx(0.13)
        assert detail.budget == 0.05
        assert (detail.export.status, detail.export.dir) == ("succeeded",
                                                             job_row["export_dir"])
        assert detail.export.manifest == job_row["export_manifest"]
        assert detail.layout == (LAYOUT if revision >= "0002" else None)

        jobs, count = job_db.list_jobs(s)
        assert count == 2 and [j.id for j in jobs] == [QUEUED_JOB_ID, JOB_ID]
        assert job_summary(jobs[0]).progress.trials_finished == 0

        trials, count = job_db.list_trials(s, JOB_ID)
        assert count == 3
        public = [trial_public(t) for t in trials]
        assert [(t.number, t.kind, t.state, t.feasible) for t in public] == [
            (0, "uniform", "complete", True), (1, "search", "complete", True),
            (2, "search", "pruned", False)]
        assert [t.ratios for t in public] == [r["ratios"] for r in saved["hmaopt_trials"]]
        assert public[2].reward is None and public[0].uniform_ratio == 0.5
        assert public[0].finished_at == saved["hmaopt_trials"][0]["finished_at"]
        assert job_db.best_trial(s, JOB_ID).number == 1
        assert [t.number for t in job_db.pareto_trials(s, JOB_ID)] == [0, 1]

        token = token_db.authenticate(s, TOKEN)
        assert (token.id, token.role, token.revoked_at) == (TOKEN_ID, "operator", None)
        worker = s.get(Worker, WORKER_ID)
        assert (worker.name, worker.state, worker.pid) == ("gpu0", "stopped", 4242)
        assert worker_db.alive(s) == []

    with session_scope(url) as s:  # the old rows take the new code's writes
        again, created = job_db.create_job(s, SPEC, n_trials=3, token_id=TOKEN_ID,
                                           idempotency_key="nightly-1")
        assert (again.id, created) == (JOB_ID, False)  # the saved request hash still matches
        assert not job_db.add_trial(s, JOB_ID, **_trial_fields(saved, 1))  # counted once
        assert job_db.add_trial(s, QUEUED_JOB_ID, **_trial_fields(saved, 0))
        job = job_db.refresh_progress(s, JOB_ID)  # recomputed from the saved trials
        assert (job.trials_finished, job.trials_pruned, job.best_trial, job.baseline_reward) == (
            3, 1, 1, 0.61)
        job_db.request_cancel(s, QUEUED_JOB_ID)
    with session_scope(url) as s:
        assert job_db.get_job(s, QUEUED_JOB_ID).status == "cancelled"
        assert job_db.list_trials(s, QUEUED_JOB_ID)[1] == 1


def _trial_fields(saved: dict, number: int) -> dict:
    row = dict(saved["hmaopt_trials"][number])
    del row["job_id"]
    return row
