"""API latency under load and queue pick-up latency of the service, against real back ends.

Starts, in a temporary folder:

- a fresh PostgreSQL database (``--pg-admin`` server, created here and dropped at the end),
  or with ``--sqlite`` a SQLite file; ``hmaopt db upgrade`` and ``hmaopt token create --role
  operator`` (the token is the last line of its stdout);
- a dedicated Redis database (``--redis-url``, default db 14), flushed before and after;
- the API as a real uvicorn server in its own process: ``hmaopt serve --workers 0`` with
  DATABASE_URL / REDIS_URL / HMAOPT_* set (so the load tool does not share its GIL);
- a tiny job spec (tests/models.py ``make_tiny_job``: random char-LM pair, small JSONL sets)
  whose models and data lie under HMAOPT_MODEL_ROOTS / HMAOPT_DATA_ROOTS.

Then measures:

1. Queue pick-up (first, while the database is small): one real ``hmaopt worker --device
   cpu`` process is started and left idle on the queue; one job runs to warm it up (discarded);
   then ``--pickups`` times: POST a job, and read afterwards (from the database, so polling
   costs nothing measured) when the worker moved the job to running (``started_at``: the
   pick-up) and when trial 0 of the Optuna study ``hmaopt:<job id>`` started (after loading
   the models, creating the study and measuring θ_base, which comes from the cache after the
   warm-up job: same models and sets). Both are counted from the moment the POST returned.
   The worker is stopped before the latency part.
2. API latency: ``GET /v1/jobs/{id}`` (a finished job with its result, or a queued one when
   the pick-up part is skipped) and ``POST /v1/jobs`` (each creates a job row and enqueues an
   RQ run: no worker runs, so the jobs just queue), each for ``--seconds`` at
   ``--connections`` concurrent clients on loopback, plus ``--serial-seconds`` at one client
   for reference. Load tool: ``wrk`` (a Lua ``done`` hook prints the percentiles) when
   installed, else an asyncio + httpx client (``--tool``; it runs in this process and costs
   far more CPU than wrk). wrk is a closed loop: each client sends its next request when the
   last one is answered, so at N clients the mean latency is N / throughput (Little's law).
   CPU seconds of the server's process group, of PostgreSQL, Redis and the load tool over each
   run are reported ("cores" = CPU seconds / wall seconds), with the server's CPU milliseconds
   per request, to show who used the machine's cores. ``--api-processes N`` (N > 1) runs
   ``uvicorn --factory service.api.app:create_app --workers N`` instead, as an experiment.
3. Open loop (between the GET and the POST runs): ``GET /v1/jobs/{id}`` at a fixed total rate
   over the same ``--connections`` clients, each on its own schedule (rate / clients per
   client, staggered), for ``--seconds``: at each ``--rate`` (default 100 req/s: 50
   dashboards polling twice a second) and at ``--capacity-fractions`` (default 0.5 and 0.8)
   of the closed-loop GET throughput just measured. The latency is counted from the scheduled
   send time, not from when the request went out, so a slow answer that delays the next
   requests of its client counts in theirs too (no coordinated omission, as in wrk2; Debian's
   wrk 4.1 has no rate option). The clients run in ``--client-processes`` separate processes
   (default 1), on raw asyncio streams (``--open-loop-client raw``, about 0.5 ms of CPU per
   request) or httpx (about 3.5 ms, too much on a 2-core machine shared with the server).
   Reported: the achieved rate (answers / seconds from the first scheduled send to the last
   answer; it falls short of the target when the server or the clients cannot keep up), the
   errors and the clients' own lag (sent - max(scheduled, previous answer)): its p99 should
   stay at a few ms, or the clients themselves are late.

Targets (the issue's): GET p99 under 50 ms at 50 clients; pick-up (status running) under 1 s.

    .venv/bin/python bench/bench_api.py [--sqlite] [--seconds 20] [--connections 50]
                                        [--pickups 5] [--rate 100 ...]
                                        [--capacity-fractions 0.5 0.8 ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from _common import machine_info, table, write_json  # bench/ is the script's folder

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # tests.models (make_tiny_job) lives at the repository root
    sys.path.insert(0, str(ROOT))

GET_P99_TARGET_MS = 50.0
PICKUP_TARGET_S = 1.0
CLK_TCK = os.sysconf("SC_CLK_TCK")

LUA = r"""
wrk.method = "%(method)s"
wrk.headers["Authorization"] = "Bearer %(token)s"
wrk.headers["Content-Type"] = "application/json"
%(body)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %%d, "duration_us": %%d, "bytes": %%d, "errors_connect": %%d, ' ..
    '"errors_read": %%d, "errors_write": %%d, "errors_status": %%d, "errors_timeout": %%d, ' ..
    '"p50_us": %%.1f, "p90_us": %%.1f, "p99_us": %%.1f, "mean_us": %%.1f, "max_us": %%.1f, ' ..
    '"min_us": %%.1f, "stdev_us": %%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max, latency.min, latency.stdev))
