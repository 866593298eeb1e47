"""The CLI's REST commands (submit, jobs, pipeline) against a real server: every error class
exits with its one code in every command that can meet it (service/errors.py, ExitCode),
--json output and JSON errors, the dashboard link, and the jobs commands over a real worker.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
import yaml

from service.cli import main
from service.errors import ExitCode
from tests.service.conftest import _running_stack

#: valid as a spec, never run (sent with --server-paths: nothing is resolved here)
MINIMAL_SPEC = {"name": "x", "base_model": "b", "aligned_model": "a",
                "reward": {"type": "preference", "data": "p.jsonl"},
                "tax": {"budget": 0.1, "tasks": [{"name": "t", "type": "perplexity",
                                                  "data": "t.jsonl"}]}}


@pytest.fixture
def server(redis_url, tmp_path, roots):
    """The API on SQLite (these tests are about the client side) with a token per role."""
    yield from _running_stack(f"sqlite:///{tmp_path / 'hmaopt.db'}", redis_url, tmp_path, roots)


def cli(capsys, *args) -> tuple[int, str, str]:
    """``hmaopt ARGS`` through the CLI's own main (in this process, for speed)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return int(code), out, err


def hmaopt(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there once the socket is closed


@pytest.fixture
def files(tmp_path, tiny_spec, roots) -> dict:
    models, _ = roots
    (models / "rlhf").mkdir()
    spec = tmp_path / "minimal.yaml"
    spec.write_text(yaml.safe_dump(MINIMAL_SPEC))
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({
        "name": "nightly", "job": tiny_spec, "schedule": {"cron": "0 2 * * *"},
        "aligned": {"dir": str(models / "rlhf")}, "promote": {"dir": str(models / "p")}}))
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps(tiny_spec))
    return {"spec": spec, "pipeline": pipeline, "tiny": tiny}


def remote_commands(files, job="nope", pipeline="nightly") -> dict[str, list]:
    """Every command that talks to a server, with the arguments it needs."""
    return {
        "submit": ["submit", files["spec"], "--server-paths"],
        "jobs list": ["jobs", "list"],
        "jobs show": ["jobs", "show", job],
        "jobs trials": ["jobs", "trials", job],
        "jobs cancel": ["jobs", "cancel", job],
        "jobs export": ["jobs", "export", job, "--dir", "out"],
        "pipeline create": ["pipeline", "create", files["pipeline"]],
        "pipeline list": ["pipeline", "list"],
        "pipeline trigger": ["pipeline", "trigger", pipeline],
        "pipeline runs": ["pipeline", "runs", pipeline],
        "pipeline rollback": ["pipeline", "rollback", pipeline],
    }


OPERATOR_COMMANDS = {"submit", "jobs cancel", "jobs export", "pipeline create",
                     "pipeline trigger", "pipeline rollback"}


def _json_error(err: str) -> dict:
    return json.loads(err.strip().splitlines()[-1])


def test_an_unreachable_server_exits_6_from_every_command(capsys, files):
    url = closed_port_url()
    for name, args in remote_commands(files).items():
        code, out, err = cli(capsys, *args, "--server", url, "--token", "t")
        assert code == ExitCode.UNAVAILABLE == 6, (name, err)
        assert f"cannot reach the hmaopt server at {url}" in err and "Traceback" not in err
        code, out, err = cli(capsys, *args, "--server", url, "--token", "t", "--json")
        assert code == 6 and out == "", name
        assert _json_error(err) == {"error": "unavailable", "message": _json_error(err)["message"],
                                    "field": None, "exit_code": 6}


def test_tokens_exit_5_from_every_command(capsys, server, files):
    for name, args in remote_commands(files).items():
        for token, error in (("hmaopt_wrong", "unknown or revoked API token"),
                             (None, "needs an API token")):
            extra = ["--token", token] if token else []
            code, _, err = cli(capsys, *args, "--server", server.url, *extra, "--json")
            body = _json_error(err)
            assert (code, body["error"], body["exit_code"]) == (5, "unauthenticated", 5), \
                (name, token, err)
            assert error in body["message"] and "--token or HMAOPT_TOKEN" in body["message"]
        code, _, err = cli(capsys, *args, "--server", server.url,
                           "--token", server.tokens["viewer"])
        if name in OPERATOR_COMMANDS:  # a viewer may read, not act
            assert code == ExitCode.AUTH and "needs the operator role" in err, (name, err)
        else:
            assert code in (0, ExitCode.NOT_FOUND), (name, err)


