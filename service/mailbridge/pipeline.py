"""From an accepted message to its SMTP reply, in sync mode.

routing (which routes, which recipients) → parsing (MIME → :class:`Message`) →
payload (one JSON document per route) → delivery (every route's webhook) →
the reply: ``250`` only when every route's webhook answered 2xx.

This is the one place ingress and delivery meet in sync mode (the spool is the
other). Parsing a large message runs in a worker thread so the event loop keeps
serving other sessions.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Sequence

from mailbridge import parsing, payload, routing
from mailbridge.config import ParsingSettings
from mailbridge.delivery.sync import SyncDelivery
from mailbridge.observability import tracing
from mailbridge.payload import Envelope

log = logging.getLogger("mailbridge.pipeline")

#: Messages larger than this are parsed in a worker thread.
THREAD_PARSE_BYTES = 256 * 1024


def build_bodies(
    routes: Sequence[routing.Route],
    settings: ParsingSettings,
    envelope: Envelope,
    raw: bytes,
    received_at: datetime.datetime,
) -> tuple[str, dict[str, bytes]]:
    """The stable id and one encoded payload per route that wants the message."""
    with tracing.tracer().start_as_current_span("parse message") as span:
        message = parsing.parse(
            raw,
            header_prefixes=settings.header_prefixes,
            max_inline_attachment_bytes=settings.max_inline_attachment_bytes,
        )
        span.set_attribute("mailbridge.message.defects", len(message.defects))
        span.set_attribute("mailbridge.message.attachments", len(message.attachments))
    webhook_id = payload.stable_id(envelope, raw)
    bodies = {
        route: payload.encode(
            payload.build(
                id=webhook_id,
                message=message,
                envelope=envelope,
                route=route,
                recipients=recipients,
                received_at=received_at,
                size_bytes=len(raw),
            )
        )
        for route, recipients in routing.fan_out(routes, envelope.rcpt_to).items()
    }
    return webhook_id, bodies


class SyncPipeline:
    """Deliver while the client waits: the reply says what the webhooks said."""

    def __init__(
        self,
        routes: Sequence[routing.Route],
        settings: ParsingSettings,
        delivery: SyncDelivery,
    ) -> None:
        self.routes = routes
        self.settings = settings
        self.delivery = delivery

    async def __call__(self, envelope: Envelope, raw: bytes, *, received_monotonic: float) -> str:
        received_at = datetime.datetime.now(datetime.UTC)
        args = (self.routes, self.settings, envelope, raw, received_at)
        if len(raw) > THREAD_PARSE_BYTES:
            webhook_id, bodies = await asyncio.to_thread(build_bodies, *args)
        else:
            webhook_id, bodies = build_bodies(*args)
        result = await self.delivery.deliver(
            webhook_id, bodies, accepted_monotonic=received_monotonic
        )
        log.info(
            "message delivered" if result.outcome == "delivered" else "delivery failed",
            extra={"message_id": webhook_id, "routes": sorted(bodies), "outcome": result.outcome},
        )
        if result.outcome == "delivered":
            return f"250 2.0.0 Ok: delivered as {webhook_id}"
        if result.outcome == "permanent":
            return f"554 5.6.0 The webhook refused the message ({result.detail})"
        return (
            f"451 4.3.0 The webhook could not take the message now ({result.detail}); "
            "try again later"
        )
