"""Fuzz targets: bytes in, the bridge's invariants checked; any exception is a finding.

Three targets, shared by the hypothesis smoke run in the test suite
(``tests/hardening/test_fuzz_smoke.py``) and the coverage-guided atheris run
(``fuzz/run.py``, see ``fuzz/README.md``):

``smtp_session(chunks)``
    Feeds bytes, chunk by chunk, to a real :class:`mailbridge.smtp.session.Session`
    (with the real :class:`~mailbridge.smtp.handler.Handler`, routes with a
    catch-all, small limits) over an in-memory transport. Checks: every reply is
    one well-formed line with an enhanced code on 4xx/5xx; no internal error
    (``451 4.3.0``) or exception text; no message is dispatched that the client
    did not end with ``<CRLF>.<CRLF>``, and its bytes are exactly what was sent;
    no accepted recipient is a relay form or carries control bytes; the session
    always settles (never hangs) and gives its DATA budget back.
``mime(raw)``
    :func:`mailbridge.parsing.parse` and the payload build: never raises, every
    string is valid UTF-8 without NUL, the encoded payload is valid JSON.
``address_path(arg)``
    The session's own reading of a ``MAIL FROM:``/``RCPT TO:`` path (with its fast
    path for plain ``<local@domain>``) against aiosmtpd's stdlib-based reading:
    the same address and the same rest, or both malformed.
``data_reader(stream, ...)``
    :func:`mailbridge.smtp.data.read` against an independent line-by-line model
    of RFC 5321 §4.5.2 (end only at ``<CRLF>.<CRLF>``, one leading dot removed),
    in arbitrary chunkings, with size, line and budget limits.

Everything runs in-process, on one private event loop, with no sockets.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import json
import re
from collections.abc import Sequence
from typing import Any

from aiosmtpd.smtp import SMTP as AiosmtpdSMTP

from mailbridge import parsing, payload, pipeline, routing
from mailbridge.config import ParsingSettings, SmtpSettings
from mailbridge.observability.metrics import Metrics
from mailbridge.payload import Envelope
from mailbridge.smtp import data
from mailbridge.smtp.handler import Handler
from mailbridge.smtp.limits import DataBudget, SessionLimits
from mailbridge.smtp.session import ADDRESS_PARSER_ERRORS, HAS_ENHANCED, TEMPORARY_ERROR, Session

_LOOP: asyncio.AbstractEventLoop | None = None
_METRICS: Metrics | None = None
#: Event-loop turns a session may take to settle after one chunk before it counts as a hang.
SETTLE_TURNS = 20_000

ROUTES = routing.compile_routes(
    {"billing": ["billing@example.com"], "support": ["*@support.example.com"], "all": ["*"]}
)
SMTP = SmtpSettings(
    hostname="mx.test",
    max_message_size_bytes=4096,
    max_line_length_bytes=1000,
    max_recipients=3,
    max_unknown_recipients=3,
    max_sessions=10,
    max_sessions_per_ip=10,
)
#: Room for about two messages at the size limit: enough to accept, small enough to refuse.
BUDGET_BYTES = 2 * data.wire_cap(SMTP.max_message_size_bytes)
PARSING = ParsingSettings(header_prefixes=["X-"], max_inline_attachment_bytes=1024)
_REPLY_LINE = re.compile(rb"^[2-5]\d\d[ -][^\x00-\x08\x0a-\x1f\x7f]*$")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\ud800-\udfff]")


def _loop() -> asyncio.AbstractEventLoop:
    global _LOOP
    if _LOOP is None or _LOOP.is_closed():
        _LOOP = asyncio.new_event_loop()
    return _LOOP


def _metrics() -> Metrics:
    global _METRICS
    if _METRICS is None:
        _METRICS = Metrics()
    return _METRICS


# --- the SMTP session ------------------------------------------------------


class _Transport(asyncio.Transport):
    """An in-memory transport: what the session writes is kept, close() loses the connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.out = bytearray()
        self._loop = loop
        self._closing = False
        self._protocol: asyncio.BaseProtocol | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._closing:
            self.out += data

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            if self._protocol is not None:
                self._loop.call_soon(self._protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("192.0.2.1", 40000), "sockname": ("192.0.2.25", 25)}.get(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_reading(self) -> bool:
        return not self._closing

    def get_write_buffer_size(self) -> int:
        return 0

    def can_write_eof(self) -> bool:
        return False


class _Dispatch:
    """Records accepted messages; answers 250."""

    def __init__(self) -> None:
        self.accepted: list[tuple[Envelope, bytes]] = []

    async def __call__(self, envelope: Envelope, raw: bytes, *, received_monotonic: float) -> str:
        self.accepted.append((envelope, raw))
        return "250 2.0.0 Ok: queued"


def connect(
    handler: Handler,
    transport: _Transport,
    *,
    limits: SessionLimits,
    budget: DataBudget | None,
    settings: SmtpSettings = SMTP,
) -> Session:
    """A :class:`Session` on ``transport``, connected as the listener connects one."""
    session = Session(
        handler,
        settings=settings,
        limits=limits,
        metrics=_metrics(),
        tls_context=None,
        budget=budget,
        loop=transport._loop,
    )
    transport.set_protocol(session)
    session.connection_made(transport)
    return session


async def _settle(session: Session) -> None:
    for _ in range(SETTLE_TURNS):
        if session.idle:
            return
        await asyncio.sleep(0)
    raise AssertionError("the session did not settle: it neither waits for input nor ended")


async def _run_session(chunks: Sequence[bytes]) -> tuple[bytes, _Dispatch, DataBudget]:
    loop = asyncio.get_running_loop()
    dispatch = _Dispatch()
    budget = DataBudget(BUDGET_BYTES)
    failures: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: failures.append(context))
    transport = _Transport(loop)
    session = connect(
        Handler(SMTP, ROUTES, dispatch, _metrics()),
        transport,
        limits=SessionLimits(max_sessions=10, max_sessions_per_ip=10),
        budget=budget,
    )
    try:
        await _settle(session)
        for chunk in chunks:
            if transport.is_closing():
                break
            session.data_received(chunk)
            await _settle(session)
    finally:
        transport.close()  # the client goes away
        for _ in range(SETTLE_TURNS):
            if session.transport is None and session.idle:
                break
            await asyncio.sleep(0)
        else:
            raise AssertionError("the session did not end after the connection was lost")
        loop.set_exception_handler(None)
    assert not failures, f"an error escaped the session: {failures[0]}"
    return bytes(transport.out), dispatch, budget


