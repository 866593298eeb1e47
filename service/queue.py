"""Redis: the RQ queue that carries jobs to workers, job events, cancel flags.

Redis is transport only. The job row in the database is the source of truth: a job the
database says is queued but Redis has lost (a restart of a Redis that keeps nothing) is
enqueued again by :func:`reconcile`, which the API runs at start and every
``HMAOPT_MAINTENANCE_SECONDS``, and every worker runs too.

Keys (prefix ``hmaopt:``) come from :class:`Keys`; RQ keeps its own under ``rq:``. The RQ id
of a job's n-th run is ``<job id>-<n>`` (:func:`run_id`).

Outages. :func:`transport_down` is the one predicate of "Redis is away" (connection refused,
reset, timed out); whoever meets it waits :func:`retry_waits` (HMAOPT_REDIS_RETRY_SECONDS,
doubled up to HMAOPT_REDIS_RETRY_MAX_SECONDS) and tries again, never fails a job for it. A
Redis that comes back empty loses nothing the database has: the reconcile enqueues again.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from functools import lru_cache

from service.db import jobs as job_db
from service.db import session_scope
from service.db import workers as worker_db
from service.errors import ConflictError, DependencyUnavailableError
from service.settings import Settings
from service.status import ExportStatus, JobStatus

log = logging.getLogger(__name__)

#: the function a worker runs for one job run
RUN_FUNCTION = "workers.loop.run_job"
#: the function a worker runs to export a job's best merge
EXPORT_FUNCTION = "workers.loop.export_job"
#: events kept per job stream (older ones are trimmed)
EVENTS_MAXLEN = 100_000
#: seconds a cancel flag stays in Redis (the database keeps it for good)
CANCEL_TTL = 7 * 24 * 3600
#: seconds RQ keeps a finished run's return value
RESULT_TTL = 24 * 3600
#: seconds after submission before reconcile may consider a job lost (its first enqueue may
#: still be on the way)
RECONCILE_GRACE_SECONDS = 5
#: RQ's own job states (rq.job.JobStatus values) of a run still to be done or under way
LIVE_RQ_STATES = {"queued", "started", "deferred", "scheduled"}
#: RQ name of the worker with database id <id>: ``hmaopt-<id>``
WORKER_PREFIX = "hmaopt-"


class Keys:
    """The one builder of hmaopt's Redis keys."""

    prefix = "hmaopt"

    @classmethod
    def events(cls, job_id: str) -> str:
        return f"{cls.prefix}:events:{job_id}"

    @classmethod
    def cancel(cls, job_id: str) -> str:
        return f"{cls.prefix}:cancel:{job_id}"

    @classmethod
    def lock(cls, job_id: str, what: str) -> str:
        """A lock of one job (or of every job: ``job_id="all"``)."""
        return f"{cls.prefix}:lock:{job_id}:{what}"


def run_id(job_id: str, n: int) -> str:
    return f"{job_id}-{n}"


@lru_cache(maxsize=8)
def redis_client(url: str):
    """A Redis client for ``url`` (one pool per URL and process)."""
    import redis

    return redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30,
                                health_check_interval=30)


def transport_down(exc: BaseException) -> bool:
    """Whether ``exc`` says Redis cannot be reached now (as opposed to a command it refused):
    the one predicate of an outage, which is waited out, never a job's failure."""
    import redis

    if isinstance(exc, DependencyUnavailableError) and exc.__cause__ is not None:
        exc = exc.__cause__
    return isinstance(exc, redis.ConnectionError | redis.TimeoutError)


def retry_waits(settings: Settings) -> Iterator[float]:
    """The waits between tries of an unreachable Redis: HMAOPT_REDIS_RETRY_SECONDS, doubled
    after each failure up to HMAOPT_REDIS_RETRY_MAX_SECONDS, without end."""
    wait = settings.redis_retry_seconds
    while True:
        yield wait
        wait = min(2 * wait, settings.redis_retry_max_seconds)


def redis_url(settings: Settings) -> str:
    """REDIS_URL, or the URL the embedded Valkey server wrote under HMAOPT_HOME."""
    if settings.redis_url:
        return settings.redis_url
    file = settings.home / "redis.url"
    if file.is_file():
        return file.read_text().strip()
    raise DependencyUnavailableError(
        "no Redis: set REDIS_URL, or start the embedded stack with `hmaopt serve`")


