"""Queries of the webhook deliveries (the log of each message to each URL, with its
attempts): written by the scheduler's steps, sent by service.pipelines.webhooks."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select

from service.db.models import WebhookDelivery
from service.status import DeliveryStatus


def add_delivery(session, *, pipeline_id: str, run_id: str | None, event: str, msg_id: str,
                 url: str, payload: dict, now: datetime) -> WebhookDelivery:
    """A pending delivery, due at once."""
    row = WebhookDelivery(pipeline_id=pipeline_id, run_id=run_id, event=event, msg_id=msg_id,
                          url=url, payload=payload, status=DeliveryStatus.PENDING, attempts=0,
                          next_attempt_at=now, created_at=now)
    session.add(row)
    return row


def due_deliveries(session, now: datetime, limit: int = 100) -> list[int]:
    """Ids of the pending deliveries due by ``now``, oldest first."""
    return list(session.scalars(select(WebhookDelivery.id).where(
        WebhookDelivery.status == DeliveryStatus.PENDING, WebhookDelivery.next_attempt_at <= now)
        .order_by(WebhookDelivery.id).limit(limit)))


def lock_delivery(session, delivery_id: int) -> WebhookDelivery | None:
    """The delivery locked for sending; None when another scheduler holds it (or it is
    gone)."""
    return session.scalar(select(WebhookDelivery).where(WebhookDelivery.id == delivery_id)
                          .with_for_update(skip_locked=True))


def list_deliveries(session, pipeline_id: str, limit: int = 100) -> list[WebhookDelivery]:
    """A pipeline's delivery log, newest first."""
    return list(session.scalars(select(WebhookDelivery)
                                .where(WebhookDelivery.pipeline_id == pipeline_id)
                                .order_by(WebhookDelivery.id.desc()).limit(limit)))
