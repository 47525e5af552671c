"""One SMTP connection: aiosmtpd's protocol, tightened where the bridge needs it.

What this adds to ``aiosmtpd.smtp.SMTP`` (>= 1.4.6):

* an enhanced status code (RFC 2034/3463) on every 2xx/4xx/5xx reply except the
  greeting and the EHLO/HELO reply, including aiosmtpd's own replies;
* an internal error answers ``451 4.3.0`` (a retry), never aiosmtpd's ``500``
  with the exception text (a bounce that leaks internals);
* NUL, other control characters and invalid UTF-8 in HELO/EHLO/MAIL/RCPT
  arguments are refused (``500 5.5.2``) so they never reach a payload or a log;
* a source route in RCPT (``<@hop:user@domain>``) is kept for routing to refuse
  as a relay attempt, instead of being silently dropped;
* STARTTLS inside TLS is refused (``503 5.5.1``) instead of nesting TLS; a failed
  handshake is the client's problem (logged at info, connection closed), not ours,
  and an abandoned one (the client went silent) ends the session;
* DATA is read in large chunks by :mod:`mailbridge.smtp.data` with a deadline
  for the whole transfer (``data_timeout_seconds``), its memory drawn from the
  listener's process-wide :class:`~mailbridge.smtp.limits.DataBudget` (``452 4.3.1``
  when it is spent: the sender retries later);
* a session deadline (:data:`SESSION_TIMEOUT_SECONDS` without transferring a
  message) on top of aiosmtpd's per-command timeout, so slow trickling clients
  are closed;
* admission: total and per-client-IP session caps (``421 4.7.0`` and close),
  with the client IP taken from a PROXY header when that is enabled;
* every reply starting ``421`` closes the connection after it is sent (aborted
  if the client does not read it within :data:`CLOSE_GRACE_SECONDS`); a timeout
  aborts the connection, so a client that never reads cannot hold its slot;
* one reply per event-loop turn, so one client's pipelined burst cannot starve
  the timers and the other sessions.

Decisions about addresses and messages live in :mod:`mailbridge.smtp.handler`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from typing import Any, AnyStr

from aiosmtpd.smtp import SMTP, TLSSetupException, syntax
from opentelemetry import trace
from opentelemetry.semconv.attributes import network_attributes

from mailbridge.config import SmtpSettings
from mailbridge.observability import tracing
from mailbridge.observability.metrics import Metrics
from mailbridge.smtp import data
from mailbridge.smtp.limits import DataBudget, Reservation, SessionLimits

log = logging.getLogger("mailbridge.smtp")

IDENT = "mailbridge ESMTP"
HAS_ENHANCED = re.compile(r"^[245]\d\d[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")
REPLY = re.compile(r"^([245])(\d\d)([ -])(.*)$", re.DOTALL)
#: Enhanced codes for replies written without one (aiosmtpd's own replies).
DEFAULT_ENHANCED = {
    "221": "2.0.0",
    "250": "2.0.0",
    "252": "2.0.0",
    "214": "2.0.0",
    "220": "2.0.0",  # only "Ready to start TLS"; the greeting has none
    "421": "4.7.0",
    "450": "4.2.0",
    "451": "4.3.0",
    "452": "4.3.1",
    "454": "4.7.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "550": "5.1.1",
    "552": "5.3.4",
    "553": "5.1.3",
    "554": "5.7.0",
    "555": "5.5.4",
}
TEMPORARY_ERROR = "451 4.3.0 Temporary local problem; try again later"
BUSY = "452 4.3.1 Insufficient system resources; try again later"
#: A session that has not transferred a message for this long is closed, however
#: busy it keeps itself with NOOP, RSET or refused commands (each of which restarts
#: aiosmtpd's per-command timer). Setting ``smtp.session_timeout_seconds`` when present.
SESSION_TIMEOUT_SECONDS = 600.0
#: After a 421, time the client has to read it before the connection is aborted.
CLOSE_GRACE_SECONDS = 5.0
#: C0 controls (TAB aside), DEL and C1 controls: never part of a hostname, address or parameter.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
#: What the stdlib address parser (used by aiosmtpd) may raise on hostile paths besides
#: HeaderParseError: fuzzing found IndexError ("<user@") and UnboundLocalError ("a@[ ",
#: which aiosmtpd's stripping happens to keep off the wire), so any exception there
#: means "malformed", never an internal error.
ADDRESS_PARSER_ERRORS = (Exception,)
#: The path almost every client sends: "<local@domain>", both dot-atoms (RFC 5322
#: §3.2.3, ASCII), then the end or blanks before parameters that do not start with a
#: comment. The stdlib parser aiosmtpd uses returns exactly this address and the text
#: after the blanks (it costs ~0.1 ms per command); anything else still goes to it.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = rf"{_ATEXT}(?:\.{_ATEXT})*"
#: After the blanks, the stdlib also swallows any other str.isspace() character (\x1c-\x1f,
#: NBSP, ...): such text goes to it (found by fuzzing the path against it).
PLAIN_PATH = re.compile(rf"<({_DOT_ATOM}@{_DOT_ATOM})>(?:[ \t]*\Z|[ \t]*(?=[^\s(]))")
#: A reply line's text without its CRLF (RFC 5321 §4.5.3.1.5: 512 octets with it).
MAX_REPLY_CHARS = 510
#: aiosmtpd decodes arguments with ``surrogateescape``: a surrogate is a byte that was not UTF-8.
UNDECODABLE = re.compile(r"[\udc80-\udcff]")


def bad_argument(arg: str | None) -> str | None:
    """The refusal for an argument holding bytes no field may carry, else ``None``."""
    if not arg:
        return None
    if CONTROL_CHARACTERS.search(arg):
        return "500 5.5.2 Error: bad syntax (control character)"
    if UNDECODABLE.search(arg):
        return "500 5.5.2 Error: bad UTF-8 syntax"
    return None


def enhance(reply: str) -> str:
    """``reply`` with an enhanced status code added when it has none."""
    match = REPLY.match(reply)
    if match is None or HAS_ENHANCED.match(reply):
        return reply
    code = match.group(1) + match.group(2)
    if code == "220" and not match.group(4).startswith("Ready to start TLS"):
        return reply  # the greeting has no enhanced code (RFC 2034 §3)
    enhanced = DEFAULT_ENHANCED.get(code, f"{match.group(1)}.0.0")
    return f"{code}{match.group(3)}{enhanced} {match.group(4)}"


class _CountingMethods(dict[str, Any]):
    """aiosmtpd looks each verb up here: count it on the way."""

    def __init__(self, methods: dict[str, Any], metrics: Metrics) -> None:
        super().__init__(methods)
        self._metrics = metrics

    def get(self, key: str, default: Any = None) -> Any:
        self._metrics.command(key)
        return super().get(key, default)


class Session(SMTP):
    """The SMTP protocol for one client connection."""

    def __init__(
        self,
        handler: Any,
        *,
        settings: SmtpSettings,
        limits: SessionLimits,
        metrics: Metrics,
        tls_context: ssl.SSLContext | None,
        budget: DataBudget | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        # The stream limit also sets how much is buffered before reading pauses;
        # aiosmtpd's 1001 bytes would cap every read at ~2 KiB.
        self.line_length_limit = data.DISCARD_CHUNK
        super().__init__(
            handler,
            data_size_limit=settings.max_message_size_bytes,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=settings.hostname,
            ident=IDENT,
            tls_context=tls_context,
            require_starttls=settings.require_tls and tls_context is not None,
            timeout=settings.command_timeout_seconds,
            proxy_protocol_timeout=(
                settings.proxy_timeout_seconds if settings.proxy_protocol else None
            ),
            loop=loop,
        )
        self.settings = settings
        self.limits = limits
        self.budget = budget
        self.metrics = metrics
        self._smtp_methods = _CountingMethods(self._smtp_methods, metrics)
        #: The client's IP (from the PROXY header when enabled); None until admitted.
        self.client_ip: str | None = None
        #: Per connection, not per aiosmtpd Session: STARTTLS replaces the Session.
        self.unknown_recipients = 0
        self._plain_replies = False
        self._keep_source_route = False
        self._session_timeout = float(
            getattr(settings, "session_timeout_seconds", SESSION_TIMEOUT_SECONDS)
        )
        self._deadline = self.loop.time() + self._session_timeout

    # --- admission -------------------------------------------------------
    async def admit(self, ip: str) -> bool:
        """Count the session against the caps, or answer 421 and refuse it."""
        refused = self.limits.admit(ip)
        if refused is not None:
            self.metrics.connections_refused.labels(refused).inc()
            log.info("connection refused", extra={"reason": refused})
            text = "shutting down" if refused == "shutting_down" else "too many connections"
            await self.push(f"421 4.7.0 {self.hostname} {text}; try again later")
            return False
        self.client_ip = ip
        self.metrics.sessions.inc()
        self.metrics.sessions_active.set(self.limits.active)
        self.metrics.sessions_per_ip_max.set(self.limits.busiest_ip_sessions)
        return True

    async def _handle_client(self) -> None:
        assert self.session is not None
        peer = self.session.peer
        peer_ip, peer_port = (peer[0], peer[1]) if isinstance(peer, tuple) else (str(peer), 0)
        with tracing.tracer().start_as_current_span(
            "smtp session",
            kind=trace.SpanKind.SERVER,
            attributes={
                network_attributes.NETWORK_PEER_ADDRESS: peer_ip,
                network_attributes.NETWORK_PEER_PORT: peer_port,
            },
        ) as span:
            if self._proxy_timeout is None and not await self.admit(peer_ip):
                span.set_attribute("smtp.refused", True)
                return
            try:
                await super()._handle_client()
            finally:
                span.set_attribute(tracing.SMTP_TLS, self._tls_protocol is not None)

    def connection_lost(self, error: Exception | None) -> None:
        if self.client_ip is not None:
            self.limits.release(self.client_ip)
            self.client_ip = None
            self.metrics.sessions_active.set(self.limits.active)
            self.metrics.sessions_per_ip_max.set(self.limits.busiest_ip_sessions)
        super().connection_lost(error)

    # --- timeouts --------------------------------------------------------
    def _reset_timeout(self, duration: float | None = None) -> None:
        """Restart the timer; a command's timeout never runs past the session deadline.

        aiosmtpd restarts its timer with each recognised command, so a client
        trickling ``NOOP`` one byte a second would stay forever. The timer is set
        at an absolute time, so a client pipelining commands faster than it can
        expire cannot push the deadline on either. DATA passes its own
        ``duration`` (the whole-transfer timeout) and is not cut short.
        """
        if duration is not None:
            super()._reset_timeout(duration)
            return
        when = min(self.loop.time() + self._timeout_duration, self._deadline)
        handle = self._timeout_handle
        if handle is not None:
            if not handle.cancelled() and handle.when() == when:
                return  # at the deadline: re-arming it each command would keep it from firing
            handle.cancel()
        self._timeout_handle = self.loop.call_at(when, self._timeout_cb)

    def _timeout_cb(self) -> None:
        """Drop the connection without flushing: a client that stopped reading our
        replies would otherwise hold its slot (and buffers) for ever."""
        log.info("SMTP session timed out")
        if self.transport is not None:
            self.transport.abort()

    def _close_soon(self) -> None:
        """Close after sending what is queued; abort if the client does not read it."""
        assert self.transport is not None
        transport = self.transport
        transport.close()
        self.loop.call_later(CLOSE_GRACE_SECONDS, transport.abort)

    # --- replies ---------------------------------------------------------
    async def push(self, status: AnyStr) -> None:
        reply = status.decode("utf-8", "replace") if isinstance(status, bytes) else str(status)
        # aiosmtpd echoes an unknown verb: never let a client put CR or other
        # control bytes into our reply line, nor make it longer than RFC 5321 allows.
        reply = CONTROL_CHARACTERS.sub("?", reply)
        if not self._plain_replies or reply[:1] in ("4", "5"):
            reply = enhance(reply)  # EHLO/HELO greet plainly, their errors do not
        reply = reply[:MAX_REPLY_CHARS]
        if self.transport is None or self.transport.is_closing():
            await asyncio.sleep(0)  # let connection_lost end the session
            return
        await super().push(reply)
        if reply.startswith("530"):  # aiosmtpd's require_starttls gate
            self.metrics.reject("tls_required")
        if reply.startswith("421"):
            self._close_soon()
            return
        # One reply per turn of the event loop: a client pipelining a large burst
        # must not keep timers and other sessions waiting until its buffer is empty.
        await asyncio.sleep(0)

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            # The client's handshake failed (garbage, an old version, a scanner):
            # not our error. aiosmtpd closes the connection without a reply.
            cause = error.__cause__
            log.info(
                "TLS handshake failed",
                extra={"error": type(cause).__name__ if cause else "unknown"},
            )
            return "454 4.7.0 TLS handshake failed"
        log.error("internal error in SMTP session", exc_info=error)
        self.metrics.reject("temp_failure")
        return TEMPORARY_ERROR

    # --- commands --------------------------------------------------------
    async def _refused(self, arg: str | None) -> bool:
        """Refuse NUL, other control characters and invalid UTF-8 before any hook sees them."""
        refusal = bad_argument(arg)
        if refusal is None:
            return False
        self.metrics.reject("bad_syntax")
        await self.push(refusal)
        return True

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        plain = PLAIN_PATH.match(arg)
        if plain is not None:
            local_part = plain.group(1).rpartition("@")[0]
            if not (self.local_part_limit and len(local_part) > self.local_part_limit):
                return plain.group(1), arg[plain.end() :]
        try:
            address, rest = super()._getaddr(arg)
        except ADDRESS_PARSER_ERRORS:
            # The stdlib parser raises on some truncated forms ("<user@"): malformed, not
            # an internal error (which would answer 451 and log a traceback per attempt).
            return None, None
        if address and self._keep_source_route and arg.lstrip().startswith("<@"):
            # aiosmtpd drops a source route ("<@hop,@hop:user@domain>"); keep it so
            # routing sees the relay attempt and refuses it (RFC 5321 §3.6.1 allows that).
            route, _, _ = arg.lstrip()[1:].partition(":")
            return f"{route}:{address}", rest
        return address, rest

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        if await self._refused(hostname):
            return
        self._plain_replies = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._plain_replies = False

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        if await self._refused(hostname):
            return
        self._plain_replies = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._plain_replies = False

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self._refused(arg):
            return
        await super().smtp_MAIL(arg)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self._refused(arg):
            return
        self._keep_source_route = True
        try:
            await super().smtp_RCPT(arg)
        finally:
            self._keep_source_route = False

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if self._tls_protocol is not None:
            await self.push("503 5.5.1 TLS already active")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: STARTTLS")
            return
        if not self.tls_context:
            await self.push("454 4.7.0 TLS not available")
            return
        await super().smtp_STARTTLS(arg)
        if self.session is None or self.session.ssl is None:
            # The connection was lost mid-handshake (a timeout abort, a reset): asyncio
            # wakes the handshake waiter but never tells this protocol, which would
            # then wait for ever and keep its session slot. End it here.
            log.info("TLS handshake abandoned")
            self.connection_lost(None)
            return
        self.metrics.tls_sessions.inc()

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        # The bridge takes mail for its routes only; there is nothing to log in to.
        await self.push("502 5.5.1 Error: authentication not available")

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: str) -> None:
        # Never confirm or deny an address (no enumeration), RFC 5321 §3.5.3.
        if not arg:
            await self.push("501 5.5.4 Syntax: VRFY <address>")
            return
        await self.push("252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery")

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        reservation = self.budget.reservation() if self.budget is not None else None
        first_step = data.first_step(self.settings.max_message_size_bytes)
        if reservation is not None and not reservation.ensure(first_step):
            # Before 354 the client has sent no content yet: it will retry later.
            self.metrics.reject("busy")
            await self.push(BUSY)
            return
        try:
            await self._data(reservation)
        finally:
            if reservation is not None:
                reservation.release()

    async def _data(self, reservation: Reservation | None) -> None:
        assert self.envelope is not None
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self._reset_timeout(self.settings.data_timeout_seconds)
        try:
            received = await data.read(
                self._reader,
                max_bytes=self.settings.max_message_size_bytes,
                max_line_bytes=self.settings.max_line_length_bytes,
                reservation=reservation,
            )
        except asyncio.IncompleteReadError:
            # The client vanished before the end of DATA: nothing was accepted.
            self._set_post_data_state()
            return
        # A whole message was transferred: the session has earned more time.
        self._deadline = self.loop.time() + self._session_timeout
        self._reset_timeout()
        if received.verdict is data.Verdict.BUSY:
            self.metrics.reject("busy")
            self._set_post_data_state()
            await self.push(BUSY)
            return
        if received.verdict is data.Verdict.TOO_BIG:
            self.metrics.reject("too_big")
            self._set_post_data_state()
            await self.push("552 5.3.4 Message size exceeds fixed maximum message size")
            return
        if received.verdict is data.Verdict.LINE_TOO_LONG:
            self.metrics.reject("bad_syntax")
            self._set_post_data_state()
            limit = self.settings.max_line_length_bytes
            await self.push(f"500 5.5.2 Line too long (the limit is {limit} bytes)")
            return
        # The reservation is held until the reply: parsing and delivery use the bytes too.
        self.envelope.content = self.envelope.original_content = received.content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push(status)

    @property
    def tls_version(self) -> tuple[str, str] | None:
        """``(version, cipher)`` once STARTTLS has completed."""
        if self._tls_protocol is None or self.transport is None:
            return None
        ssl_object = self.transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return None
        cipher = ssl_object.cipher()
        return str(ssl_object.version()), cipher[0] if cipher else ""