def _queue(settings: Settings, conn):
    from rq import Queue

    return Queue(settings.queue_name, connection=conn, default_timeout=settings.job_timeout_seconds)


def _redis_error(exc: Exception, url: str) -> DependencyUnavailableError:
    from service.db.session import safe_url

    return DependencyUnavailableError(f"cannot reach Redis at {safe_url(url)}: {exc}; "
                                      "check REDIS_URL")


def enqueue_runs(settings: Settings, job_id: str, count: int = 1) -> list[str]:
    """Enqueue ``count`` runs of a job (several workers may share one job)."""
    import redis

    url = redis_url(settings)
    conn = redis_client(url)
    queue = _queue(settings, conn)
    with session_scope(settings.database()) as session:
        last = job_db.count_runs(session, job_id, count)
    first = last - count + 1
    ids = [run_id(job_id, n) for n in range(first, first + count)]
    try:
        for rid in ids:
            queue.enqueue(RUN_FUNCTION, job_id, job_id=rid,
                          job_timeout=settings.job_timeout_seconds, result_ttl=RESULT_TTL,
                          description=f"hmaopt job {job_id}")
    except redis.RedisError as exc:
        raise _redis_error(exc, url) from exc
    log.info("job %s: enqueued %s", job_id, ", ".join(ids))
    return ids


def enqueue_export(settings: Settings, job_id: str, out_dir: str, *,
                   overwrite: bool = False) -> str:
    import redis

    url = redis_url(settings)
    try:
        job = _queue(settings, redis_client(url)).enqueue(
            EXPORT_FUNCTION, job_id, out_dir, overwrite, job_timeout=settings.job_timeout_seconds,
            result_ttl=RESULT_TTL, description=f"hmaopt export of job {job_id}")
    except redis.RedisError as exc:
        raise _redis_error(exc, url) from exc
    return job.id


def request_export(settings: Settings, session, job, out_dir: str, *, field: str = "dir",
                   overwrite: bool = False) -> str:
    """Ask a worker to export the job's best merge into ``out_dir`` (already resolved inside
    the model roots; ``field`` names it in errors): the one way an export starts (REST and
    pipelines). Refused when the folder would overwrite an input, when the job has no
    feasible trial, or while an export of it is under way (ConflictError). The row is marked
    queued and flushed (locked) before Redis hears of it; the caller commits, so that when
    Redis fails (DependencyUnavailableError) nothing of the request is kept. Returns the RQ
    id."""
    from service.paths import check_output
    from service.spec import JobSpec

    check_output(field, out_dir, JobSpec.model_validate(job.spec))
    if job.best_ratios is None:
        raise ConflictError(f"job {job.id} has no feasible trial to export yet")
    if job.export_status is not None and ExportStatus(job.export_status).active:
        raise ConflictError(f"job {job.id}: an export is already {job.export_status}")
    job.export_status, job.export_dir, job.export_error = ExportStatus.QUEUED, out_dir, None
    session.flush()
    return enqueue_export(settings, job.id, out_dir, overwrite=overwrite)


def live_runs(settings: Settings, job_id: str, runs_enqueued: int,
              alive_workers: set[str], on_job: set[str] | None = None) -> int:
    """How many of a job's RQ runs are queued in Redis, or started by a worker that is alive
    (a run started by a killed worker stays "started" in RQ until its long timeout). With
    ``on_job`` (the live workers the database has on this job), a run started more than
    RECONCILE_GRACE_SECONDS ago by a live worker no longer on the job is not counted: RQ
    could not hear that it ended (Redis was away at that moment)."""
    from rq.job import Job as RQJob

    conn = redis_client(redis_url(settings))
    ids = [run_id(job_id, n) for n in range(1, runs_enqueued + 1)]
    live = 0
    now = datetime.now(timezone.utc)
    for rq_job in RQJob.fetch_many(ids, connection=conn):  # one round trip
        if rq_job is None:
            continue
        status = str(getattr(rq_job.get_status(refresh=False), "value", None))
        if status == "started":
            owner = (rq_job.worker_name or "").removeprefix(WORKER_PREFIX)
            started = rq_job.started_at
            if started is not None and started.tzinfo is None:
                started = started.replace(tzinfo=timezone.utc)
            stale = (on_job is not None and owner not in on_job and started is not None
                     and (now - started).total_seconds() > RECONCILE_GRACE_SECONDS)
            live += owner in alive_workers and not stale
        elif status in LIVE_RQ_STATES:
            live += 1
    return live


