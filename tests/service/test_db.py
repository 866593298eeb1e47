"""The data layer on SQLite and PostgreSQL: migrations, the schema check, queries."""

from __future__ import annotations

import pytest

from service.db import jobs as job_db
from service.db import session_scope
from service.db.migrate import check_schema, head_revision, schema_diff, upgrade
from service.errors import ConflictError, DependencyUnavailableError


def test_upgrade_from_empty_matches_the_models(db_url):
    with pytest.raises(DependencyUnavailableError, match="run `hmaopt db upgrade`"):
        check_schema(db_url)
    assert upgrade(db_url) == (None, head_revision())
    check_schema(db_url)
    assert schema_diff(db_url) == []  # the migrations build exactly the models' tables
    assert upgrade(db_url) == (head_revision(), head_revision())  # idempotent


def test_optuna_shares_the_database(db_url):
    import optuna
    from sqlalchemy import inspect

    from service.db.session import get_engine

    upgrade(db_url)
    optuna.create_study(storage=db_url, study_name="hmaopt:x")
    tables = set(inspect(get_engine(db_url)).get_table_names())
    assert {"studies", "trials", "alembic_version"} <= tables  # Optuna's own
    assert {"hmaopt_jobs", "hmaopt_trials", "hmaopt_alembic_version"} <= tables
    check_schema(db_url)
    assert schema_diff(db_url) == []


def _job(session, **kw):
    spec = {"name": "j", "tax": {"budget": 0.1}, "base_model": "b", "aligned_model": "a"}
    return job_db.create_job(session, spec, n_trials=8, **kw)


def _trial(number, reward, tax, kind="search", feasible=True, **kw):
    return dict(number=number, kind=kind, state="complete", ratios={"block0": 0.5},
                reward=reward, tax=tax, feasible=feasible, stage=2, metrics={}, task_tax={},
                uniform_ratio=0.5 if kind == "uniform" else None, merge_seconds=0.0,
                eval_seconds=0.1, **kw)


def test_trials_recorded_once_and_progress(db_url):
    upgrade(db_url)
    with session_scope(db_url) as s:
        job, created = _job(s)
        assert created
        assert job_db.add_trial(s, job.id, **_trial(0, 1.0, 0.0, kind="uniform"))
        assert not job_db.add_trial(s, job.id, **_trial(0, 9.0, 0.0, kind="uniform"))
        job_db.add_trial(s, job.id, **_trial(1, 3.0, 0.05))
        job_db.add_trial(s, job.id, **_trial(2, 5.0, 0.30, feasible=False))
        job = job_db.refresh_progress(s, job.id)
        assert job.trials_finished == 3
        assert (job.best_trial, job.best_reward, job.baseline_reward) == (1, 3.0, 1.0)
        assert job.gain == pytest.approx(2.0)
        rows, total = job_db.list_trials(s, job.id, sort="reward", desc=True, limit=2)
        assert total == 3 and [r.number for r in rows] == [2, 1]
        assert [t.number for t in job_db.pareto_trials(s, job.id)] == [0, 1]


def test_idempotency_finalizer_and_run_counter(db_url):
    upgrade(db_url)
    with session_scope(db_url) as s:
        first, _ = _job(s, token_id="t1", idempotency_key="k")
        again, created = _job(s, token_id="t1", idempotency_key="k")
        assert again.id == first.id and not created
        other, created = _job(s, token_id="t2", idempotency_key="k")  # keys are per token
        assert created and other.id != first.id
        with pytest.raises(ConflictError, match="another job spec"):
            job_db.create_job(s, {"name": "other", "tax": {"budget": 1}}, n_trials=3,
                              token_id="t1", idempotency_key="k")
        assert job_db.count_runs(s, first.id, 2) == 2
        assert job_db.count_runs(s, first.id, 1) == 3
        from service.db import workers as worker_db

        w1 = worker_db.register(s, device="cpu", name="w1").id
        w2 = worker_db.register(s, device="cpu", name="w2").id
        assert job_db.claim_finalizer(s, first.id, w1)
        assert not job_db.claim_finalizer(s, first.id, w2)  # w1 is alive: it writes
        assert worker_db.declare_dead(s, w1)
        assert job_db.claim_finalizer(s, first.id, w2)  # a dead holder's claim is taken over
        job_db.release_finalizer(s, first.id, w2)
        assert job_db.get_job(s, first.id).finalizer is None


def test_db_upgrade_command(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env["HMAOPT_HOME"] = str(tmp_path)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "service.cli", *args], env=env,
                              capture_output=True, text=True)

    assert run("db", "current").returncode == 6  # not upgraded: unavailable, as check_schema
    first = run("db", "upgrade")
    assert first.returncode == 0 and "upgraded: empty -> " in first.stdout
    assert "nothing to do" in run("db", "upgrade").stdout
    assert run("db", "current").returncode == 0
    token = run("token", "create", "--role", "viewer", "--name", "ci")
    assert token.returncode == 0 and token.stdout.strip().startswith("hmaopt_")
    assert len(token.stdout.strip().splitlines()) == 1  # the token alone on its line
    listed = run("token", "list").stdout
    assert "viewer" in listed and token.stdout.strip() not in listed


