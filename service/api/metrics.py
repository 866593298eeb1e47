"""Prometheus metrics of one app: HTTP counters and latencies, and gauges read at scrape time
from the database and Redis."""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)


class Metrics:
    def __init__(self, settings) -> None:
        self.settings = settings
        self.registry = CollectorRegistry()
        self.requests = Counter("hmaopt_http_requests", "HTTP requests",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("hmaopt_http_request_seconds", "HTTP request latency",
                                 ["method", "route"], registry=self.registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self.registry.register(_StateCollector(settings))

    def asgi(self, app):
        """Plain ASGI middleware (cheaper than Starlette's BaseHTTPMiddleware)."""
        metrics = self

        async def record(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)
            t0 = time.perf_counter()
            status = {"code": 500}

            async def send_status(message):
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                await send(message)

            try:
                await app(scope, receive, send_status)
            finally:
                path = getattr(scope.get("route"), "path", "unmatched")
                metrics.requests.labels(scope["method"], path, str(status["code"])).inc()
                metrics.latency.labels(scope["method"], path).observe(time.perf_counter() - t0)
        return record


class _StateCollector:
    def __init__(self, settings) -> None:
        self.settings = settings

    def collect(self):
        from service import queue
        from service.db import jobs as job_db
        from service.db import session_scope
        from service.db import workers as worker_db
        from service.status import JobStatus

        jobs = GaugeMetricFamily("hmaopt_jobs", "jobs by status", labels=["status"])
        trials = GaugeMetricFamily("hmaopt_trials", "finished trials recorded")
        workers = GaugeMetricFamily("hmaopt_workers_alive", "workers with a fresh heartbeat")
        try:
            with session_scope(self.settings.database()) as session:
                counts = job_db.status_counts(session)
                for status in JobStatus:
                    jobs.add_metric([status.value], counts.get(status.value, 0))
                trials.add_metric([], job_db.trial_count(session))
                workers.add_metric([], len(worker_db.alive(
                    session, seconds=self.settings.worker_stale_seconds)))
        except Exception as exc:
            log.warning("metrics: database not readable: %s", exc)
        yield jobs
        yield trials
        yield workers
        depth = GaugeMetricFamily("hmaopt_queue_length", "job runs waiting in the RQ queue")
        try:
            from rq import Queue

            conn = queue.redis_client(queue.redis_url(self.settings))
            depth.add_metric([], Queue(self.settings.queue_name, connection=conn).count)
            yield depth
        except Exception as exc:
            log.warning("metrics: Redis not readable: %s", exc)