def _stuffed(content: bytes) -> bytes:
    """The DATA bytes a client sends for ``content`` (before the terminator)."""
    return (b"\r\n" + content).replace(b"\r\n.", b"\r\n..")[2:]


def _wire_pattern(content: bytes) -> bytes:
    """What the client must have sent for ``content``: after the DATA line, each line
    with the dot it may carry (a dot the receiver removed), then ``.<CRLF>``.

    Unstuffing is not one-to-one (``.x`` and ``x`` both read as ``x``), so this is a
    pattern, not one byte string.
    """
    if not content:
        return rb"\n\.\r\n"
    assert content.endswith(b"\r\n"), "content must end with CRLF"
    lines = [
        rb"\." + re.escape(line) if line.startswith(b".") else rb"\.?" + re.escape(line)
        for line in content[:-2].split(b"\r\n")
    ]
    return rb"\n" + rb"\r\n".join(lines) + rb"\r\n\.\r\n"


def smtp_session(chunks: Sequence[bytes]) -> list[str]:
    """Run one session on ``chunks``; check the invariants; return the reply lines."""
    out, dispatch, budget = _loop().run_until_complete(_run_session(chunks))
    stream = b"".join(chunks)
    lines = out.split(b"\r\n")
    assert lines[-1] == b"", f"a reply without CRLF: {lines[-1]!r}"
    replies = lines[:-1]
    assert replies and replies[0].startswith(b"220 mx.test "), replies[:1]
    for line in replies:
        assert _REPLY_LINE.match(line), f"malformed reply line {line!r}"
        assert len(line) <= 510, f"reply line too long: {len(line)}"
        text = line.decode("utf-8")
        assert TEMPORARY_ERROR not in text, "an internal error reached the client"
        assert "Error: (" not in text, f"exception text in a reply: {text}"
        if text[0] in "45":
            assert HAS_ENHANCED.match(text), f"no enhanced code: {text}"
    assert len(dispatch.accepted) <= stream.count(b"\n.\r\n"), "a message ended without CRLF.CRLF"
    for envelope, raw in dispatch.accepted:
        assert re.search(_wire_pattern(raw), stream), "dispatched bytes differ from what was sent"
        assert len(raw) <= SMTP.max_message_size_bytes
        assert 1 <= len(envelope.rcpt_to) <= SMTP.max_recipients
        for field in (envelope.mail_from, envelope.helo or "", *envelope.rcpt_to):
            assert not _CONTROL.search(field), f"control or undecodable byte in {field!r}"
        for recipient in envelope.rcpt_to:
            assert routing.split(recipient) is not None, f"relay form accepted: {recipient!r}"
            assert routing.match(ROUTES, recipient), recipient
    assert budget.in_flight == 0, "the DATA budget was not given back"
    return [line.decode("utf-8") for line in replies]


# --- MAIL/RCPT paths -------------------------------------------------------


@functools.cache
def _path_reader() -> Session:
    return Session(
        Handler(SMTP, ROUTES, _Dispatch(), _metrics()),
        settings=SMTP,
        limits=SessionLimits(max_sessions=1, max_sessions_per_ip=1),
        metrics=_metrics(),
        tls_context=None,
        loop=_loop(),
    )


def address_path(arg: str) -> None:
    """The session reads a path exactly as aiosmtpd's stdlib-based reader does."""
    session = _path_reader()
    ours = session._getaddr(arg)
    try:
        theirs = AiosmtpdSMTP._getaddr(session, arg)
    except ADDRESS_PARSER_ERRORS:
        theirs = (None, None)
    assert ours == theirs, f"{arg!r}: {ours!r} != {theirs!r}"


