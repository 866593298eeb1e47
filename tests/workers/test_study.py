"""workers/study.py: the one function that fails the trials dead workers left RUNNING."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from workers.study import fail_stale_trials, load_study, storage_at, study_name


def _running(study, worker=None):
    trial = study.ask()
    if worker is not None:
        trial.set_user_attr("worker", worker)
    return trial


def test_dead_owners_fail_live_ones_are_left_and_unowned_ones_wait_for_the_stale_limit(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    study = optuna.create_study(storage=storage_at(url), study_name=study_name("j"))
    dead, live, fresh = _running(study, "w-dead"), _running(study, "w-live"), _running(study)
    done = _running(study, "w-dead")
    study.tell(done, 1.0)  # finished trials are never touched
    failed, left = fail_stale_trials(study, lambda w: w == "w-dead", stale_seconds=60)
    assert [t.number for t in failed] == [dead.number]
    assert left == 2  # the live worker's and the one not yet attributed
    states = {t.number: t.state for t in study.get_trials()}
    assert states == {dead.number: TrialState.FAIL, live.number: TrialState.RUNNING,
                      fresh.number: TrialState.RUNNING, done.number: TrialState.COMPLETE}
    # an unattributed trial older than the stale limit is a dead worker's too
    failed, left = fail_stale_trials(study, lambda w: False, stale_seconds=-1)
    assert [t.number for t in failed] == [fresh.number] and left == 1
    # a second pass finds nothing more to fail
    assert fail_stale_trials(study, lambda w: w == "w-dead", stale_seconds=60) == ([], 1)


def test_load_study_of_a_job_never_started_is_none(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert load_study("nope", url) is None
    optuna.create_study(storage=storage_at(url), study_name=study_name("yes"))
    assert load_study("yes", url).study_name == "hmaopt:yes"
