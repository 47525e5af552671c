"""SMTP decisions: who may send, which recipients we take, and what DATA answers.

The session (:mod:`mailbridge.smtp.session`) calls the ``handle_<VERB>`` hooks once
it has checked a command's syntax; each returns the reply. Only ``handle_DATA``
awaits (the dispatch); the others decide on the spot. Recipients
are routed on the SMTP envelope only (:mod:`mailbridge.routing`); a recipient no
route wants gets ``550 5.1.1``, a relay attempt ``550 5.7.1``, and too many of
either closes the session with ``421 4.7.0``. At the end of DATA the message is
handed to the :class:`Dispatch` (sync delivery, or the spool) and its reply is
the answer: ``250`` only when the message is safe.

Reads the ``smtp`` settings. Logs no addresses or content at info level.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Sequence
from typing import Protocol

from opentelemetry import trace

from mailbridge import routing
from mailbridge.config import SmtpSettings
from mailbridge.observability import tracing
from mailbridge.observability.metrics import Metrics
from mailbridge.payload import Envelope, TlsInfo
from mailbridge.smtp.proxy import ProxyData
from mailbridge.smtp.session import Envelope as SmtpEnvelope
from mailbridge.smtp.session import Session

log = logging.getLogger("mailbridge.smtp")


class Dispatch(Protocol):
    """What happens to an accepted message; returns the SMTP reply for DATA."""

    async def __call__(
        self, envelope: Envelope, raw: bytes | bytearray, *, received_monotonic: float
    ) -> str: ...


class Handler:
    def __init__(
        self,
        settings: SmtpSettings,
        routes: Sequence[routing.Route],
        dispatch: Dispatch,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.routes = routes
        self.dispatch = dispatch
        self.metrics = metrics

    def handle_PROXY(self, server: Session, proxy: ProxyData) -> bool:
        peer = server.peer[0] if isinstance(server.peer, tuple) else str(server.peer)
        if not self._trusted_proxy(peer):
            server.metrics.connections_refused.labels("untrusted_proxy").inc()
            log.warning("PROXY header from an untrusted peer refused")
            return False
        # A LOCAL (health check) header has no source: the proxy itself is the client.
        client = str(proxy.src_addr) if proxy.src_addr else peer
        return server.admit(client)

    def _trusted_proxy(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self.settings.trusted_proxies)

    def handle_EHLO(self, server: Session, hostname: str, responses: list[str]) -> list[str]:
        """Advertise what we honour: PIPELINING and ENHANCEDSTATUSCODES too, never AUTH."""
        server.host_name = hostname
        kept = [line for line in responses[:-1] if not line[4:].upper().startswith("AUTH")]
        return [*kept, "250-PIPELINING", "250-ENHANCEDSTATUSCODES", responses[-1]]

    def handle_MAIL(
        self,
        server: Session,
        envelope: SmtpEnvelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    def handle_RCPT(
        self,
        server: Session,
        envelope: SmtpEnvelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= self.settings.max_recipients:
            self.metrics.reject("too_many_recipients")
            return "452 4.5.3 Too many recipients"
        if routing.match(self.routes, address):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
            return "250 2.1.5 Recipient OK"
        server.unknown_recipients += 1
        if server.unknown_recipients > self.settings.max_unknown_recipients:
            self.metrics.reject("rate_limited")
            return "421 4.7.0 Too many unknown recipients; closing connection"
        if routing.split(address) is None:
            self.metrics.reject("relay_denied")
            return "550 5.7.1 Relay access denied"
        self.metrics.reject("unknown_recipient")
        return "550 5.1.1 Recipient address rejected: no such recipient here"

    async def handle_DATA(self, server: Session, envelope: SmtpEnvelope) -> str:
        raw = envelope.content
        assert raw is not None
        received = time.monotonic()
        self.metrics.message_size.observe(len(raw))
        tls = server.tls_version
        accepted = Envelope(
            mail_from="" if envelope.mail_from in (None, "<>") else envelope.mail_from,
            rcpt_to=tuple(envelope.rcpt_tos),
            helo=server.host_name or None,
            client_ip=server.client_ip,
            tls=TlsInfo(version=tls[0], cipher=tls[1]) if tls else None,
        )
        if tracing.active():
            reply = await self._dispatch_in_span(accepted, raw, received, tls is not None)
        else:  # the span would be a no-op: spare its attributes, routing and context switch
            reply = await self.dispatch(accepted, raw, received_monotonic=received)
        if reply.startswith("250"):
            self.metrics.messages_accepted.inc()
        elif reply.startswith("452"):
            self.metrics.reject("spool_full")
        elif reply.startswith("4"):
            self.metrics.reject("temp_failure")
        else:
            self.metrics.reject("permanent_failure")
        return reply

    async def _dispatch_in_span(
        self, accepted: Envelope, raw: bytes | bytearray, received: float, tls: bool
    ) -> str:
        """:attr:`dispatch` inside the message's ``receive message`` span."""
        with tracing.tracer().start_as_current_span(
            "receive message",
            attributes={
                tracing.MESSAGE_SIZE: len(raw),
                tracing.RECIPIENTS: len(accepted.rcpt_to),
                tracing.ROUTES: list(routing.fan_out(self.routes, accepted.rcpt_to)),
                tracing.SMTP_TLS: tls,
                tracing.SMTP_HELO: accepted.helo or "",
            },
        ) as span:
            reply = await self.dispatch(accepted, raw, received_monotonic=received)
            span.set_attribute("smtp.reply.code", int(reply[:3]))
            if not reply.startswith("250"):
                span.set_status(trace.StatusCode.ERROR, reply[:9])
        return reply
