"""`hmaopt demo`, the README's main job, end to end on the embedded default."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys


def test_demo_runs_the_world_job_over_rest(tmp_path, world):
    shutil.copytree(world, tmp_path / "demo" / "world")  # the cached world: no rebuild
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("HMAOPT_") and k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(HF_HUB_OFFLINE="1", HMAOPT_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "service.cli", "demo", "--dir",
                           str(tmp_path / "demo"), "--no-progress"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout
    assert "reusing the reference world" in proc.stdout
    assert "embedded stack up" in proc.stderr and "submitted job" in proc.stderr
    assert "best ratios" in proc.stdout and "gain" in proc.stdout
    # the job's dashboard page, how to sign in, and that the page stops with the demo
    page = re.search(r"dashboard: (http://127\.0\.0\.1:\d+/ui/jobs/(\w+)) was up while the "
                     r"demo ran; its server stops now", proc.stdout)
    assert page, proc.stdout
    job_id = page.group(2)
    token_file = tmp_path / "demo" / "service" / "demo.token"
    assert f"sign in with the token in {token_file}" in proc.stdout
    assert f"HMAOPT_HOME={tmp_path / 'demo' / 'service'} hmaopt serve" in proc.stdout
    assert "/v1/jobs/" not in proc.stdout + proc.stderr  # no JSON endpoint for a person
    assert f"watch it live at {page.group(1)}" in proc.stderr
    # the study is in the embedded SQLite file, readable by Optuna
    import optuna

    db = tmp_path / "demo" / "service" / "hmaopt.db"
    study = optuna.load_study(study_name=f"hmaopt:{job_id}", storage=f"sqlite:///{db}")
    finished = [t for t in study.trials if t.state.is_finished() and t.state.name != "FAIL"
                and not t.user_attrs.get("answer_stage")]  # the answer stage's: past the cap
    assert len(finished) == 40
    assert study.user_attrs["result"]["feasible"]
    # everything it started has stopped
    assert not (tmp_path / "demo" / "service" / "redis.url").exists()


def test_a_local_worker_starts_from_a_folder_holding_a_service_folder(tmp_path):
    """`hmaopt demo --dir .` puts service/ (with valkey/ in it) in the working directory: the
    worker's command must still import the installed package, not that folder."""
    from service.embedded import worker_command

    (tmp_path / "service" / "valkey").mkdir(parents=True)
    proc = subprocess.run(worker_command("--help"), cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "worker" in proc.stdout