# --- the MIME parser -------------------------------------------------------


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, list | tuple):
        return [s for item in value for s in _strings(item)]
    return []


ENVELOPE = Envelope(
    mail_from="a@sender.test",
    rcpt_to=("billing@example.com", "x@support.example.com"),
    helo="client.test",
    client_ip="192.0.2.1",
    tls=None,
)
RECEIVED_AT = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)


def mime(raw: bytes) -> None:
    """Parse ``raw`` and build its payloads; check they are total and clean."""
    message = parsing.parse(
        raw,
        header_prefixes=PARSING.header_prefixes,
        max_inline_attachment_bytes=PARSING.max_inline_attachment_bytes,
    )
    for text in (
        _strings(message.__dict__)
        + [s for a in message.attachments for s in _strings(a.__dict__)]
        + [s for m in (*message.to, *message.cc, *message.reply_to) for s in _strings(m.__dict__)]
    ):
        assert "\x00" not in text, "NUL in parsed text"
        text.encode("utf-8")  # raises on a lone surrogate
    webhook_id, bodies = pipeline.build_bodies(ROUTES, PARSING, ENVELOPE, raw, RECEIVED_AT)
    assert webhook_id == payload.stable_id(ENVELOPE, raw)
    assert {"billing", "support", "all"} == set(bodies)
    for body in bodies.values():
        document = json.loads(body.decode("utf-8"))
        assert document["size_bytes"] == len(raw)
        assert "\\u0000" not in body.decode("utf-8")
    # What delivery sends (the lean parse, documents in pieces) is what build_bodies makes.
    lean_id, documents = pipeline.build_documents(ROUTES, PARSING, ENVELOPE, raw, RECEIVED_AT)
    assert webhook_id == lean_id, "the delivery path gives another id"
    assert bodies == {route: bytes(document) for route, document in documents.items()}, (
        "the delivery path gives other payloads than build_bodies"
    )


# --- the DATA reader -------------------------------------------------------


def _model(stream: bytes, max_bytes: int, max_line: int) -> tuple[str, bytes, bytes] | None:
    """RFC 5321 §4.5.2, line by line: (verdict, content, rest), or None when never ended."""
    content_lines: list[bytes] = []
    position = 0
    while True:
        end = stream.find(b"\r\n", position)
        if end < 0:
            return None
        line = stream[position:end]
        position = end + 2
        if line == b".":
            break
        content_lines.append(line[1:] if line.startswith(b".") else line)
    content = b"".join(line + b"\r\n" for line in content_lines)
    rest = stream[position:]
    if len(content) > max_bytes:
        return "too_big", b"", rest
    if any(len(line) > max_line for line in content.split(b"\r\n")):
        return "line_too_long", b"", rest
    return "ok", content, rest


async def _read(
    stream: bytes, chunk: int, max_bytes: int, max_line: int, budget: DataBudget | None
) -> tuple[data.Data | None, bytes]:
    reader = asyncio.StreamReader(limit=data.DISCARD_CHUNK)
    reservation = budget.reservation() if budget is not None else None

    async def feed() -> None:
        for start in range(0, len(stream), chunk):
            reader.feed_data(stream[start : start + chunk])
            await asyncio.sleep(0)
        reader.feed_eof()

    feeder = asyncio.get_running_loop().create_task(feed())
    try:
        received: data.Data | None = await data.read(
            reader, max_bytes=max_bytes, max_line_bytes=max_line, reservation=reservation
        )
    except asyncio.IncompleteReadError:
        received = None
    await feeder
    if reservation is not None:
        reservation.release()
    rest = b"" if received is None else await reader.read()
    return received, rest


def data_reader(
    stream: bytes,
    *,
    chunk: int = 7,
    max_bytes: int = 300,
    max_line: int = 80,
    budget_bytes: int | None = None,
) -> None:
    """Read ``stream`` as DATA; compare with the line model; check what is left unread."""
    budget = DataBudget(budget_bytes) if budget_bytes is not None else None
    received, rest = _loop().run_until_complete(
        _read(stream, max(1, chunk), max_bytes, max_line, budget)
    )
    expected = _model(stream, max_bytes, max_line)
    if expected is None:
        assert received is None, "a message ended without CRLF.CRLF"
        return
    assert received is not None, "a complete message was not read"
    verdict, content, expected_rest = expected
    assert expected_rest == rest, "bytes after the end marker were consumed or changed"
    if received.verdict is data.Verdict.BUSY:
        assert budget is not None, "BUSY without a budget"
        assert budget.in_flight == 0
        return
    if received.verdict is data.Verdict.TOO_BIG and verdict != "too_big":
        # Heavy dot-stuffing may push the wire past the size cap: a refusal, never a wrong read.
        assert len(_stuffed(content)) > max_bytes, "refused as too big but it fits"
        return
    assert verdict == received.verdict.value, (verdict, received.verdict)
    assert content == received.content
    if budget is not None:
        assert budget.in_flight == 0
