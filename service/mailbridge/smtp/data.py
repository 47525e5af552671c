"""Reading the DATA section in large chunks, strictly.

aiosmtpd reads DATA one line at a time in Python; this reads until the end-of-data
marker with the stream's C-level search, then undoes dot-stuffing on bytes.

Strictness (the SMTP smuggling defences): the message ends only at
``<CRLF>.<CRLF>``. Bare ``<LF>.<LF>``, ``<CR>.<CR>``, ``<LF>.<CRLF>`` and
``<CRLF>.<LF>`` are message content, never an end. A leading ``.`` on a line is
removed (RFC 5321 §4.5.2). The final line's CRLF belongs to the message.

Limits: more than ``max_bytes`` of content answers 552 after the client has
finished sending (RFC 5321 §4.5.3.1.10 expects the whole DATA to be read), with
memory bounded by one chunk while discarding. A line longer than
``max_line_bytes`` answers 500. With a :class:`~mailbridge.smtp.limits.Reservation`
the buffer starts at :data:`FIRST_STEP` bytes and doubles only as far as the
process-wide DATA budget allows; when it cannot grow, the rest is discarded
and the verdict is ``BUSY`` (the session answers 452).

Uses two private members of ``asyncio.StreamReader`` (``_buffer``, ``_limit``), as
aiosmtpd itself does; the tests exercise them on a real reader.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass

from mailbridge.smtp.limits import Reservation

CRLF = b"\r\n"
END = b"\r\n.\r\n"
#: Bytes kept in the reader while discarding an oversized message.
DISCARD_CHUNK = 64 * 1024
#: Buffer a DATA read may fill before it asks its reservation for more (then it doubles).
FIRST_STEP = 64 * 1024


class Verdict(enum.Enum):
    OK = "ok"
    TOO_BIG = "too_big"
    LINE_TOO_LONG = "line_too_long"
    BUSY = "busy"  # the process-wide DATA budget is spent


@dataclass(frozen=True)
class Data:
    verdict: Verdict
    content: bytes  # empty unless verdict is OK
    wire_bytes: int  # bytes received, terminator excluded


def unstuff(wire: bytes) -> bytes:
    """Content from the DATA bytes that follow a virtual leading CRLF, terminator excluded."""
    return wire.replace(b"\r\n.", CRLF)[2:]


def wire_cap(max_bytes: int) -> int:
    """Most DATA bytes buffered for a ``max_bytes`` message (dot-stuffing makes the wire longer)."""
    return max_bytes + max_bytes // 32 + 1024


def first_step(max_bytes: int) -> int:
    """The buffer a DATA read reserves before any content has arrived."""
    return min(wire_cap(max_bytes), FIRST_STEP)


def longest_line_exceeds(content: bytes, max_line_bytes: int) -> bool:
    """Whether a CRLF-separated line of ``content`` is longer than ``max_line_bytes``."""
    if len(content) <= max_line_bytes:
        return False
    window = max_line_bytes + len(CRLF)
    start, size = 0, len(content)
    while size - start > max_line_bytes:
        # The last line break inside the window ends a line that fits; jump past it.
        cut = content.rfind(CRLF, start, start + window)
        if cut == -1:
            return True
        start = cut + len(CRLF)
    return False


async def read(
    reader: asyncio.StreamReader,
    *,
    max_bytes: int,
    max_line_bytes: int,
    reservation: Reservation | None = None,
) -> Data:
    """Read one DATA section from ``reader``, leaving anything pipelined after it unread.

    With a ``reservation``, the buffer grows only as far as it can be reserved.
    """
    # A virtual CRLF before the first line lets a lone "." end an empty message
    # and lets one search find "<CRLF>.<CRLF>" everywhere.
    reader._buffer[:0] = CRLF  # type: ignore[attr-defined]
    saved_limit = reader._limit  # type: ignore[attr-defined]
    cap = wire_cap(max_bytes)
    limit = cap if reservation is None else first_step(max_bytes)
    try:
        while True:
            if reservation is not None and not reservation.ensure(limit):
                return await _refuse(reader, Verdict.BUSY, 0, reservation)
            reader._limit = limit  # type: ignore[attr-defined]
            try:
                wire = await reader.readuntil(END)
                break
            except asyncio.LimitOverrunError as overrun:
                if limit >= cap:
                    return await _refuse(reader, Verdict.TOO_BIG, overrun.consumed, reservation)
                # readuntil kept the buffer; search it again with room to grow.
                limit = min(cap, limit * 2)
    finally:
        reader._limit = saved_limit  # type: ignore[attr-defined]
    content = unstuff(wire[: -len(END) + len(CRLF)])
    wire_bytes = len(wire) - len(END)
    if len(content) > max_bytes:
        return Data(Verdict.TOO_BIG, b"", wire_bytes)
    if longest_line_exceeds(content, max_line_bytes):
        return Data(Verdict.LINE_TOO_LONG, b"", wire_bytes)
    return Data(Verdict.OK, content, wire_bytes)


async def _refuse(
    reader: asyncio.StreamReader,
    verdict: Verdict,
    consumed: int,
    reservation: Reservation | None,
) -> Data:
    """Give back what was reserved and discard the rest of the message."""
    if reservation is not None:
        reservation.release()
    discarded = await _discard(reader, consumed)
    return Data(verdict, b"", discarded - len(CRLF))


async def _discard(reader: asyncio.StreamReader, consumed: int) -> int:
    """Throw data away until the end marker; return how many bytes were dropped."""
    reader._limit = DISCARD_CHUNK  # type: ignore[attr-defined]
    dropped = 0
    while True:
        dropped += len(await reader.readexactly(consumed))
        try:
            tail = await reader.readuntil(END)
        except asyncio.LimitOverrunError as overrun:
            consumed = overrun.consumed
            continue
        return dropped + len(tail) - len(END) + len(CRLF)