def test_missing_jobs_and_pipelines_exit_3(capsys, server, files):
    commands = remote_commands(files)
    for name in ("jobs show", "jobs trials", "jobs cancel", "jobs export", "pipeline trigger",
                 "pipeline runs", "pipeline rollback"):
        code, out, err = cli(capsys, *commands[name], "--server", server.url,
                             "--token", server.tokens["admin"], "--json")
        assert (code, _json_error(err)["error"]) == (ExitCode.NOT_FOUND, "not_found"), (name, err)
        assert out == ""
    code, out, err = cli(capsys, "jobs", "list", "--server", server.url,
                         "--token", server.tokens["viewer"])
    assert (code, out, err.strip()) == (0, "", "no jobs")


def test_the_same_invalid_spec_exits_2_from_search_and_submit(capsys, server, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**MINIMAL_SPEC, "tax": {"budget": -1, "tasks": []}}))
    for args in (["search", bad], ["submit", bad, "--server", server.url, "--token",
                                   server.tokens["operator"]]):
        code, _, err = cli(capsys, *args)
        assert code == ExitCode.SPEC == 2, (args, err)
        assert "tax.budget: Input should be greater than or equal to 0" in err
        code, _, err = cli(capsys, *args, "--json")
        assert _json_error(err) == {
            "error": "invalid_spec", "field": "tax.budget", "exit_code": 2,
            "message": "tax.budget: Input should be greater than or equal to 0"}
    # the server's own 422 (a query out of range, a bad pipeline spec) is the same class
    op = ["--server", server.url, "--token", server.tokens["operator"]]
    assert cli(capsys, "jobs", "list", "--limit", 100000, *op)[0] == 2
    assert cli(capsys, "jobs", "trials", "some-job", "--limit", 100000, *op)[0] == 2
    pipe = tmp_path / "p.yaml"
    pipe.write_text(yaml.safe_dump({"name": "p", "job": MINIMAL_SPEC,
                                    "schedule": {"cron": "whenever"}}))
    code, _, err = cli(capsys, "pipeline", "create", pipe, *op)
    assert code == 2 and "Traceback" not in err


def test_usage_errors_exit_2_in_every_command(capsys):
    from service.cli import build_parser
    from tests.service.test_cli import _leaves

    for name, _ in _leaves(build_parser()):
        code, _, err = cli(capsys, *name.split(), "--no-such-flag")
        assert code == 2 and "hmaopt: error:" in err and "usage:" in err, (name, err)
        code, _, err = cli(capsys, *name.split(), "--no-such-flag", "--json")
        assert _json_error(err)["error"] == "usage" and _json_error(err)["exit_code"] == 2


