"""From an accepted message to its SMTP reply: sync mode, or spool mode.

Sync (:class:`SyncPipeline`): routing (which routes, which recipients) →
parsing (MIME → :class:`Message`) → payload (one JSON document per route) →
delivery (every route's webhook) → the reply: ``250`` only when every route's
webhook answered 2xx.

Spool (:class:`SpoolPipeline`): routing → the spool (raw message, envelope,
routes, the stable id, the trace context of the ``receive message`` span) →
``250`` only once the spool says the file is written, synced and renamed into
queue/ with the directory synced. ``452 4.3.1`` when the spool is full (also at
MAIL: :class:`SpoolHandler`), ``451 4.3.0`` when the disk refuses. Parsing
happens at delivery (:func:`spooled_bodies`, called by the worker), so a
parser change never touches what was accepted.

The id is :func:`payload.stable_id` in both modes, computed once at acceptance
and stored: every attempt, redelivery and restart sends the same
``webhook-id``, and a message the sending MTA sends again (our 250 lost on the
way) gets the same id too, so receivers de-duplicate it.

These are the places ingress and delivery meet. Parsing a large message runs
in a worker thread so the event loop keeps serving other sessions.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mailbridge import parsing, payload, routing
from mailbridge.config import ParsingSettings
from mailbridge.delivery.sync import SyncDelivery
from mailbridge.observability import tracing
from mailbridge.payload import Envelope
from mailbridge.smtp.handler import Handler
from mailbridge.smtp.session import Envelope as SmtpEnvelope
from mailbridge.smtp.session import Session
from mailbridge.spool import queue, record
from mailbridge.spool.commit import WriteFailed

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
    webhook_id = payload.stable_id(envelope, raw)
    wanted = routing.fan_out(routes, envelope.rcpt_to)
    return webhook_id, encode_bodies(settings, webhook_id, envelope, raw, received_at, wanted)


def encode_bodies(
    settings: ParsingSettings,
    webhook_id: str,
    envelope: Envelope,
    raw: bytes,
    received_at: datetime.datetime,
    routes: Mapping[str, Sequence[str]],
) -> dict[str, bytes]:
    """Parse ``raw`` once; one encoded payload per route (name → its recipients)."""
    with tracing.tracer().start_as_current_span("parse message") as span:
        message = parsing.parse(
            raw,
            header_prefixes=settings.header_prefixes,
            max_inline_attachment_bytes=settings.max_inline_attachment_bytes,
        )
        span.set_attribute("mailbridge.message.defects", len(message.defects))
        span.set_attribute("mailbridge.message.attachments", len(message.attachments))
    return {
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
        for route, recipients in routes.items()
    }


def build_documents(
    routes: Sequence[routing.Route],
    settings: ParsingSettings,
    envelope: Envelope,
    raw: bytes | bytearray,
    received_at: datetime.datetime,
) -> tuple[str, dict[str, payload.Document]]:
    """:func:`build_bodies`, with each payload as a :class:`~mailbridge.payload.Document`.

    A big plain text body is read from ``raw`` in chunks straight into its JSON
    string, once for all routes: besides ``raw``, the message costs about one
    copy of its size, never a whole ``str`` of the text or of the document.
    """
    read = read_message(routes, settings, envelope, raw)
    body = payload.text_body(read.source) if read.source is not None else None
    return read.webhook_id, read.documents(envelope, received_at, body)


def _attachment_strings(
    sources: Mapping[str, parsing.Base64Source],
) -> dict[str, tuple[bytes, ...]]:
    """The JSON strings of streamed attachments, by key (see :func:`payload.encode_document`)."""
    return {key: payload.base64_string(source) for key, source in sources.items()}


@dataclass(frozen=True)
class ReadMessage:
    """A message read for sync delivery: its id, routes, parse, and streamed text body."""

    webhook_id: str
    wanted: Mapping[str, Sequence[str]]
    message: parsing.Message
    source: parsing.TextSource | None
    size_bytes: int
    #: Attachments read from the raw message, by key (:attr:`parsing.Streamed.attachments`).
    attachments: Mapping[str, parsing.Base64Source] = field(default_factory=dict)

    def documents(
        self,
        envelope: Envelope,
        received_at: datetime.datetime,
        body: Sequence[bytes] | None,
        attachments: Mapping[str, Sequence[bytes]] | None = None,
    ) -> dict[str, payload.Document]:
        """One document per route; ``body`` is the JSON string of :attr:`source`.

        ``attachments``: the JSON strings of :attr:`attachments` by key, made here
        (once for all routes) when not given.
        """
        if attachments is None:
            attachments = _attachment_strings(self.attachments)
        return {
            route: payload.encode_document(
                payload.build(
                    id=self.webhook_id,
                    message=self.message,
                    envelope=envelope,
                    route=route,
                    recipients=recipients,
                    received_at=received_at,
                    size_bytes=self.size_bytes,
                ),
                body=body,
                strings=attachments,
            )
            for route, recipients in self.wanted.items()
        }


def read_message(
    routes: Sequence[routing.Route],
    settings: ParsingSettings,
    envelope: Envelope,
    raw: bytes | bytearray,
) -> ReadMessage:
    """The id, the routes that want the message and :func:`parsing.parse_streamed` of it."""
    webhook_id = payload.stable_id(envelope, raw)
    wanted = routing.fan_out(routes, envelope.rcpt_to)
    read = _parse_streamed(settings, raw)
    return ReadMessage(webhook_id, wanted, read.message, read.text, len(raw), read.attachments)


def _parse_streamed(settings: ParsingSettings, raw: bytes | bytearray) -> parsing.Streamed:
    """:func:`parsing.parse_streamed` in a ``parse message`` span (none when a no-op)."""
    if not tracing.active():  # the span would be a no-op: spare its cost
        return parsing.parse_streamed(
            raw,
            header_prefixes=settings.header_prefixes,
            max_inline_attachment_bytes=settings.max_inline_attachment_bytes,
        )
    with tracing.tracer().start_as_current_span("parse message") as span:
        read = parsing.parse_streamed(
            raw,
            header_prefixes=settings.header_prefixes,
            max_inline_attachment_bytes=settings.max_inline_attachment_bytes,
        )
        span.set_attribute("mailbridge.message.defects", len(read.message.defects))
        span.set_attribute("mailbridge.message.attachments", len(read.message.attachments))
    return read


async def _stream_text_body(source: parsing.TextSource) -> tuple[bytes, ...]:
    """:func:`payload.text_body`, one chunk per turn of the event loop.

    On the loop's thread, not a worker's: the big pieces then come from the
    main allocator arena, where the DATA read just freed as much, instead of
    growing a worker thread's arena by the message's size.
    """
    parts = [b'"']
    for piece in payload.json_string_inside(source.chunks()):
        parts.append(piece)
        await asyncio.sleep(0)
    parts.append(b'"')
    return tuple(parts)


async def _stream_attachments(
    sources: Mapping[str, parsing.Base64Source],
) -> dict[str, tuple[bytes, ...]]:
    """:func:`_attachment_strings`, one chunk per turn of the event loop (as for the text)."""
    strings: dict[str, tuple[bytes, ...]] = {}
    for key, source in sources.items():
        parts = [b'"']
        for piece in source.chunks():
            parts.append(piece)
            await asyncio.sleep(0)
        parts.append(b'"')
        strings[key] = tuple(parts)
    return strings


def spooled_bodies(
    settings: ParsingSettings, header: record.Header, raw: bytes, routes: Sequence[str]
) -> dict[str, payload.Document]:
    """The payloads of a spooled message for ``routes``: same id and time on every attempt.

    The same lean parse and streamed documents as sync delivery (:func:`build_documents`).
    """
    received_at = datetime.datetime.fromtimestamp(header.received_at, datetime.UTC)
    wanted = {route: header.routes[route] for route in routes}
    parsed = _parse_streamed(settings, raw)
    read = ReadMessage(
        header.webhook_id, wanted, parsed.message, parsed.text, len(raw), parsed.attachments
    )
    body = payload.text_body(parsed.text) if parsed.text is not None else None
    return read.documents(header.envelope, received_at, body)


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

    async def __call__(
        self, envelope: Envelope, raw: bytes | bytearray, *, received_monotonic: float
    ) -> str:
        received_at = datetime.datetime.now(datetime.UTC)
        args = (self.routes, self.settings, envelope, raw)
        if len(raw) > THREAD_PARSE_BYTES:
            read = await asyncio.to_thread(read_message, *args)
        else:
            read = read_message(*args)
        del args, raw  # the documents hold what they need
        text = await _stream_text_body(read.source) if read.source is not None else None
        strings = await _stream_attachments(read.attachments)
        webhook_id = read.webhook_id
        bodies = read.documents(envelope, received_at, text, strings)
        del read, text, strings
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


FULL_REPLY = "452 4.3.1 Insufficient system storage: the spool is full; try again later"
DISK_REPLY = "451 4.3.0 Temporary local problem: cannot write to the spool; try again later"


class SpoolPipeline:
    """Keep the message safe on disk, then answer; the worker delivers it later."""

    def __init__(
        self,
        routes: Sequence[routing.Route],
        spool: queue.Spool,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.routes = routes
        self.spool = spool
        self.clock = clock

    async def __call__(self, envelope: Envelope, raw: bytes, *, received_monotonic: float) -> str:
        wanted = routing.fan_out(self.routes, envelope.rcpt_to)
        webhook_id = payload.stable_id(envelope, raw)
        try:
            entry = await self.spool.accept(
                envelope=envelope,
                raw=raw,
                routes={route: tuple(rcpts) for route, rcpts in wanted.items()},
                webhook_id=webhook_id,
                received_at=self.clock(),
                # Inside the handler's "receive message" span: delivery spans link to it.
                carrier=tracing.carrier(),
            )
        except queue.Full:
            return FULL_REPLY
        except WriteFailed:
            return DISK_REPLY
        log.info(
            "message spooled",
            extra={"message_id": webhook_id, "queue_id": entry.queue_id, "routes": sorted(wanted)},
        )
        return f"250 2.0.0 Ok: queued as {webhook_id}"


def _declared_size(mail_options: Sequence[str]) -> int:
    """The ``SIZE=`` a client declared at MAIL (RFC 1870), or 0."""
    for option in mail_options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isdigit() and len(value) < 16:
            return int(value)
    return 0


class SpoolHandler(Handler):
    """The SMTP handler, plus: refuse a transaction at MAIL while the spool is full
    (or has no room for the ``SIZE=`` the client declared)."""

    def __init__(self, *args: Any, spool: queue.Spool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spool = spool

    def handle_MAIL(
        self,
        server: Session,
        envelope: SmtpEnvelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if not self.spool.has_room(_declared_size(mail_options)):
            self.metrics.reject("spool_full")
            return FULL_REPLY
        return super().handle_MAIL(server, envelope, address, mail_options)