def test_state_columns_store_plain_values_and_refuse_others(db_url):
    from sqlalchemy import text
    from sqlalchemy.exc import StatementError

    from service.status import JobStatus

    upgrade(db_url)
    with session_scope(db_url) as s:
        job, _ = _job(s)
        assert job_db.set_status(s, job.id, JobStatus.RUNNING)
        s.commit()
        raw = s.execute(text("SELECT status FROM hmaopt_jobs WHERE id = :i"),
                        {"i": job.id}).scalar()
        assert raw == "running" and type(raw) is str  # the value as stored before the enums
        s.expire_all()
        assert job_db.get_job(s, job.id).status is JobStatus.RUNNING
    with pytest.raises(StatementError, match="'done' is not a valid JobStatus"), \
            session_scope(db_url) as s:
        job_db.get_job(s, job.id).status = "done"
        s.flush()


def _pipeline_spec(name="nightly", cron="0 2 * * *"):
    return {"name": name, "schedule": {"cron": cron, "timezone": "UTC"}}


def test_pipeline_queries(db_url):
    from datetime import UTC, datetime, timedelta

    from service.db import pipelines as pipe_db
    from service.errors import NotFoundError
    from service.status import PipelineRunStatus

    upgrade(db_url)
    now = datetime(2026, 1, 1, 12, tzinfo=UTC)
    with session_scope(db_url) as s:
        p = pipe_db.create_pipeline(s, _pipeline_spec(), token_id=None, created_by="t", now=now)
        other = pipe_db.create_pipeline(s, _pipeline_spec("other"), token_id=None,
                                        created_by="t", now=now)
        assert p.next_due_at == datetime(2026, 1, 2, 2, tzinfo=UTC)
        s.commit()
        with pytest.raises(ConflictError, match="a pipeline named 'nightly' exists"):
            pipe_db.create_pipeline(s, _pipeline_spec(), token_id=None, created_by="t")
        with pytest.raises(ConflictError, match="'other' exists"):  # a rename onto a name
            pipe_db.update_pipeline(s, "nightly", _pipeline_spec("other"))
        s.rollback()
        renamed = pipe_db.update_pipeline(s, p.id, _pipeline_spec("nightly2", "0 3 * * *"),
                                          now=now)
        assert (renamed.name, renamed.next_due_at) == ("nightly2",
                                                       datetime(2026, 1, 2, 3, tzinfo=UTC))
        # paused: not due; resumed: from the next time after now, not the passed ones
        assert pipe_db.set_paused(s, "nightly2", True).paused
        assert pipe_db.due_pipelines(s, now + timedelta(days=2)) == [
            (other.id, other.spec["schedule"], other.next_due_at)]
        later = now + timedelta(days=3)
        assert pipe_db.set_paused(s, "nightly2", False, now=later).next_due_at == \
            datetime(2026, 1, 5, 3, tzinfo=UTC)
        # the next time moves once: a second scheduler that saw the old time leaves it
        seen = other.next_due_at
        pipe_db.advance_due(s, other.id, seen, later)
        moved = pipe_db.pipeline_by_id(s, other.id).next_due_at
        pipe_db.advance_due(s, other.id, seen, later + timedelta(days=5))
        assert pipe_db.pipeline_by_id(s, other.id).next_due_at == moved
        # runs belong to their pipeline
        run = pipe_db.claim_run(s, other.id, seen, "schedule")
        assert run.status is PipelineRunStatus.PENDING
        assert pipe_db.claim_run(s, other.id, seen, "schedule") is None  # claimed once
        assert pipe_db.get_pipeline_run(s, "other", run.id).id == run.id
        with pytest.raises(NotFoundError, match="pipeline nightly2 has no run"):
            pipe_db.get_pipeline_run(s, "nightly2", run.id)
        assert pipe_db.move_run(s, run.id, PipelineRunStatus.PENDING, PipelineRunStatus.STARTING)
        assert not pipe_db.move_run(s, run.id, PipelineRunStatus.PENDING,
                                    PipelineRunStatus.FAILED)
        # rollbacks requested, then cleared
        pipe_db.pipeline_by_id(s, other.id).rollback_requested_at = later
        assert pipe_db.rollbacks_requested(s) == [other.id]
        pipe_db.clear_rollback(s, other.id)
        assert pipe_db.rollbacks_requested(s) == []
        pipe_db.delete_pipeline(s, "other")
        with pytest.raises(NotFoundError, match="no pipeline 'other'"):
            pipe_db.get_pipeline(s, "other")
        assert pipe_db.find_run(s, run.id) is None


def test_webhook_delivery_queries(db_url):
    from datetime import UTC, datetime, timedelta

    from service.db import webhooks as hook_db
    from service.status import DeliveryStatus

    upgrade(db_url)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    with session_scope(db_url) as s:
        first = hook_db.add_delivery(s, pipeline_id="p", run_id=None, event="run.started",
                                     msg_id="msg_1", url="https://x", payload={}, now=now)
        later = hook_db.add_delivery(s, pipeline_id="p", run_id=None, event="run.started",
                                     msg_id="msg_2", url="https://x", payload={},
                                     now=now + timedelta(hours=1))
        s.flush()
        assert first.status is DeliveryStatus.PENDING
        assert hook_db.due_deliveries(s, now) == [first.id]
        assert hook_db.lock_delivery(s, first.id) is first
        first.status = DeliveryStatus.DELIVERED
        assert hook_db.due_deliveries(s, now + timedelta(hours=2)) == [later.id]
        assert [d.id for d in hook_db.list_deliveries(s, "p")] == [later.id, first.id]
