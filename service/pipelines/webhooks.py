"""Pipeline webhooks, signed per Standard Webhooks (https://www.standardwebhooks.com).

Each event becomes one delivery row per subscribed URL (the log), sent by the scheduler:
a POST of ``{"type", "timestamp", "data"}`` with the headers ``webhook-id``,
``webhook-timestamp`` and ``webhook-signature`` (``standardwebhooks.Webhook.sign`` with the
hook's secret). A 2xx answer delivers it; anything else (or no answer within
``HMAOPT_WEBHOOK_TIMEOUT_SECONDS``) is retried after each wait of
``HMAOPT_WEBHOOK_BACKOFF_SECONDS`` in turn, then marked failed. Retries keep the message id,
so a receiver can drop duplicates.
"""

from __future__ import annotations

import json
import logging
import uuid
from datetime import datetime, timedelta

from service.db import pipelines as pipe_db
from service.db import session_scope
from service.db import webhooks as hook_db
from service.db.models import Pipeline, PipelineRun, utcnow
from service.settings import Settings
from service.status import DeliveryStatus

log = logging.getLogger(__name__)


def emit(session, pipeline: Pipeline, event: str, data: dict, run_id: str | None = None,
         now: datetime | None = None) -> int:
    """Queue ``event`` for every hook of the pipeline that subscribes to it."""
    now = now or utcnow()
    count = 0
    for hook in pipeline.spec.get("webhooks", []):
        if event not in hook.get("events", []):
            continue
        payload = {"type": event, "timestamp": now.isoformat(),
                   "data": {"pipeline": pipeline.name, "pipeline_id": pipeline.id, **data}}
        hook_db.add_delivery(session, pipeline_id=pipeline.id, run_id=run_id, event=event,
                             msg_id=f"msg_{uuid.uuid4().hex}", url=hook["url"],
                             payload=payload, now=now)
        count += 1
    return count


def emit_run(session, pipeline: Pipeline, event: str, run: PipelineRun,
             now: datetime | None = None) -> int:
    """Queue a run event (``run.started``, ``run.finished``, ...) with the run's fields."""
    return emit(session, pipeline, event, run_data(run), run.id, now)


def run_data(run: PipelineRun) -> dict:
    """The fields of a run that its events carry."""
    return {"run_id": run.id, "scheduled_for": run.scheduled_for.isoformat(),
            "trigger": run.trigger, "status": run.status, "job_id": run.job_id,
            "checkpoint": run.checkpoint, "decision": run.decision, "reason": run.reason,
            "reward": run.reward, "tax": run.tax, "holdout_reward": run.holdout_reward,
            "holdout_tax": run.holdout_tax, "gain": run.gain,
            "champion_reward": run.champion_reward, "promoted_dir": run.promoted_dir}


def sign(secret: str, msg_id: str, when: datetime, body: str) -> dict[str, str]:
    from standardwebhooks.webhooks import Webhook

    return {"webhook-id": msg_id, "webhook-timestamp": str(int(when.timestamp())),
            "webhook-signature": Webhook(secret).sign(msg_id, when, body),
            "content-type": "application/json"}


def deliver_due(settings: Settings, now: datetime | None = None,
                budget_seconds: float | None = None) -> int:
    """Send the pending deliveries that are due (for at most ``budget_seconds``: the rest
    wait for the next call); returns how many were delivered."""
    import time

    import httpx

    now = now or utcnow()
    deadline = None if budget_seconds is None else time.monotonic() + budget_seconds
    url = settings.database()
    with session_scope(url) as s:
        due = hook_db.due_deliveries(s, now)
    delivered = 0
    for delivery_id in due:
        if deadline is not None and time.monotonic() > deadline:
            break
        with session_scope(url) as s:
            d = hook_db.lock_delivery(s, delivery_id)  # None: another scheduler sends it
            if d is None or d.status != DeliveryStatus.PENDING or d.next_attempt_at > now:
                continue  # another scheduler sent it meanwhile
            pipeline = pipe_db.find_pipeline(s, d.pipeline_id)
            hook = next((h for h in (pipeline.spec.get("webhooks", []) if pipeline else [])
                         if h["url"] == d.url), None)
            d.attempts += 1
            if hook is None:
                d.status, d.last_error = DeliveryStatus.FAILED, "the webhook was removed from the pipeline"
                continue
            body = json.dumps(d.payload, separators=(",", ":"))
            sent_at = utcnow()
            try:
                r = httpx.post(d.url, content=body, timeout=settings.webhook_timeout_seconds,
                               headers=sign(hook["secret"], d.msg_id, sent_at, body))
                d.last_status_code, d.last_error = r.status_code, None
                ok = 200 <= r.status_code < 300
                if not ok:
                    d.last_error = f"HTTP {r.status_code}: {r.text[:200]}"
            except httpx.HTTPError as exc:
                ok, d.last_error = False, f"{type(exc).__name__}: {exc}"
            if ok:
                d.status, d.delivered_at = DeliveryStatus.DELIVERED, utcnow()
                delivered += 1
            elif d.attempts > len(settings.webhook_backoff_seconds):
                d.status = DeliveryStatus.FAILED
                log.warning("webhook %s %s to %s failed after %d attempts: %s", d.event,
                            d.msg_id, d.url, d.attempts, d.last_error)
            else:
                wait = settings.webhook_backoff_seconds[d.attempts - 1]
                d.next_attempt_at = utcnow() + timedelta(seconds=wait)
    return delivered