end
"""


# ------------------------------------------------------------------------------ helpers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_cpu_seconds(pgid: int) -> float:
    """utime + stime (all threads) of the live processes of a process group, plus the CPU of
    their children that ended and were waited for (cutime + cstime), in seconds."""
    total = 0.0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # field 5 of stat: the process group
            total += sum(int(v) for v in fields[11:15]) / CLK_TCK
    return total


def cpu_by_command(names: tuple[str, ...]) -> dict[str, float]:
    """CPU seconds so far of every process whose command name is one of ``names``, summed,
    with the CPU of their ended children (cutime + cstime): PostgreSQL's postmaster reaps its
    backends, so a backend that ends inside a window still counts."""
    out = dict.fromkeys(names, 0.0)
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            head, rest = (d / "stat").read_text().rsplit(")", 1)
        except OSError:
            continue
        comm = head.split("(", 1)[1]
        for n in names:
            if comm.startswith(n):
                f = rest.split()
                out[n] += sum(int(v) for v in f[11:15]) / CLK_TCK
    return out


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    vals = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    total = sum(vals[:8])
    return total - idle, total


class CpuMeter:
    """CPU seconds used over a window by the server (its process group), PostgreSQL, Redis, the load tool (a child
    process of this one) and the whole machine."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid

    def __enter__(self) -> CpuMeter:
        self.t0 = time.perf_counter()
        self.server0 = group_cpu_seconds(self.server_pid)
        self.cmd0 = cpu_by_command(("postgres", "redis-server"))
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.child0 = ru.ru_utime + ru.ru_stime
        me = resource.getrusage(resource.RUSAGE_SELF)
        self.self0 = me.ru_utime + me.ru_stime
        self.busy0 = machine_busy()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.t0
        cmd1 = cpu_by_command(("postgres", "redis-server"))
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        me = resource.getrusage(resource.RUSAGE_SELF)
        busy1 = machine_busy()
        ncpu = os.cpu_count() or 1
        self.result = {
            "wall_s": wall,
            "server_cpu_s": group_cpu_seconds(self.server_pid) - self.server0,
            "postgres_cpu_s": cmd1["postgres"] - self.cmd0["postgres"],
            "redis_cpu_s": cmd1["redis-server"] - self.cmd0["redis-server"],
            # the load tool: wrk (a finished child) or this process (the httpx fallback)
            "load_tool_cpu_s": (ru.ru_utime + ru.ru_stime - self.child0)
            + (me.ru_utime + me.ru_stime - self.self0),
            "machine_busy_cores": ncpu * (busy1[0] - self.busy0[0])
            / max(1, busy1[1] - self.busy0[1]),
        }


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, SIGKILL it after 20 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def percentile(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    k = min(len(sorted_vals) - 1, max(0, round(q / 100 * (len(sorted_vals) - 1))))
    return sorted_vals[k]


# ------------------------------------------------------------------------------ load tools

def run_wrk(url: str, *, method: str, token: str, body: str | None, seconds: float,
            connections: int, threads: int, workdir: Path) -> dict:
    script = workdir / f"wrk_{method.lower()}_{connections}.lua"
    body_lua = f"wrk.body = [==[{body}]==]" if body is not None else ""
    script.write_text(LUA % {"method": method, "token": token, "body": body_lua})
    cmd = ["wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{seconds:g}s",
           "--timeout", "10s", "--latency", "-s", str(script), url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}")
    raw = json.loads(line.removeprefix("BENCH_JSON "))
    errors = sum(raw[k] for k in raw if k.startswith("errors_"))
    return {"tool": "wrk", "command": shlex.join(cmd), "requests": raw["requests"],
            "duration_s": raw["duration_us"] / 1e6, "errors": errors,
            "errors_detail": {k.removeprefix("errors_"): raw[k] for k in raw
                              if k.startswith("errors_")},
            "p50_ms": raw["p50_us"] / 1e3, "p90_ms": raw["p90_us"] / 1e3,
            "p99_ms": raw["p99_us"] / 1e3, "mean_ms": raw["mean_us"] / 1e3,
            "max_ms": raw["max_us"] / 1e3, "min_ms": raw["min_us"] / 1e3,
            "rps": raw["requests"] / (raw["duration_us"] / 1e6),
            "wrk_stdout": proc.stdout}


def run_httpx(url: str, *, method: str, token: str, body: str | None, seconds: float,
              connections: int, **_) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    content = body.encode() if body is not None else None
    lat: list[float] = []
    errors = {"status": 0, "exception": 0}

    async def client_task(client, deadline):
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                r = await client.request(method, url, content=content)
                if r.status_code >= 400:
                    errors["status"] += 1
            except httpx.HTTPError:
                errors["exception"] += 1
                continue
            lat.append(time.perf_counter() - t0)

    async def main():
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        async with httpx.AsyncClient(headers=headers, limits=limits, timeout=10) as client:
            t0 = time.perf_counter()
            await asyncio.gather(*(client_task(client, t0 + seconds)
                                   for _ in range(connections)))
            return time.perf_counter() - t0

    duration = asyncio.run(main())
    s = sorted(lat)
    return {"tool": "httpx (asyncio)", "command": f"asyncio+httpx {connections} tasks, {seconds} s",
            "requests": len(s), "duration_s": duration, "errors": sum(errors.values()),
            "errors_detail": errors, "p50_ms": percentile(s, 50) * 1e3,
            "p90_ms": percentile(s, 90) * 1e3, "p99_ms": percentile(s, 99) * 1e3,
            "mean_ms": statistics.fmean(s) * 1e3 if s else float("nan"),
            "max_ms": s[-1] * 1e3 if s else float("nan"),
            "min_ms": s[0] * 1e3 if s else float("nan"), "rps": len(s) / duration}


# ------------------------------------------------------------------------------ open loop

OPEN_LOOP_FLAG = "--open-loop-client"  # argv[1] of a client process (internal)


class _RawConnection:
    """One keep-alive HTTP/1.1 connection on asyncio streams, for the open-loop clients: the
    request bytes are built once and the answer is read by its Content-Length (what uvicorn
    sends for these JSON responses). About a tenth of httpx's CPU per request, which matters
    when the clients share a 2-core machine with the server."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    @staticmethod
    def request_bytes(url: str, method: str, headers: dict[str, str], body: str | None) -> bytes:
        from urllib.parse import urlsplit

        u = urlsplit(url)
        path = u.path + (f"?{u.query}" if u.query else "")
        lines = [f"{method} {path} HTTP/1.1", f"Host: {u.netloc}", *(f"{k}: {v}" for k, v
                                                                     in headers.items())]
        data = body.encode() if body is not None else b""
        if body is not None:
            lines.append(f"Content-Length: {len(data)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + data

    async def send(self, request: bytes) -> int:
        try:
            reused = self.writer is not None
            if not reused:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            self.writer.write(request)
            try:
                head = await self.reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionResetError) as exc:
                if not reused or getattr(exc, "partial", b""):
                    raise
                # the server closed the idle keep-alive connection: once more on a new one
                self.close()
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
                self.writer.write(request)
                head = await self.reader.readuntil(b"\r\n\r\n")
            length, close = 0, False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding":
                    raise ValueError("chunked answers are not supported")
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            await self.reader.readexactly(length)
            if close:
                self.close()
            return int(head[9:12])
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def open_loop_client(cfg: dict) -> dict:
    """Body of one open-loop client process: clients ``first`` .. ``first + count - 1`` of
    ``total``, one connection each, sequential requests. Client i sends its k-th request at
    ``t0 + i / rate + k * total / rate`` (time.monotonic, the same clock in every process), or
    as soon as its previous answer came back when that is later; the latency is counted from
    the scheduled time, so a late answer also delays (and counts in) the next ones, as in wrk2.
    ``cfg["client"]``: "raw" (asyncio streams, _RawConnection) or "httpx" (httpx.AsyncClient).
    """
    import gc
    from urllib.parse import urlsplit

    rate, total, t0, seconds = cfg["rate"], cfg["total"], cfg["t0"], cfg["seconds"]
    headers = {"Authorization": f"Bearer {cfg['token']}", "Content-Type": "application/json"}
    lat: list[float] = []      # done - scheduled (what a user waits)
    service: list[float] = []  # done - sent
    lag: list[float] = []      # sent - max(scheduled, previous done): this process's own delay
    errors = {"status": 0, "exception": 0}
    last_done = [t0]
    n = cfg["count"]

    if cfg["client"] == "raw":
        u = urlsplit(cfg["url"])
        conns = [_RawConnection(u.hostname, u.port) for _ in range(n)]
        request = _RawConnection.request_bytes(cfg["url"], cfg["method"], headers, cfg["body"])
        warm = _RawConnection.request_bytes(cfg["warm_url"], "GET", headers, None)
        senders = [lambda c=c: c.send(request) for c in conns]
        warmers = [lambda c=c: c.send(warm) for c in conns]
        client_errors: tuple = (OSError, EOFError, ValueError, asyncio.IncompleteReadError,
                                asyncio.LimitOverrunError, TimeoutError)
    else:
        import httpx

        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        client = httpx.AsyncClient(headers=headers, limits=limits, timeout=10)
        content = cfg["body"].encode() if cfg["body"] is not None else None

        async def send_httpx():
            return (await client.request(cfg["method"], cfg["url"], content=content)).status_code

        async def warm_httpx():
            return (await client.get(cfg["warm_url"])).status_code

        senders, warmers = [send_httpx] * n, [warm_httpx] * n
        client_errors = (httpx.HTTPError, TimeoutError)

    async def one_client(send, i: int) -> None:
        period = total / rate
        k, prev_done = 0, 0.0
        while True:
            sched = t0 + i / rate + k * period
            if sched >= t0 + seconds:
                return
            k += 1
            now = time.monotonic()
            if sched > now:
                await asyncio.sleep(sched - now)
            sent = time.monotonic()
            lag.append(sent - max(sched, prev_done))
            status = None
            try:
                async with asyncio.timeout(10):
                    status = await send()
            except client_errors:
                errors["exception"] += 1
            prev_done = time.monotonic()
            last_done[0] = max(last_done[0], prev_done)
            if status is not None and status < 400:
                lat.append(prev_done - sched)
                service.append(prev_done - sent)
            elif status is not None:
                errors["status"] += 1

    async def main() -> None:
        # open the connections before t0 (one GET /healthz each, not counted)
        await asyncio.gather(*(w() for w in warmers))
        gc.collect()
        gc.freeze()
        gc.disable()  # no collector pauses of the load tool inside the measured window
        cpu0 = time.process_time()
        out["late_start_s"] = time.monotonic() - t0
        await asyncio.gather(*(one_client(s, cfg["first"] + j) for j, s in enumerate(senders)))
        out["cpu_s"] = time.process_time() - cpu0
        gc.enable()
        if cfg["client"] == "raw":
            for c in conns:
                c.close()
        else:
            await client.aclose()

    out: dict = {}
    asyncio.run(main())
    out.update(lat=lat, service=service, lag=lag, errors=errors, last_done=last_done[0])
    return out


def run_open_loop(url: str, *, method: str, token: str, body: str | None, seconds: float,
                  connections: int, rate: float, processes: int, client: str, warm_url: str,
                  server_pid: int) -> dict:
    """GET/POST at a fixed total ``rate`` over ``connections`` clients in ``processes`` client
    processes (asyncio; ``client`` "raw" or "httpx"), for ``seconds``; latency from the
    scheduled send times."""
    lead = 3.0  # start-up of the client processes (imports, connections) before t0
    t0 = time.monotonic() + lead
    per = [connections // processes + (p < connections % processes) for p in range(processes)]
    procs, first = [], 0
    for count in per:
        cfg = {"url": url, "warm_url": warm_url, "method": method, "token": token, "body": body,
               "rate": rate, "total": connections, "first": first, "count": count, "t0": t0,
               "seconds": seconds, "client": client}
        first += count
        procs.append(subprocess.Popen([sys.executable, __file__, OPEN_LOOP_FLAG, json.dumps(cfg)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      cwd=ROOT))
    time.sleep(max(0.0, t0 - time.monotonic()))
    with CpuMeter(server_pid) as meter:
        outs = []
        for p in procs:
            stdout, stderr = p.communicate(timeout=seconds + 120)
            if p.returncode != 0:
                raise RuntimeError(f"open-loop client failed ({p.returncode}): {stderr[-3000:]}")
            outs.append(json.loads(stdout.splitlines()[-1]))
        t_end = max(o["last_done"] for o in outs)
    res = meter.result
    lat = sorted(x for o in outs for x in o["lat"])
    service = sorted(x for o in outs for x in o["service"])
    lag = sorted(x for o in outs for x in o["lag"])
    err = {k: sum(o["errors"][k] for o in outs) for k in ("status", "exception")}
    done = len(lat) + sum(err.values())
    duration = t_end - t0
    res.update({
        "tool": f"open loop: asyncio ({client}), {processes} client process(es)",
        "command": f"{connections} clients at {rate:g} req/s in total ({rate / connections:g} "
                   f"req/s each), {seconds:g} s, {processes} process(es)",
        "target_rps": rate, "requests": len(lat), "errors": sum(err.values()),
        "errors_detail": err, "duration_s": duration, "rps": done / duration,
        "p50_ms": percentile(lat, 50) * 1e3, "p90_ms": percentile(lat, 90) * 1e3,
        "p99_ms": percentile(lat, 99) * 1e3,
        "mean_ms": statistics.fmean(lat) * 1e3 if lat else float("nan"),
        "max_ms": lat[-1] * 1e3 if lat else float("nan"),
        "min_ms": lat[0] * 1e3 if lat else float("nan"),
        "service_p50_ms": percentile(service, 50) * 1e3,
        "service_p99_ms": percentile(service, 99) * 1e3,
        "client_lag_p99_ms": percentile(lag, 99) * 1e3,
        "client_lag_max_ms": lag[-1] * 1e3 if lag else float("nan"),
        "client_late_start_ms": max(o["late_start_s"] for o in outs) * 1e3,
        # the CPU the clients used inside the window (their own count; the meter's child
        # rusage would include their start-up)
        "load_tool_cpu_s": sum(o["cpu_s"] for o in outs),
        "client_processes": processes, "client": client})
    return res


# ------------------------------------------------------------------------------ the stack

class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="hmaopt-bench-api-"))
        self.pg_name: str | None = None
        self.server: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None

    # setup --------------------------------------------------------------------------------
    def setup(self) -> None:
        args = self.args
        if args.sqlite:
            self.db_url = f"sqlite:///{self.tmp / 'hmaopt.db'}"
        else:
            import psycopg

            self.pg_name = f"hmaopt_bench_{uuid.uuid4().hex[:10]}"
            with psycopg.connect(args.pg_admin, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{self.pg_name}"')
            host = args.pg_admin.split("://", 1)[1].rsplit("/", 1)[0]
            self.db_url = f"postgresql+psycopg://{host}/{self.pg_name}"
        self.redis_url = f"{args.redis_url.rstrip('/')}/{args.redis_db}"
        import redis

        self.redis = redis.Redis.from_url(self.redis_url)
        self.redis.flushdb()
        self.spec = self._tiny_spec()
        self.env = self._env()
        self._hmaopt("db", "upgrade")
        out = self._hmaopt("token", "create", "--role", "operator", "--name", "bench")
        self.token = out.strip().splitlines()[-1]
        self.port = args.port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        log = open(self.tmp / "server.log", "ab")
        if args.api_processes == 1:
            cmd = [sys.executable, "-m", "service.cli", "serve", "--workers", "0",
                   "--host", "127.0.0.1", "--port", str(self.port)]
        else:  # not what `hmaopt serve` does: uvicorn's own process manager, app factory
            cmd = [sys.executable, "-m", "uvicorn", "--factory", "service.api.app:create_app",
                   "--workers", str(args.api_processes), "--host", "127.0.0.1",
                   "--port", str(self.port), "--log-level", "warning", "--no-access-log"]
        self.server_cmd = cmd
        self.server = subprocess.Popen(
            cmd,
            env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            start_new_session=True)
        log.close()
        self._wait_http(f"{self.base}/v1/jobs?limit=1", timeout=60)

    def _tiny_spec(self) -> dict:
        from tests.models import make_tiny_job

        models, data = self.tmp / "models", self.tmp / "data"
        models.mkdir()
        data.mkdir()
        spec = make_tiny_job(models)
        (models / "data").rename(data / "sets")  # the data sets go under the data root
        old, new = str(models / "data"), str(data / "sets")
        for task in spec["tax"]["tasks"]:
            task["data"] = task["data"].replace(old, new)
        spec["reward"]["data"] = spec["reward"]["data"].replace(old, new)
        self.roots = (models, data)
        return spec

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("HMAOPT_") and k not in ("DATABASE_URL", "REDIS_URL")}
        models, data = self.roots
        env.update({"DATABASE_URL": self.db_url, "REDIS_URL": self.redis_url,
                    "HMAOPT_HOME": str(self.tmp / "home"),
                    "HMAOPT_MODEL_ROOTS": str(models), "HMAOPT_DATA_ROOTS": str(data),
                    "HMAOPT_CACHE_DIR": str(self.tmp / "cache"),
                    "HMAOPT_LOG_LEVEL": self.args.log_level, "HF_HUB_OFFLINE": "1",
                    "PYTHONPATH": str(ROOT)})
        return env

    def _hmaopt(self, *argv: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "service.cli", *argv], env=self.env,
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"hmaopt {' '.join(argv)} failed: {proc.stdout}{proc.stderr}")
        return proc.stdout

    def _wait_http(self, url: str, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            if self.server.poll() is not None:
                raise RuntimeError("the API server exited:\n" + self.log_tail("server.log"))
            try:
                r = httpx.get(url, headers=self.headers, timeout=2)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the API server did not answer:\n" + self.log_tail("server.log"))
            time.sleep(0.2)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def log_tail(self, name: str, n: int = 3000) -> str:
        path = self.tmp / name
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    # the database, read directly (no API load) --------------------------------------------
    def job_row(self, job_id: str) -> dict:
        from service.db import session_scope
        from service.db.models import Job

        with session_scope(self.db_url) as session:
            job = session.get(Job, job_id)
            return {"status": job.status, "created_at": job.created_at,
                    "started_at": job.started_at, "finished_at": job.finished_at,
                    "error": job.error}

    def wait_terminal(self, job_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            row = self.job_row(job_id)
            if row["status"] in ("succeeded", "failed", "cancelled"):
                return row
            if self.worker is not None and self.worker.poll() is not None:
                raise RuntimeError("the worker exited:\n" + self.log_tail("worker.log"))
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {job_id} still {row['status']} after {timeout} s:\n"
                                   + self.log_tail("worker.log"))
            time.sleep(0.1)

    def first_trial_start(self, job_id: str) -> float | None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name=f"hmaopt:{job_id}", storage=self.db_url)
        starts = [t.datetime_start for t in study.get_trials(deepcopy=False)
                  if t.datetime_start is not None]
        # Optuna stores naive local times (datetime.now()); .timestamp() reads them as local
        return min(starts).timestamp() if starts else None

    # the worker ---------------------------------------------------------------------------
    def start_worker(self) -> None:
        from rq import Worker

        env = dict(self.env, HMAOPT_LOG_LEVEL="INFO")
        log = open(self.tmp / "worker.log", "ab")
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker", "--device", "cpu", "--name", "bench"],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 120
        while not any(w.get_state() == "idle" for w in Worker.all(connection=self.redis)):
            if self.worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the worker did not start:\n" + self.log_tail("worker.log"))
            time.sleep(0.2)

    def wait_worker_idle(self, timeout: float = 30) -> None:
        from rq import Worker

        deadline = time.monotonic() + timeout
        while not any(w.get_state() == "idle" for w in Worker.all(connection=self.redis)):
            if time.monotonic() > deadline:
                raise RuntimeError("the worker is not idle:\n" + self.log_tail("worker.log"))
            time.sleep(0.1)

    def stop_worker(self) -> None:
        if self.worker is None:
            return
        _stop(self.worker)
        self.worker = None

    # teardown -----------------------------------------------------------------------------
    def teardown(self) -> None:
        self.stop_worker()
        if self.server is not None:
            _stop(self.server)
        try:
            from service.db.session import dispose_engines

            dispose_engines()
        except Exception:
            pass
        try:
            self.redis.flushdb()
        except Exception as exc:
            print(f"warning: Redis flush failed: {exc}", file=sys.stderr)
        if self.pg_name is not None:
            import psycopg

            with psycopg.connect(self.args.pg_admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.pg_name}" WITH (FORCE)')
        if self.args.keep:
            print(f"kept {self.tmp} (server.log, worker.log)")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # the measures -------------------------------------------------------------------------
    def submit(self, client) -> tuple[str, float, float]:
        t_sent = time.time()
        r = client.post("/v1/jobs", json=self.spec)
        t_back = time.time()
        if r.status_code != 201:
            raise RuntimeError(f"POST /v1/jobs: {r.status_code} {r.text[:2000]}")
        return r.json()["id"], t_sent, t_back

    def pickups(self) -> tuple[list[dict], str]:
        import httpx

        n = self.args.pickups
        self.start_worker()
        out = []
        with httpx.Client(base_url=self.base, headers=self.headers, timeout=30) as client:
            t0 = time.perf_counter()
            job_id, _, _ = self.submit(client)  # warm-up: imports, first load, θ_base cached
            row = self.wait_terminal(job_id, timeout=self.args.job_timeout)
            if row["status"] != "succeeded":
                raise RuntimeError(f"warm-up job {row['status']}: {row['error']}\n"
                                   + self.log_tail("worker.log"))
            print(f"  warm-up job {job_id}: {row['status']} in {time.perf_counter() - t0:.1f} s")
            for i in range(n):
                self.wait_worker_idle()
                time.sleep(self.args.idle_seconds)  # idle on the queue (blocking pop)
                job_id, t_sent, t_back = self.submit(client)
                row = self.wait_terminal(job_id, timeout=self.args.job_timeout)
                started = row["started_at"].timestamp() if row["started_at"] else None
                first = self.first_trial_start(job_id)
                done = row["finished_at"].timestamp() if row["finished_at"] else None
                rec = {"job_id": job_id, "status": row["status"], "post_s": t_back - t_sent,
                       "picked_up_s": None if started is None else started - t_back,
                       "picked_up_from_send_s": None if started is None else started - t_sent,
                       "first_trial_s": None if first is None else first - t_back,
                       "job_s": None if done is None else done - t_back}
                out.append(rec)
                print(f"  pick-up {i + 1}/{n}: job {job_id} {row['status']}; running after "
                      f"{_fmt_s(rec['picked_up_s'])}, trial 0 started after "
                      f"{_fmt_s(rec['first_trial_s'])}, done after {_fmt_s(rec['job_s'])} "
                      f"(POST took {rec['post_s'] * 1e3:.1f} ms)")
        self.stop_worker()
        return out, job_id

    def latency(self, name: str, url: str, method: str, body: str | None, seconds: float,
                connections: int) -> dict:
        tool = run_wrk if self.tool == "wrk" else run_httpx
        with CpuMeter(self.server.pid) as meter:
            res = tool(url, method=method, token=self.token, body=body, seconds=seconds,
                       connections=connections, threads=self.args.wrk_threads, workdir=self.tmp)
        res.update(meter.result, name=name, method=method, connections=connections,
                   seconds=seconds)
        if self.server.poll() is not None:
            raise RuntimeError("the API server died:\n" + self.log_tail("server.log"))
        print(f"  {name}: {res['requests']} requests, p50 {res['p50_ms']:.1f} ms, p99 "
              f"{res['p99_ms']:.1f} ms, {res['rps']:.0f} req/s, {res['errors']} errors; CPU s: "
              f"server {res['server_cpu_s']:.1f}, postgres {res['postgres_cpu_s']:.1f}, redis "
              f"{res['redis_cpu_s']:.1f}, load tool {res['load_tool_cpu_s']:.1f} "
              f"(machine busy {res['machine_busy_cores']:.2f} cores of {os.cpu_count()})")
        return res

    def open_loop(self, name: str, url: str, rate: float, seconds: float,
                  connections: int) -> dict:
        res = run_open_loop(url, method="GET", token=self.token, body=None, seconds=seconds,
                            connections=connections, rate=rate,
                            processes=self.args.client_processes,
                            client=self.args.open_loop_client,
                            warm_url=f"{self.base}/healthz", server_pid=self.server.pid)
        res.update(name=name, method="GET", connections=connections, seconds=seconds)
        if self.server.poll() is not None:
            raise RuntimeError("the API server died:\n" + self.log_tail("server.log"))
        print(f"  {name}: target {rate:.0f} req/s, achieved {res['rps']:.1f} req/s; p50 "
              f"{res['p50_ms']:.1f} ms, p99 {res['p99_ms']:.1f} ms, max {res['max_ms']:.1f} ms, "
              f"{res['errors']} errors; client lag p99 {res['client_lag_p99_ms']:.1f} ms; CPU s: "
              f"server {res['server_cpu_s']:.1f}, postgres {res['postgres_cpu_s']:.1f}, "
              f"clients {res['load_tool_cpu_s']:.1f} (machine busy "
              f"{res['machine_busy_cores']:.2f} cores of {os.cpu_count()})")
        return res


def _fmt_s(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.0f} ms" if abs(v) < 1 else f"{v:.2f} s"


# ------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sqlite", action="store_true",
                    help="a SQLite file instead of a fresh PostgreSQL database")
    ap.add_argument("--pg-admin", default="postgresql://postgres@127.0.0.1:5432/postgres",
                    help="PostgreSQL server where the benchmark database is created and dropped")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379",
                    help="Redis server (without a database index)")
    ap.add_argument("--redis-db", type=int, default=14,
                    help="Redis database index used, FLUSHED before and after (default 14)")
    ap.add_argument("--seconds", type=float, default=20, help="seconds of each loaded run")
    ap.add_argument("--serial-seconds", type=float, default=5,
                    help="seconds of each one-client reference run (0: skip)")
    ap.add_argument("--connections", type=int, default=50, help="concurrent clients")
    ap.add_argument("--tool", choices=["auto", "wrk", "httpx"], default="auto",
                    help="load tool (auto: wrk when installed, else asyncio + httpx)")
    ap.add_argument("--wrk-threads", type=int, default=2, help="wrk -t")
    ap.add_argument("--rate", type=float, nargs="*", default=[100.0],
                    help="open-loop GET runs at these total rates, req/s over --connections "
                    "clients (default 100: 50 dashboards polling twice a second; none: skip)")
    ap.add_argument("--capacity-fractions", type=float, nargs="*", default=[0.5, 0.8],
                    help="also open-loop GET runs at these fractions of the closed-loop GET "
                    "throughput at --connections measured just before (none: skip)")
    ap.add_argument("--client-processes", type=int, default=1,
                    help="processes the open-loop clients are spread over")
    ap.add_argument("--open-loop-client", choices=["raw", "httpx"], default="raw",
                    help="HTTP client of the open-loop runs: raw asyncio streams (default, "
                    "the cheaper) or httpx.AsyncClient")
    ap.add_argument("--pickups", type=int, default=5, help="pick-ups measured (0: skip)")
    ap.add_argument("--idle-seconds", type=float, default=1.0,
                    help="seconds the worker idles on the queue before each pick-up")
    ap.add_argument("--job-timeout", type=float, default=300,
                    help="seconds a pick-up job may take to finish")
    ap.add_argument("--api-processes", type=int, default=1,
                    help="1 (default): `hmaopt serve --workers 0`, one uvicorn process; N > 1: "
                    "`python -m uvicorn --factory service.api.app:create_app --workers N` "
                    "(an experiment: hmaopt serve has no such option)")
    ap.add_argument("--port", type=int, default=0, help="API port (default: a free one)")
    ap.add_argument("--log-level", default="WARNING",
                    help="HMAOPT_LOG_LEVEL of the server (WARNING, the default, has no "
                    "access log)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    command = shlex.join([os.path.relpath(sys.executable, Path.cwd())
                          if sys.executable.startswith(str(Path.cwd())) else sys.executable,
                          *sys.argv])
    tool = args.tool
    if tool == "auto":
        tool = "wrk" if shutil.which("wrk") else "httpx"
    elif tool == "wrk" and not shutil.which("wrk"):
        ap.error("wrk is not installed (apt-get install wrk), use --tool httpx")

    info = machine_info(with_torch=False)
    print("hmaopt bench_api: API latency and queue pick-up")
    print(f"  command  : {command}")
    print(f"  machine  : {info['cpu']}, {info['cpu_count']} cores, "
          f"{(info['mem_total_bytes'] or 0) / 2**30:.1f} GiB; load average "
          f"{', '.join(f'{x:.2f}' for x in info['loadavg'])}; Python {info['python']}; code "
          f"{info['code']}")
    print(f"  database : {'SQLite file' if args.sqlite else 'PostgreSQL (fresh database)'}; "
          f"Redis {args.redis_url}/{args.redis_db}")
    print(f"  load tool: {tool}" + (" (asyncio + httpx in this process)" if tool == "httpx"
                                    else f" -t{args.wrk_threads}"))
    print(f"  note     : load tool, server, database and Redis share this machine's "
          f"{os.cpu_count()} cores")

    bench = Bench(args)
    bench.tool = tool
    results: dict = {"latency": [], "open_loop": [], "pickups": []}
    try:
        t0 = time.perf_counter()
        bench.setup()
        pg_version = None
        if not args.sqlite:
            import psycopg

            with psycopg.connect(args.pg_admin) as conn:
                pg_version = conn.execute("SHOW server_version").fetchone()[0]
        redis_version = bench.redis.info("server").get("redis_version")
        print(f"  versions : PostgreSQL {pg_version or '-'}, Redis {redis_version}")
        print(f"  setup {time.perf_counter() - t0:.1f} s; API {bench.base} (pid "
              f"{bench.server.pid}): {shlex.join(['python', *bench.server_cmd[1:]])}\n")

        import httpx

        get_job_id = None
        if args.pickups > 0:
            print(f"queue pick-up: one idle `hmaopt worker --device cpu`, {args.pickups} jobs")
            results["pickups"], get_job_id = bench.pickups()
            print()
        if get_job_id is None:
            with httpx.Client(base_url=bench.base, headers=bench.headers, timeout=30) as c:
                get_job_id = bench.submit(c)[0]
        with httpx.Client(base_url=bench.base, headers=bench.headers, timeout=30) as c:
            got = c.get(f"/v1/jobs/{get_job_id}")
            get_status, get_bytes = got.json()["status"], len(got.content)
        body = json.dumps(bench.spec)
        print(f"API latency ({tool}): GET /v1/jobs/{{id}} (a {get_status} job, {get_bytes} B "
              f"response), POST /v1/jobs ({len(body)} B spec; each creates and enqueues a job)")
        get_url = f"{bench.base}/v1/jobs/{get_job_id}"

        def closed(name, method, b, secs, conns):
            url = get_url if method == "GET" else f"{bench.base}/v1/jobs"
            results["latency"].append(bench.latency(f"{name} x{conns}", url, method, b, secs,
                                                    conns))
            time.sleep(1)

        if args.serial_seconds > 0:
            closed("GET /v1/jobs/{id}", "GET", None, args.serial_seconds, 1)
        closed("GET /v1/jobs/{id}", "GET", None, args.seconds, args.connections)
        # open loop before the POST runs, which leave ~1000 queued jobs for the maintenance
        capacity = results["latency"][-1]["rps"]
        rates = [(r, "") for r in args.rate if r > 0]
        rates += [(f * capacity, f" ({f:.0%} of {capacity:.0f})") for f in args.capacity_fractions]
        if rates:
            print(f"open loop: GET /v1/jobs/{{id}}, {args.connections} clients on a fixed "
                  f"schedule, latency from the scheduled send time, {args.client_processes} "
                  f"client process(es), {args.open_loop_client} asyncio client")
        for rate, note in rates:
            res = bench.open_loop(f"GET /v1/jobs/{{id}} @ {rate:.0f} req/s{note}", get_url, rate,
                                  args.seconds, args.connections)
            res["capacity_fraction"] = rate / capacity if note else None
            results["open_loop"].append(res)
            time.sleep(1)
        if args.serial_seconds > 0:
            closed("POST /v1/jobs", "POST", body, args.serial_seconds, 1)
        closed("POST /v1/jobs", "POST", body, args.seconds, args.connections)
        queued = bench.redis.llen("rq:queue:hmaopt")
        print(f"  RQ queue length after the runs: {queued}")
    finally:
        bench.teardown()

    # ---------------------------------------------------------------- summary
    print()
    rows = [[r["name"], r["requests"], f"{r['rps']:.0f}", f"{r['p50_ms']:.1f}",
             f"{r['p99_ms']:.1f}", f"{r['mean_ms']:.1f}", f"{r['max_ms']:.1f}", r["errors"],
             f"{r['server_cpu_s'] / r['wall_s']:.2f}",
             f"{r['server_cpu_s'] / max(1, r['requests']) * 1e3:.1f}",
             f"{r['postgres_cpu_s'] / r['wall_s']:.2f}",
             f"{r['load_tool_cpu_s'] / r['wall_s']:.2f}"]
            for r in results["latency"]]
    print(table(["request x clients", "requests", "req/s", "p50 ms", "p99 ms", "mean ms",
                 "max ms", "errors", "server cores", "server CPU ms/req", "postgres cores",
                 "load-tool cores"], rows))
    verdicts = {}
    loaded_get = next((r for r in results["latency"] if r["method"] == "GET"
                       and r["connections"] == args.connections), None)
    if loaded_get is not None:
        ok = loaded_get["p99_ms"] < GET_P99_TARGET_MS and loaded_get["errors"] == 0
        verdicts["get_p99"] = ok
        print(f"\nGET p99 at {args.connections} clients = {loaded_get['p99_ms']:.1f} ms (target "
              f"< {GET_P99_TARGET_MS:.0f} ms): {'met' if ok else 'NOT met'}")
    if results["open_loop"]:
        orows = [[r["name"], f"{r['target_rps']:.0f}", f"{r['rps']:.1f}", r["requests"],
                  f"{r['p50_ms']:.1f}", f"{r['p90_ms']:.1f}", f"{r['p99_ms']:.1f}",
                  f"{r['max_ms']:.1f}", r["errors"], f"{r['client_lag_p99_ms']:.1f}",
                  f"{r['server_cpu_s'] / r['wall_s']:.2f}",
                  f"{r['server_cpu_s'] / max(1, r['requests']) * 1e3:.1f}",
                  f"{r['load_tool_cpu_s'] / r['wall_s']:.2f}"]
                 for r in results["open_loop"]]
        print(f"\nopen loop ({args.connections} clients, latency from the scheduled send time):")
        print(table(["GET /v1/jobs/{id}", "target req/s", "achieved req/s", "requests",
                     "p50 ms", "p90 ms", "p99 ms", "max ms", "errors", "client lag p99 ms",
                     "server cores", "server CPU ms/req", "client cores"], orows))
        for r in results["open_loop"]:
            if r["rps"] < 0.97 * r["target_rps"]:
                print(f"  note: {r['name']}: achieved {r['rps']:.1f} req/s, under the target")
    picks = [p for p in results["pickups"] if p["picked_up_s"] is not None]
    if picks:
        pu = [p["picked_up_s"] for p in picks]
        ft = [p["first_trial_s"] for p in picks if p["first_trial_s"] is not None]
        ps = [p["post_s"] for p in picks]
        print()
        prow = [["picked up (job status running)", f"{statistics.median(pu) * 1e3:.0f}",
                 f"{max(pu) * 1e3:.0f}", f"{min(pu) * 1e3:.0f}"],
                ["first trial started (models loaded, θ_base from cache)",
                 f"{statistics.median(ft) * 1e3:.0f}" if ft else "-",
                 f"{max(ft) * 1e3:.0f}" if ft else "-", f"{min(ft) * 1e3:.0f}" if ft else "-"],
                ["(the POST itself)", f"{statistics.median(ps) * 1e3:.1f}",
                 f"{max(ps) * 1e3:.1f}", f"{min(ps) * 1e3:.1f}"]]
        print(table([f"after the POST returned ({len(picks)} jobs)", "median ms", "max ms",
                     "min ms"], prow))
        ok = max(pu) < PICKUP_TARGET_S
        verdicts["pickup"] = ok
        print(f"\npick-up: median {statistics.median(pu) * 1e3:.0f} ms, max {max(pu) * 1e3:.0f} ms "
              f"(target < {PICKUP_TARGET_S:.0f} s for every job): {'met' if ok else 'NOT met'}")
        results["pickup_summary"] = {
            "picked_up_median_s": statistics.median(pu), "picked_up_max_s": max(pu),
            "first_trial_median_s": statistics.median(ft) if ft else None,
            "first_trial_max_s": max(ft) if ft else None}

    for r in results["latency"]:
        r.pop("wrk_stdout", None)
    write_json(args.json_out, {
        "benchmark": "bench_api", "argv": sys.argv, "command": command, "machine": info,
        "database": "sqlite" if args.sqlite else "postgresql", "tool": tool,
        "connections": args.connections, "seconds": args.seconds,
        "api_processes": args.api_processes, "server_command": bench.server_cmd,
        "targets": {"get_p99_ms": GET_P99_TARGET_MS, "pickup_s": PICKUP_TARGET_S},
        "targets_met": verdicts, **results})
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == OPEN_LOOP_FLAG:  # a client process of run_open_loop
        print(json.dumps(open_loop_client(json.loads(sys.argv[2]))))
        raise SystemExit(0)
    raise SystemExit(main())
