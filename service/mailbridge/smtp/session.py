"""One SMTP connection: an ``asyncio.Protocol`` running a line/DATA state machine.

Bytes arrive in :meth:`Session.data_received`; complete command lines are handled
synchronously (EHLO, MAIL, RCPT routing, RSET, NOOP, VRFY, QUIT: nothing there
awaits), and only the end of DATA starts a task (the handler's dispatch). There is
no StreamReader and no task per idle connection; per-connection state lives in
``__slots__``. The reply texts are aiosmtpd 1.4.6's (which this replaced), with:

* an enhanced status code (RFC 2034/3463) on every 2xx/4xx/5xx reply except the
  greeting and the EHLO/HELO reply;
* an internal error answers ``451 4.3.0`` (a retry), never a ``500`` with the
  exception text (a bounce that leaks internals);
* NUL, other control characters and invalid UTF-8 in HELO/EHLO/MAIL/RCPT
  arguments are refused (``500 5.5.2``) so they never reach a payload or a log;
* a source route in RCPT (``<@hop:user@domain>``) is kept for routing to refuse
  as a relay attempt, instead of being silently dropped;
* STARTTLS (``loop.start_tls``) discards whatever the client pipelined after the
  command (the STARTTLS injection attack); STARTTLS inside TLS is refused
  (``503 5.5.1``); a failed or abandoned handshake ends the session (logged at info);
* DATA is fed in large chunks to :class:`mailbridge.smtp.data.Receiver` under a
  deadline for the whole transfer (``data_timeout_seconds``), its memory drawn from
  the listener's process-wide :class:`~mailbridge.smtp.limits.DataBudget`
  (``452 4.3.1`` when it is spent: the sender retries later);
* a session deadline (``session_timeout_seconds`` without transferring a
  message) on top of the per-command timeout, so slow trickling clients are closed;
* admission: total and per-client-IP session caps (``421 4.7.0`` and close),
  with the client IP taken from a PROXY header (:mod:`mailbridge.smtp.proxy`)
  from trusted networks when that is enabled;
* every reply starting ``421`` closes the connection after it is sent (aborted
  if the client does not read it within :data:`CLOSE_GRACE_SECONDS`); a timeout
  aborts the connection, so a client that never reads cannot hold its slot;
* backpressure and fairness: reading pauses while a DATA dispatch is in flight
  and while the transport's write buffer is above its high-water mark; at most
  :data:`COMMANDS_PER_TURN` commands are handled per event-loop turn, so one
  client's pipelined burst cannot starve the timers and the other sessions.

Decisions about addresses and messages live in :mod:`mailbridge.smtp.handler`.
Emits the ``smtp session`` span (ended when the connection is lost) and the
session and command metrics; logs nothing per connection at info.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
import ssl
from collections.abc import Callable
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.semconv.attributes import network_attributes

from mailbridge.config import SmtpSettings
from mailbridge.observability import tracing
from mailbridge.observability.metrics import Metrics
from mailbridge.smtp import data, proxy
from mailbridge.smtp.limits import DataBudget, Reservation, SessionLimits

if TYPE_CHECKING:
    from mailbridge.smtp.handler import Handler

log = logging.getLogger("mailbridge.smtp")

IDENT = "mailbridge ESMTP"
HAS_ENHANCED = re.compile(r"^[245]\d\d[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")
REPLY = re.compile(r"^([245])(\d\d)([ -])(.*)$", re.DOTALL)
#: Enhanced codes for replies written without one (the texts kept from aiosmtpd).
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
#: After a 421, time the client has to read it before the connection is aborted.
CLOSE_GRACE_SECONDS = 5.0
#: C0 controls (TAB aside), DEL and C1 controls: never part of a hostname, address or parameter.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
#: What the stdlib address parser (as aiosmtpd used it) may raise on hostile paths besides
#: HeaderParseError: fuzzing found IndexError ("<user@") and UnboundLocalError ("a@[ ",
#: which aiosmtpd's stripping happens to keep off the wire), so any exception there
#: means "malformed", never an internal error.
ADDRESS_PARSER_ERRORS = (Exception,)
#: The path almost every client sends: "<local@domain>", both dot-atoms (RFC 5322
#: §3.2.3, ASCII), then the end or blanks before parameters that do not start with a
#: comment. The stdlib parser (:func:`stdlib_getaddr`) returns exactly this address and the text
#: after the blanks (it costs ~0.1 ms per command); anything else still goes to it.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = rf"{_ATEXT}(?:\.{_ATEXT})*"
#: After the blanks, the stdlib also swallows any other str.isspace() character (\x1c-\x1f,
#: NBSP, ...): such text goes to it (found by fuzzing the path against it).
PLAIN_PATH = re.compile(rf"<({_DOT_ATOM}@{_DOT_ATOM})>(?:[ \t]*\Z|[ \t]*(?=[^\s(]))")
#: A reply line's text without its CRLF (RFC 5321 §4.5.3.1.5: 512 octets with it).
MAX_REPLY_CHARS = 510
#: Arguments are decoded with ``surrogateescape``: a surrogate is a byte that was not UTF-8.
UNDECODABLE = re.compile(r"[\udc80-\udcff]")


#: Longest command line (CRLF excluded) before ``500 Command line too long``
#: (RFC 5321 §4.5.3.1.4); MAIL after EHLO may carry SIZE and SMTPUTF8 too.
COMMAND_LINE_LIMIT = 512
MAIL_EXTENDED_LINE_LIMIT = COMMAND_LINE_LIMIT + 26 + 10
#: Bytes buffered without a line end before the line is thrown away as too long.
LINE_BUFFER_LIMIT = data.DISCARD_CHUNK
#: Commands handled in one go before yielding to the event loop.
COMMANDS_PER_TURN = 16
#: Unknown verbs a session may send; the last one closes it.
BOGUS_LIMIT = 5
#: RFC 3207 §4: what a client may say before STARTTLS when TLS is required.
ALLOWED_BEFORE_STARTTLS = frozenset({"NOOP", "EHLO", "STARTTLS", "QUIT"})
#: HELP texts: the verbs HELP lists (STARTTLS only when TLS is configured).
SYNTAX = {
    "AUTH": ("AUTH <mechanism>", ""),
    "DATA": ("DATA", ""),
    "EHLO": ("EHLO hostname", ""),
    "HELO": ("HELO hostname", ""),
    "HELP": ("HELP [command]", ""),
    "MAIL": ("MAIL FROM: <address>", " [SP <mail-parameters>]"),
    "NOOP": ("NOOP [ignored]", ""),
    "QUIT": ("QUIT", ""),
    "RCPT": ("RCPT TO: <address>", " [SP <mail-parameters>]"),
    "RSET": ("RSET", ""),
    "STARTTLS": ("STARTTLS", ""),
    "VRFY": ("VRFY <address>", ""),
}

# Session states.
_PROXY, _COMMAND, _DATA, _DISPATCH, _TLS, _HANDSHAKE, _CLOSED = range(7)


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


def stdlib_getaddr(arg: str, local_part_limit: int = 0) -> tuple[str | None, str | None]:
    """A MAIL/RCPT path read by the stdlib header parser, exactly as aiosmtpd 1.4.6 reads it.

    ``(None, None)`` when it is malformed; ``("", "")`` for an empty argument.
    """
    if not arg:
        return "", ""
    try:
        if arg.lstrip().startswith("<"):
            address, rest = get_angle_addr(arg)
        else:
            address, rest = get_addr_spec(arg)
    except HeaderParseError:
        return None, None
    addr = address.addr_spec
    if local_part_limit and len(addr.rpartition("@")[0]) > local_part_limit:
        return None, None
    return addr, rest


def _params(options: list[str]) -> dict[str, str | bool] | None:
    """ESMTP parameters as a dict; ``None`` if one is malformed (RFC 1869)."""
    result: dict[str, str | bool] = {}
    for option in options:
        name, eq, value = option.partition("=")
        if not name.isalnum() or (eq and not value):
            return None
        result[name] = value if eq else True
    return result


def _strip_keyword(keyword: str, arg: str) -> str | None:
    if arg[: len(keyword)].upper() == keyword:
        return arg[len(keyword) :].strip()
    return None


class Envelope:
    """One mail transaction: sender, recipients and, after DATA, the content."""

    __slots__ = (
        "content",
        "mail_from",
        "mail_options",
        "original_content",
        "rcpt_options",
        "rcpt_tos",
        "smtp_utf8",
    )

    def __init__(self) -> None:
        self.mail_from: str | None = None
        self.mail_options: list[str] = []
        self.rcpt_tos: list[str] = []
        self.rcpt_options: list[str] = []
        self.smtp_utf8 = False
        self.content: bytes | bytearray | None = None
        self.original_content: bytes | bytearray | None = None


class Session(asyncio.Protocol):
    """The SMTP protocol for one client connection."""

    __slots__ = (
        "_bogus",
        "_buffer",
        "_context",
        "_deadline",
        "_eof",
        "_keep_source_route",
        "_on_lost",
        "_out",
        "_raw_transport",
        "_reading_paused",
        "_receiver",
        "_require_tls",
        "_reservation",
        "_scheduled",
        "_skipping_line",
        "_span",
        "_state",
        "_task",
        "_timeout_at",
        "_timer",
        "_tls",
        "_write_paused",
        "budget",
        "client_ip",
        "envelope",
        "extended_smtp",
        "handler",
        "host_name",
        "limits",
        "local_part_limit",
        "loop",
        "metrics",
        "peer",
        "settings",
        "tls_context",
        "transport",
        "unknown_recipients",
    )

    def __init__(
        self,
        handler: Handler,
        *,
        settings: SmtpSettings,
        limits: SessionLimits,
        metrics: Metrics,
        tls_context: ssl.SSLContext | None,
        budget: DataBudget | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        on_lost: Callable[[Session], None] | None = None,
    ) -> None:
        self.handler = handler
        self.settings = settings
        self.limits = limits
        self.budget = budget
        self.metrics = metrics
        self.tls_context = tls_context
        self.loop = loop if loop is not None else asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.envelope = Envelope()
        self.host_name: str | None = None
        self.extended_smtp = False
        #: The client's IP (from the PROXY header when enabled); None until admitted.
        self.client_ip: str | None = None
        self.peer: Any = None
        #: Per connection: STARTTLS does not reset it.
        self.unknown_recipients = 0
        self.local_part_limit = 0
        self._keep_source_route = False
        self._state = _COMMAND
        self._buffer = bytearray()
        self._out: list[str] = []
        self._skipping_line = False
        self._bogus = BOGUS_LIMIT
        self._tls = False
        self._raw_transport: asyncio.Transport | None = None
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        #: When the session times out; the timer may be set earlier (see _reset_timeout).
        self._timeout_at = 0.0
        self._span: trace.Span | None = None
        self._context: contextvars.Context | None = None
        self._receiver: data.Receiver | None = None
        self._reservation: Reservation | None = None
        self._task: asyncio.Task[None] | None = None
        self._write_paused = False
        self._reading_paused = False
        self._scheduled = False
        self._eof = False
        self._on_lost = on_lost
        self._require_tls = settings.require_tls and tls_context is not None

    # --- connection ------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = peer
        peer_ip, peer_port = (peer[0], peer[1]) if isinstance(peer, tuple) else (str(peer), 0)
        self._span = tracing.tracer().start_span(
            "smtp session",
            kind=trace.SpanKind.SERVER,
            attributes={
                network_attributes.NETWORK_PEER_ADDRESS: peer_ip,
                network_attributes.NETWORK_PEER_PORT: peer_port,
            },
        )
        self._deadline = self.loop.time() + self.settings.session_timeout_seconds
        if self.settings.proxy_protocol:
            self._state = _PROXY
            self._reset_timeout(self.settings.proxy_timeout_seconds)
            return
        self._reset_timeout()
        if self.admit(peer_ip):
            self._greet()
        else:
            self._flush()

    def _greet(self) -> None:
        self._reply(f"220 {self.settings.hostname} {IDENT}")
        self._flush()

    def admit(self, ip: str) -> bool:
        """Count the session against the caps, or answer 421 and refuse it."""
        refused = self.limits.admit(ip)
        if refused is not None:
            self.metrics.connections_refused.labels(refused).inc()
            log.info("connection refused", extra={"reason": refused})
            if self._span is not None:
                self._span.set_attribute("smtp.refused", True)
            text = "shutting down" if refused == "shutting_down" else "too many connections"
            self._reply(f"421 4.7.0 {self.settings.hostname} {text}; try again later")
            return False
        self.client_ip = ip
        self.metrics.sessions.inc()
        self.metrics.sessions_active.set(self.limits.active)
        self.metrics.sessions_per_ip_max.set(self.limits.busiest_ip_sessions)
        return True

    def connection_lost(self, error: Exception | None) -> None:
        if self._state == _CLOSED and self.transport is None:
            return  # already cleaned up (a handshake that never told the protocol)
        self._state = _CLOSED
        self._buffer = bytearray()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._raw_transport is not None:
            self._raw_transport.close()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the client is gone: nobody would hear the reply
        if self._receiver is not None:
            self._receiver = None
            self._release_reservation()
        if self.client_ip is not None:
            self.limits.release(self.client_ip)
            self.client_ip = None
            self.metrics.sessions_active.set(self.limits.active)
            self.metrics.sessions_per_ip_max.set(self.limits.busiest_ip_sessions)
        if self._span is not None:
            self._span.set_attribute(tracing.SMTP_TLS, self._tls)
            self._span.end()
            self._span = None
        self.transport = None
        if self._on_lost is not None:
            self._on_lost(self)

    def eof_received(self) -> bool | None:
        """The client stopped sending: answer what it sent, then close.

        Work under way (a dispatch, a handshake, commands deferred to the next loop
        turn or held back by a full write buffer) closes the connection when it is done.
        """
        self._eof = True
        if self._state == _COMMAND and not self._scheduled:
            self._process()  # closes unless something is still pending
        elif self._state in (_DATA, _PROXY):
            self._close()  # an unfinished message or header: nothing to answer
        # True keeps the socket open for our replies (it has no effect over TLS).
        return not self._tls and self._state != _CLOSED

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._schedule()

    # --- timeouts --------------------------------------------------------
    def _reset_timeout(self, duration: float | None = None) -> None:
        """Move the timeout; a command's timeout never runs past the session deadline.

        The timeout is an absolute time, so a client pipelining commands faster than
        it can expire cannot push the deadline on either. DATA and the PROXY header
        pass their own ``duration``, which the deadline does not cut short.

        A later timeout does not re-arm the timer (a cancel and a new timer for every
        command): the timer stays where it is, and when it fires early it is set again
        for the time now due. Only an earlier timeout replaces it.
        """
        if duration is not None:
            when = self.loop.time() + duration
        else:
            when = min(self.loop.time() + self.settings.command_timeout_seconds, self._deadline)
        self._timeout_at = when
        timer = self._timer
        if timer is not None:
            if timer.when() <= when:
                return  # it fires first, then sets itself again for ``when``
            timer.cancel()
        self._timer = self.loop.call_at(when, self._timeout_cb)

    def _timeout_cb(self) -> None:
        """Drop the connection without flushing: a client that stopped reading our
        replies would otherwise hold its slot (and buffers) for ever."""
        timer, self._timer = self._timer, None
        if timer is not None and self._timeout_at > timer.when():
            self._timer = self.loop.call_at(self._timeout_at, self._timeout_cb)
            return  # moved later since the timer was set
        log.info("SMTP session timed out")
        transport = self._raw_transport or self.transport
        if transport is not None:
            transport.abort()
        if self._state in (_TLS, _HANDSHAKE):
            # Mid-handshake the TLS layer does not tell this protocol: end it here.
            self.connection_lost(None)

    def _close(self) -> None:
        """Close after what is queued is sent."""
        self._state = _CLOSED
        if self.transport is not None:
            self.transport.close()

    def _close_soon(self) -> None:
        """Close after sending what is queued; abort if the client does not read it."""
        self._state = _CLOSED
        transport = self.transport
        if transport is not None:
            transport.close()
            self.loop.call_later(CLOSE_GRACE_SECONDS, transport.abort)

    # --- replies ---------------------------------------------------------
    def _reply(self, reply: str, *, plain: bool = False) -> None:
        """Queue one reply line (sent by :meth:`_flush`)."""
        # A reply may echo client text: never let a client put CR or other control
        # bytes into our reply line, nor make it longer than RFC 5321 allows.
        if CONTROL_CHARACTERS.search(reply):
            reply = CONTROL_CHARACTERS.sub("?", reply)
        if not plain or reply[:1] in ("4", "5"):
            reply = enhance(reply)  # EHLO/HELO greet plainly, their errors do not
        if len(reply) > MAX_REPLY_CHARS:
            reply = reply[:MAX_REPLY_CHARS]
        self._out.append(reply)
        if reply[:3] == "421":
            self._flush()
            self._close_soon()

    def _flush(self) -> None:
        if not self._out:
            return
        text = "\r\n".join(self._out) + "\r\n"
        self._out.clear()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(text.encode("utf-8", "replace"))

    def push(self, reply: str) -> None:
        """Send one reply now (the listener's shutdown notice)."""
        if self.transport is None or self.transport.is_closing():
            return
        self._reply(reply)
        self._flush()

    def _internal_error(self, error: BaseException) -> None:
        log.error("internal error in SMTP session", exc_info=error)
        self.metrics.reject("temp_failure")
        self._reply(TEMPORARY_ERROR)

    # --- input -----------------------------------------------------------
    def data_received(self, chunk: bytes) -> None:
        state = self._state
        if state == _DATA:
            self._feed_data(chunk)
            if self._state != _DATA:
                self._process()
            return
        if state in (_CLOSED, _TLS):
            return  # plaintext after STARTTLS is dropped (RFC 3207 §4.2); after close, noise
        self._buffer += chunk
        if state == _HANDSHAKE:
            return  # decrypted: a TLS 1.3 client may send EHLO with its Finished message
        if state == _PROXY:
            self._read_proxy()
            return
        self._process()

    def _schedule(self) -> None:
        if not self._scheduled and self._state != _CLOSED:
            self._scheduled = True
            self.loop.call_soon(self._continue)

    def _continue(self) -> None:
        self._scheduled = False
        if self._state == _COMMAND:
            self._process()
        if self._eof and self._state == _COMMAND and not self._scheduled:
            self._close()

    def _blocked(self) -> bool:
        return self._state != _COMMAND or self._write_paused

    def _pause(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def _process(self) -> None:
        """Handle the complete command lines buffered, a bounded number per turn."""
        try:
            handled = 0
            buffer = self._buffer
            while self._state == _COMMAND and not self._write_paused:
                end = buffer.find(b"\n")
                if end == -1:
                    if len(buffer) > LINE_BUFFER_LIMIT:
                        self._skipping_line = True
                        buffer.clear()
                    break
                if handled >= COMMANDS_PER_TURN:
                    self._schedule()
                    break
                handled += 1
                line = bytes(buffer[:end])
                del buffer[: end + 1]
                if self._skipping_line:
                    self._skipping_line = False
                    self._reply("500 Command line too long")
                    continue
                try:
                    self._command(line.rstrip(b"\r\n"))
                except Exception as error:  # never a 500 with the exception text
                    self._internal_error(error)
                if self._state == _DATA and buffer:
                    self._buffer = bytearray()
                    self._feed_data(buffer)
                    buffer = self._buffer
        finally:
            self._flush()
        if self._state == _CLOSED:
            return
        if self._state == _DATA:
            self._resume()  # the message streams in whatever else is going on
        elif self._state == _DISPATCH and not self._buffer and not self._write_paused:
            # Waiting for the handler with nothing queued: most clients send nothing
            # until our reply, so reading stays on (no pause and resume, two epoll
            # calls, per message); whatever does arrive meanwhile pauses it here.
            pass
        elif self._blocked() or self._scheduled:
            self._pause()
        else:
            self._resume()
            if self._eof:
                self._close()

    def _command(self, line: bytes) -> None:
        if not line:
            self._reply("500 Error: bad syntax")
            return
        command_bytes, _, arg_bytes = line.partition(b" ")
        try:
            command = command_bytes.upper().decode("ascii")
        except UnicodeDecodeError:
            self._reply("500 Error: bad syntax")
            return
        arg = str(arg_bytes.strip(), "utf-8", "surrogateescape") if arg_bytes else None
        limit = COMMAND_LINE_LIMIT
        if command == "MAIL" and self.extended_smtp:
            limit = MAIL_EXTENDED_LINE_LIMIT
        if len(line) > limit:
            self._reply("500 Command line too long")
            return
        if self._require_tls and not self._tls and command not in ALLOWED_BEFORE_STARTTLS:
            self.metrics.reject("tls_required")
            self._reply("530 Must issue a STARTTLS command first")
            return
        self.metrics.command(command)
        method = _COMMANDS.get(command)
        if method is None:
            self._bogus -= 1
            if self._bogus < 1:
                self._reply("502 5.5.1 Too many unrecognized commands, goodbye.")
                self._flush()
                self._close()
                return
            self._reply(f'500 Error: command "{command}" not recognized')
            return
        self._reset_timeout()
        method(self, arg)

    # --- PROXY -----------------------------------------------------------
    def _read_proxy(self) -> None:
        try:
            parsed = proxy.parse(self._buffer)
        except proxy.Invalid:
            log.info("invalid PROXY header; connection closed")
            self._close()
            return
        if parsed is None:
            return
        proxy_data, length = parsed
        del self._buffer[:length]
        self._state = _COMMAND
        if not self.handler.handle_PROXY(self, proxy_data):
            self._flush()
            if self._state != _CLOSED:
                self._close()
            return
        self._reset_timeout()
        self._greet()
        if self._state == _COMMAND:
            self._process()

    # --- commands --------------------------------------------------------
    def _refused(self, arg: str | None) -> bool:
        """Refuse NUL, other control characters and invalid UTF-8 before any hook sees them."""
        refusal = bad_argument(arg)
        if refusal is None:
            return False
        self.metrics.reject("bad_syntax")
        self._reply(refusal)
        return True

    def _helo_needed(self) -> bool:
        if not self.host_name:
            self._reply("503 Error: send HELO first")
            return True
        return False

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        plain = PLAIN_PATH.match(arg)
        if plain is not None:
            local_part = plain.group(1).rpartition("@")[0]
            if not (self.local_part_limit and len(local_part) > self.local_part_limit):
                return plain.group(1), arg[plain.end() :]
        try:
            address, rest = stdlib_getaddr(arg, self.local_part_limit)
        except ADDRESS_PARSER_ERRORS:
            # The stdlib parser raises on some truncated forms ("<user@"): malformed, not
            # an internal error (which would answer 451 and log a traceback per attempt).
            return None, None
        if address and self._keep_source_route and arg.lstrip().startswith("<@"):
            # The stdlib drops a source route ("<@hop,@hop:user@domain>"); keep it so
            # routing sees the relay attempt and refuses it (RFC 5321 §3.6.1 allows that).
            route, _, _ = arg.lstrip()[1:].partition(":")
            return f"{route}:{address}", rest
        return address, rest

    def _reset_transaction(self) -> None:
        self.envelope = Envelope()

    def smtp_HELO(self, hostname: str | None) -> None:
        if self._refused(hostname):
            return
        if not hostname:
            self._reply("501 Syntax: HELO hostname")
            return
        self._reset_transaction()
        self.extended_smtp = False
        self.host_name = hostname
        self._reply(f"250 {self.settings.hostname}", plain=True)

    def smtp_EHLO(self, hostname: str | None) -> None:
        if self._refused(hostname):
            return
        if not hostname:
            self._reply("501 Syntax: EHLO hostname")
            return
        self._reset_transaction()
        self.extended_smtp = True
        response = [f"250-{self.settings.hostname}"]
        if self.settings.max_message_size_bytes:
            response.append(f"250-SIZE {self.settings.max_message_size_bytes}")
        response += ["250-8BITMIME", "250-SMTPUTF8"]
        if self.tls_context is not None and not self._tls:
            response.append("250-STARTTLS")
        response.append("250 HELP")
        for line in self.handler.handle_EHLO(self, hostname, response):
            self._reply(line, plain=True)

    def smtp_NOOP(self, arg: str | None) -> None:
        self._reply("250 OK")

    def smtp_QUIT(self, arg: str | None) -> None:
        if arg:
            self._reply("501 Syntax: QUIT")
            return
        self._reply("221 Bye")
        self._flush()
        self._close()

    def smtp_RSET(self, arg: str | None) -> None:
        if arg:
            self._reply("501 Syntax: RSET")
            return
        self._reset_transaction()
        self._reply("250 OK")

    def smtp_HELP(self, arg: str | None) -> None:
        code = 250
        if arg:
            syntax = SYNTAX.get(arg.upper())
            if syntax is not None and (arg.upper() != "STARTTLS" or self.tls_context):
                text = syntax[0] + (syntax[1] if self.extended_smtp else "")
                self._reply("250 Syntax: " + text)
                return
            code = 501
        verbs = sorted(v for v in SYNTAX if v != "STARTTLS" or self.tls_context)
        self._reply(f"{code} Supported commands: {' '.join(verbs)}")

    def smtp_AUTH(self, arg: str | None) -> None:
        # The bridge takes mail for its routes only; there is nothing to log in to.
        self._reply("502 5.5.1 Error: authentication not available")

    def smtp_VRFY(self, arg: str | None) -> None:
        # Never confirm or deny an address (no enumeration), RFC 5321 §3.5.3.
        if not arg:
            self._reply("501 5.5.4 Syntax: VRFY <address>")
            return
        self._reply("252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery")

    def smtp_EXPN(self, arg: str | None) -> None:
        self._reply("502 EXPN not implemented")

    def _path_syntax(self, usage: str) -> str:
        """The 501 reply for a malformed MAIL or RCPT command."""
        if self.extended_smtp:
            return f"501 Syntax: {usage} [SP <mail-parameters>]"
        return f"501 Syntax: {usage}"

    def _path(self, arg: str | None, keyword: str, syntaxerr: str) -> tuple[str, str] | None:
        """The address and parameter text after ``keyword``, or None once refused."""
        if arg is not None:
            arg = _strip_keyword(keyword, arg)
        if arg is None:
            self._reply(syntaxerr)
            return None
        address, rest = self._getaddr(arg)
        if address is None:
            self._reply("553 5.1.3 Error: malformed address")
            return None
        if not address or (not self.extended_smtp and rest):
            self._reply(syntaxerr)
            return None
        assert rest is not None
        return address, rest

    def smtp_MAIL(self, arg: str | None) -> None:
        if self._refused(arg) or self._helo_needed():
            return
        syntaxerr = self._path_syntax("MAIL FROM: <address>")
        path = self._path(arg, "FROM:", syntaxerr)
        if path is None:
            return
        address, rest = path
        if self.envelope.mail_from:
            self._reply("503 Error: nested MAIL command")
            return
        mail_options = rest.upper().split()
        params = _params(mail_options)
        if params is None:
            self._reply(syntaxerr)
            return
        body = params.pop("BODY", "7BIT")
        if body not in ("7BIT", "8BITMIME"):
            self._reply("501 Error: BODY can only be one of 7BIT, 8BITMIME")
            return
        smtputf8 = params.pop("SMTPUTF8", False)
        if not isinstance(smtputf8, bool):
            self._reply("501 Error: SMTPUTF8 takes no arguments")
            return
        self.envelope.smtp_utf8 = smtputf8
        size = params.pop("SIZE", None)
        if size:
            if isinstance(size, bool) or not size.isdigit():
                self._reply(syntaxerr)
                return
            limit = self.settings.max_message_size_bytes
            if limit and int(size) > limit:
                self._reply("552 Error: message size exceeds fixed maximum message size")
                return
        if params:
            self._reply("555 MAIL FROM parameters not recognized or not implemented")
            return
        self._reply(self.handler.handle_MAIL(self, self.envelope, address, mail_options))

    def smtp_RCPT(self, arg: str | None) -> None:
        if self._refused(arg) or self._helo_needed():
            return
        if not self.envelope.mail_from:
            self._reply("503 Error: need MAIL command")
            return
        syntaxerr = self._path_syntax("RCPT TO: <address>")
        self._keep_source_route = True
        try:
            path = self._path(arg, "TO:", syntaxerr)
        finally:
            self._keep_source_route = False
        if path is None:
            return
        address, rest = path
        rcpt_options = rest.upper().split()
        params = _params(rcpt_options)
        if params is None:
            self._reply(syntaxerr)
            return
        if params:
            self._reply("555 RCPT TO parameters not recognized or not implemented")
            return
        self._reply(self.handler.handle_RCPT(self, self.envelope, address, rcpt_options))

    def smtp_STARTTLS(self, arg: str | None) -> None:
        if self._tls:
            self._reply("503 5.5.1 TLS already active")
            return
        if arg:
            self._reply("501 5.5.4 Syntax: STARTTLS")
            return
        if self.tls_context is None:
            self._reply("454 4.7.0 TLS not available")
            return
        self._reply("220 Ready to start TLS")
        self._flush()
        # Whatever the client pipelined after STARTTLS is plaintext it must not be
        # able to inject into the TLS session (RFC 3207 §4.2, CVE-2011-0411 class).
        self._buffer = bytearray()
        self._state = _TLS
        self._pause()
        self._task = self.loop.create_task(self._start_tls())

    async def _start_tls(self) -> None:
        raw = self.transport
        assert raw is not None and self.tls_context is not None
        self._raw_transport = raw
        self._reading_paused = False  # start_tls resumes reading on the TLS transport
        # From here on data_received gets what the TLS layer decrypted: keep it.
        self._state = _HANDSHAKE
        try:
            transport = await self.loop.start_tls(raw, self, self.tls_context, server_side=True)
        except Exception as error:
            # The client's handshake failed (garbage, an old version, a scanner) or it
            # went away: not our error, and asyncio does not tell this protocol.
            log.info("TLS handshake failed", extra={"error": type(error).__name__})
            raw.close()
            self.connection_lost(None)
            return
        if self._state != _HANDSHAKE or transport is None:
            log.info("TLS handshake abandoned")
            raw.close()
            self.connection_lost(None)
            return
        self.transport = transport
        self._tls = True
        self.metrics.tls_sessions.inc()
        # RFC 3207 §4.2: the client starts over (EHLO again) on the new channel.
        self.host_name = None
        self.extended_smtp = False
        self._reset_transaction()
        self._state = _COMMAND
        self._task = None
        self._process()

    def smtp_DATA(self, arg: str | None) -> None:
        if self._helo_needed():
            return
        if not self.envelope.rcpt_tos:
            self._reply("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            self._reply("501 5.5.4 Syntax: DATA")
            return
        reservation = self.budget.reservation() if self.budget is not None else None
        max_bytes = self.settings.max_message_size_bytes
        if reservation is not None and not reservation.ensure(data.first_step(max_bytes)):
            # Before 354 the client has sent no content yet: it will retry later.
            self.metrics.reject("busy")
            self._reply(BUSY)
            return
        self._reply("354 End data with <CR><LF>.<CR><LF>")
        self._reservation = reservation
        self._receiver = data.Receiver(
            max_bytes=max_bytes,
            max_line_bytes=self.settings.max_line_length_bytes,
            reservation=reservation,
        )
        self._state = _DATA
        self._reset_timeout(self.settings.data_timeout_seconds)

    def _feed_data(self, chunk: bytes | bytearray) -> None:
        receiver = self._receiver
        assert receiver is not None
        used = receiver.feed(chunk)
        if used is None:
            return
        received = receiver.result
        assert received is not None
        self._receiver = None
        if used < len(chunk):
            self._buffer[:0] = chunk[used:]
        # A whole message was transferred: the session has earned more time.
        self._deadline = self.loop.time() + self.settings.session_timeout_seconds
        self._state = _COMMAND
        self._reset_timeout()
        if received.verdict is not data.Verdict.OK:
            self._release_reservation()
            self._reset_transaction()
            if received.verdict is data.Verdict.BUSY:
                self.metrics.reject("busy")
                self._reply(BUSY)
            elif received.verdict is data.Verdict.TOO_BIG:
                self.metrics.reject("too_big")
                self._reply("552 5.3.4 Message size exceeds fixed maximum message size")
            else:
                self.metrics.reject("bad_syntax")
                limit = self.settings.max_line_length_bytes
                self._reply(f"500 5.5.2 Line too long (the limit is {limit} bytes)")
            return
        # The reservation is held until the reply: parsing and delivery use the bytes too.
        self.envelope.content = self.envelope.original_content = received.content
        self._state = _DISPATCH  # reading pauses if the client sends before the reply
        if self._context is None:
            context = contextvars.copy_context()
            if self._span is not None:
                context.run(otel_context.attach, trace.set_span_in_context(self._span))
            self._context = context
        self._task = self.loop.create_task(self._dispatch(), context=self._context)

    async def _dispatch(self) -> None:
        envelope = self.envelope
        try:
            status = await self.handler.handle_DATA(self, envelope)
        except Exception as error:
            self._internal_error(error)
        else:
            self._reply(status)
        finally:
            self._release_reservation()
            envelope.content = envelope.original_content = None
        self._task = None
        if self._state != _DISPATCH:
            return  # closed meanwhile (a 421 reply, a timeout, the client)
        self._reset_transaction()
        self._state = _COMMAND
        self._flush()
        self._schedule()

    def _release_reservation(self) -> None:
        if self._reservation is not None:
            self._reservation.release()
            self._reservation = None

    @property
    def tls_version(self) -> tuple[str, str] | None:
        """``(version, cipher)`` once STARTTLS has completed."""
        if not self._tls or self.transport is None:
            return None
        ssl_object = self.transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return None
        cipher = ssl_object.cipher()
        return str(ssl_object.version()), cipher[0] if cipher else ""

    @property
    def in_transaction(self) -> bool:
        """Whether a mail transaction is open (MAIL given, or DATA under way)."""
        return bool(self.envelope.mail_from) or self._state in (_DATA, _DISPATCH)

    @property
    def idle(self) -> bool:
        """Nothing under way: no task, no deferred work (the session waits for input)."""
        return (self._task is None or self._task.done()) and not self._scheduled


_COMMANDS: dict[str, Callable[[Session, str | None], None]] = {
    "HELO": Session.smtp_HELO,
    "EHLO": Session.smtp_EHLO,
    "NOOP": Session.smtp_NOOP,
    "QUIT": Session.smtp_QUIT,
    "RSET": Session.smtp_RSET,
    "HELP": Session.smtp_HELP,
    "AUTH": Session.smtp_AUTH,
    "VRFY": Session.smtp_VRFY,
    "EXPN": Session.smtp_EXPN,
    "MAIL": Session.smtp_MAIL,
    "RCPT": Session.smtp_RCPT,
    "STARTTLS": Session.smtp_STARTTLS,
    "DATA": Session.smtp_DATA,
}