def reconcile(settings: Settings) -> list[str]:
    """Enqueue again every unfinished job that has fewer live runs than it asks for.

    A run counts as live when Redis has it queued, or started by a live worker, or a live
    worker (by the database's heartbeats) is on the job. One pass at a time over all
    processes (a Redis lock); a queued job whose cancel was requested is cancelled here.
    Returns the ids of the jobs enqueued.
    """
    import redis

    url = settings.database()
    conn = redis_client(redis_url(settings))
    try:
        lock = conn.lock(Keys.lock("all", "reconcile"), timeout=60)
        if not lock.acquire(blocking=False):
            return []
    except redis.RedisError as exc:
        raise _redis_error(exc, redis_url(settings)) from exc
    done = []
    try:
        with session_scope(url) as session:
            pending = job_db.jobs_to_reconcile(session, RECONCILE_GRACE_SECONDS)
            live_workers = worker_db.alive(session, seconds=settings.worker_stale_seconds)
        alive = {w.id for w in live_workers}
        on_job: dict[str, set[str]] = {}
        for w in live_workers:
            if w.job_id is not None:
                on_job.setdefault(w.job_id, set()).add(w.id)
        for job_id, status, parallel, enqueued, cancel, finalizer in pending:
            if cancel:
                with session_scope(url) as session:
                    if job_db.set_status(session, job_id, JobStatus.CANCELLED,
                                         expect={JobStatus.QUEUED}):
                        log.warning("job %s: cancelled while waiting for a worker", job_id)
                continue
            if finalizer is not None and finalizer in alive:
                continue  # a live worker is writing its result
            try:
                rq_live = live_runs(settings, job_id, enqueued, alive, on_job.get(job_id, set()))
            except redis.RedisError as exc:
                raise _redis_error(exc, redis_url(settings)) from exc
            missing = parallel - max(rq_live, len(on_job.get(job_id, ())))
            if missing > 0:
                log.warning("job %s (%s): %d run(s) missing from Redis, enqueueing again",
                            job_id, status, missing)
                enqueue_runs(settings, job_id, missing)
                done.append(job_id)
    finally:
        try:
            lock.release()
        except Exception:  # expired meanwhile
            pass
    return done


# ------------------------------------------------------------------------------ events

def publish(settings: Settings, job_id: str, kind: str, data: dict) -> str | None:
    """Append an event to the job's stream; a Redis failure is logged, never raised
    (events are a live view: the database holds the record)."""
    import redis

    try:
        conn = redis_client(redis_url(settings))
        return conn.xadd(Keys.events(job_id), {"type": kind, "data": json.dumps(data)},
                         maxlen=EVENTS_MAXLEN, approximate=True).decode()
    except (redis.RedisError, DependencyUnavailableError) as exc:
        log.warning("job %s: event %s not published: %s", job_id, kind, exc)
        return None


def stream_position(settings: Settings, job_id: str) -> str:
    """The id of the job's latest event ("0" when none): reading the database after this
    and then the events after it (``events?since=``) misses nothing. Raises
    DependencyUnavailableError when Redis cannot be reached."""
    import redis

    try:
        last = redis_client(redis_url(settings)).xrevrange(Keys.events(job_id), count=1)
    except redis.RedisError as exc:
        raise DependencyUnavailableError(f"Redis: {exc}") from None
    return last[0][0].decode() if last else "0"


def set_cancel_flag(settings: Settings, job_id: str) -> None:
    import redis

    try:
        redis_client(redis_url(settings)).set(Keys.cancel(job_id), b"1", ex=CANCEL_TTL)
    except (redis.RedisError, DependencyUnavailableError) as exc:  # the DB flag still holds
        log.warning("job %s: cancel flag not set in Redis: %s", job_id, exc)


def cancel_flagged(settings: Settings, job_id: str) -> bool:
    import redis

    try:
        return bool(redis_client(redis_url(settings)).exists(Keys.cancel(job_id)))
    except (redis.RedisError, DependencyUnavailableError):
        return False


def wait_for_redis(url: str, timeout: float = 10.0) -> None:
    import redis

    deadline = time.monotonic() + timeout
    while True:
        try:
            redis_client(url).ping()
            return
        except redis.RedisError as exc:
            if time.monotonic() > deadline:
                raise _redis_error(exc, url) from exc
            time.sleep(0.2)