def test_conflicts_exit_4_and_a_cancelled_wait_exits_12(capsys, server, files, tiny_spec):
    op = ["--server", server.url, "--token", server.tokens["operator"]]
    code, out, err = cli(capsys, "submit", files["tiny"], "--idempotency-key", "k1", *op)
    assert code == 0
    job_id = out.strip()
    assert f"dashboard: {server.url}/ui/jobs/{job_id}" in err and "API token" in err
    assert f"/v1/jobs/{job_id}" not in err  # the JSON endpoint is no place for a person
    other = files["tiny"].with_name("other.json")
    other.write_text(json.dumps({**tiny_spec, "name": "other"}))
    code, _, err = cli(capsys, "submit", other, "--idempotency-key", "k1", *op)
    assert code == ExitCode.CONFLICT == 4, err
    # no worker runs: a queued job is cancelled at once; a second cancel is a conflict
    code, out, _ = cli(capsys, "jobs", "cancel", job_id, *op, "--json")
    assert code == 0 and json.loads(out)["status"] == "cancelled"
    code, _, err = cli(capsys, "jobs", "cancel", job_id, *op)
    assert code == 4 and "Traceback" not in err
    code, out, _ = cli(capsys, "jobs", "show", job_id, *op)
    assert code == 0 and f"job {job_id}  tiny  cancelled" in out and "0/6 finished" in out
    code, _, err = cli(capsys, "jobs", "export", job_id, "--dir", "out", *op, "--json")
    assert code == 4 and "no feasible trial" in _json_error(err)["message"]
    # submit --wait follows a job that gets cancelled: exit 12, the job on stdout
    wait = subprocess.Popen([sys.executable, "-m", "service.cli", "submit", str(other),
                             "--wait", "--json", "--no-progress", *op],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    with server.client() as c:
        while not (jobs := c.get("/v1/jobs", params={"name": "other"}).json()["data"]):
            assert time.monotonic() < deadline and wait.poll() is None, wait.stderr.read()
            time.sleep(0.1)
        assert c.post(f"/v1/jobs/{jobs[0]['id']}/cancel").status_code == 200
    out, err = wait.communicate(timeout=60)
    assert wait.returncode == ExitCode.NO_RESULT == 12, err
    assert json.loads(out)["status"] == "cancelled"
    assert _json_error(err)["error"] == "no_result"


def test_a_pipeline_run_that_no_scheduler_advances_times_out(capsys, server, files):
    op = ["--server", server.url, "--token", server.tokens["operator"]]
    code, out, _ = cli(capsys, "pipeline", "create", files["pipeline"], *op, "--json")
    assert code == 0 and json.loads(out)["name"] == "nightly"
    code, _, err = cli(capsys, "pipeline", "trigger", "nightly", "--wait", "--timeout", 0.5, *op)
    assert code == ExitCode.UNAVAILABLE
    assert "still pending after 0 s (is a scheduler running? `hmaopt scheduler`, or the " \
           "embedded `hmaopt serve`)" in err
    code, out, _ = cli(capsys, "pipeline", "runs", "nightly", *op, "--json")
    assert code == 0 and json.loads(out)["count"] == 1


def _noisy_aligned(spec: dict, models) -> str:
    """A copy of the base model plus strong noise: every merge at ratio >= 0.5 raises the
    perplexity tax above 0."""
    import torch
    from safetensors.torch import load_file, save_file

    noisy = models / "noisy"
    shutil.copytree(spec["base_model"], noisy)
    weights = load_file(noisy / "model.safetensors")
    torch.manual_seed(0)
    save_file({k: v + torch.randn_like(v) * 2.0 for k, v in weights.items()},
              noisy / "model.safetensors", metadata={"format": "pt"})
    return str(noisy)


def test_jobs_commands_and_outcomes_over_a_real_worker(capsys, server, tiny_spec, roots,
                                                       tmp_path):
    models, data = roots
    op = ["--server", server.url, "--token", server.tokens["operator"]]
    # a job that fails at the worker: its data set is broken after it was admitted
    broken = data / "sets" / "broken.jsonl"
    shutil.copy(tiny_spec["reward"]["data"], broken)
    failing = tmp_path / "failing.json"
    failing.write_text(json.dumps({**tiny_spec, "name": "failing",
                                   "reward": {**tiny_spec["reward"], "data": str(broken)}}))
    wait = subprocess.Popen([sys.executable, "-m", "service.cli", "submit", str(failing),
                             "--wait", "--no-progress", *op],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    with server.client() as c:
        while not c.get("/v1/jobs").json()["count"]:
            assert time.monotonic() < deadline and wait.poll() is None, wait.stderr.read()
            time.sleep(0.1)
    broken.write_text("not json\n")
    server.start_worker()
    out, err = wait.communicate(timeout=300)
    assert wait.returncode == ExitCode.JOB_FAILED == 11, err + server.worker_log()[-3000:]
    assert "hmaopt: error: job " in err and " failed: " in err and "not valid JSON" in err

    feasible = tmp_path / "feasible.json"
    feasible.write_text(json.dumps({**tiny_spec, "search": {**tiny_spec["search"],
                                                            "n_trials": 4}}))
    proc = hmaopt("submit", feasible, "--wait", "--no-progress", *op)
    assert proc.returncode == 0, proc.stderr + server.worker_log()[-3000:]
    # queued, or further along when the submission was retried and its replay read the job later
    found = re.search(r"^job (\S+) (?:queued|running|succeeded)$", proc.stderr, re.MULTILINE)
    assert found, proc.stderr
    job_id = found.group(1)
    assert "best ratios" in proc.stdout
    assert f"dashboard: {server.url}/ui/jobs/{job_id}" in proc.stderr

    infeasible = tmp_path / "infeasible.json"
    infeasible.write_text(json.dumps({
        **tiny_spec, "name": "infeasible", "aligned_model": _noisy_aligned(tiny_spec, models),
        "ratio_bounds": [0.5, 1.0],
        "tax": {"budget": 0.0, "tasks": [t for t in tiny_spec["tax"]["tasks"]
                                         if t["type"] == "perplexity"]},
        "search": {**tiny_spec["search"], "n_trials": 3, "uniform_grid": [0.5, 1.0]}}))
    proc = hmaopt("submit", infeasible, "--wait", "--no-progress", "--json", *op)
    assert proc.returncode == ExitCode.NO_FEASIBLE == 10, proc.stderr
    assert json.loads(proc.stdout)["result"]["feasible"] is False
    assert _json_error(proc.stderr)["error"] == "no_feasible_merge"
    bad_job = json.loads(proc.stdout)["id"]

    # jobs list: a table, newest first, paged; --json is the API's page
    code, out, err = cli(capsys, "jobs", "list", *op)
    assert code == 0 and out.splitlines()[0].split()[:3] == ["ID", "NAME", "STATUS"]
    assert [line.split()[2] for line in out.splitlines()[1:]] == ["succeeded", "succeeded",
                                                                  "failed"]
    assert "jobs 1-3 of 3" in err
    code, out, err = cli(capsys, "jobs", "list", "--limit", 1, "--offset", 1, *op)
    assert len(out.splitlines()) == 2 and job_id in out
    assert "jobs 2-2 of 3; next page: --offset 2" in err
    code, out, _ = cli(capsys, "jobs", "list", "--status", "failed", *op, "--json")
    page = json.loads(out)
    assert page["count"] == 1 and page["data"][0]["name"] == "failing"
    code, out, _ = cli(capsys, "jobs", "list", "--limit", 1, "--all", *op, "--json")
    assert [j["name"] for j in json.loads(out)["data"]] == ["infeasible", "tiny", "failing"]

    # jobs show: the summary and the page; --json is GET /v1/jobs/{id} as is
    code, out, _ = cli(capsys, "jobs", "show", job_id, *op)
    assert code == 0 and f"job {job_id}  tiny  succeeded" in out
    assert f"dashboard   {server.url}/ui/jobs/{job_id}" in out and "best ratios" in out
    code, out, _ = cli(capsys, "jobs", "show", job_id, *op, "--json")
    with server.client("viewer") as c:
        assert json.loads(out) == c.get(f"/v1/jobs/{job_id}").json()

    # jobs trials: sorted and paged
    code, out, err = cli(capsys, "jobs", "trials", job_id, "--limit", 2, *op)
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:5] == ["#", "KIND", "STATE", "REWARD", "TAX"]
    assert "block0,block1" in lines[0] and len(lines) == 3
    assert "trials 1-2 of 4; next page: --offset 2" in err
    code, out, _ = cli(capsys, "jobs", "trials", job_id, "--sort", "reward", "--desc",
                       "--limit", 3, "--all", *op, "--json")
    page = json.loads(out)
    rewards = [t["reward"] for t in page["data"] if t["reward"] is not None]
    assert page["count"] == len(page["data"]) == 4 and rewards == sorted(rewards, reverse=True)

    # jobs export: written by the worker; again only with --overwrite
    target = models / "exports" / "tiny"
    code, out, err = cli(capsys, "jobs", "export", job_id, "--dir", target, "--wait", *op)
    assert code == 0 and (target / "hma_manifest.json").is_file(), err
    code, _, err = cli(capsys, "jobs", "export", job_id, "--dir", target, "--wait", *op)
    assert code == ExitCode.JOB_FAILED and "already exists" in err and "--overwrite" in err
    code, out, _ = cli(capsys, "jobs", "export", job_id, "--dir", target, "--wait",
                       "--overwrite", *op, "--json")
    assert code == 0 and json.loads(out)["status"] == "succeeded"
    code, _, err = cli(capsys, "jobs", "export", bad_job, "--dir", target, *op)
    assert code == ExitCode.CONFLICT and "no feasible trial" in err


def test_the_event_stream_resumes_after_the_last_event_and_gives_up(monkeypatch):
    """httpx-sse parses the stream; a dropped stream resumes with Last-Event-ID; a server
    gone for GIVE_UP_SECONDS is DependencyUnavailableError. The server here is a plain
    FastAPI app: hmaopt's own cannot be made to drop a stream on cue."""
    from fastapi import FastAPI, Header
    from fastapi.responses import StreamingResponse

    from service import client as client_module
    from service.client import Client
    import uvicorn

    from service.errors import DependencyUnavailableError

    app, seen = FastAPI(), []

    @app.get("/v1/jobs/{job_id}")
    def job(job_id: str):
        return {"id": job_id, "status": "running" if len(seen) < 2 else "succeeded"}

    @app.get("/v1/jobs/{job_id}/events")
    def events(job_id: str, last_event_id: str | None = Header(None)):
        seen.append(last_event_id)

        def first():  # a snapshot, a trial, a keep-alive; then the connection ends
            yield 'event: job\nretry: 3000\ndata: {"status": "running"}\n\n'
            yield 'event: trial\nid: 5-0\ndata: {"number": 0}\n\n'
            yield ": keep-alive\n\n"

        def second():
            yield 'event: job\ndata: {"status": "running"}\n\n'
            yield 'event: status\nid: 6-0\ndata: {"status": "succeeded"}\n\n'
        return StreamingResponse(first() if len(seen) == 1 else second(),
                                 media_type="text/event-stream")

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive()
        time.sleep(0.05)
    url = "http://127.0.0.1:%d" % server.servers[0].sockets[0].getsockname()[1]
    try:
        got = list(Client(url, "t").events("j1"))
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert seen == [None, "5-0"]
    assert got == [("job", {"status": "running"}), ("trial", {"number": 0}),
                   ("job", {"status": "running"}), ("status", {"status": "succeeded"})]
    monkeypatch.setattr(client_module, "GIVE_UP_SECONDS", 0.3)
    monkeypatch.setattr(client_module, "RECONNECT_SECONDS", 0.05)
    with pytest.raises(DependencyUnavailableError, match="lost the hmaopt server .* the job j1 "
                       "goes on: `hmaopt jobs show j1`"):
        list(Client(closed_port_url(), "t").events("j1"))
