"""Reading the DATA section in large chunks, strictly.

:class:`Receiver` is a push parser: the session feeds it whatever the transport
delivered and it appends to one growing ``bytearray``, searching for the end-of-data
marker with C-level ``find`` (across chunk boundaries), then undoes dot-stuffing in
place: the content handed on is that same buffer, never a second whole copy.

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

:func:`read` drives a :class:`Receiver` from an ``asyncio.StreamReader`` (tools and
tests hold one); it puts bytes that follow the message back into the reader's
private ``_buffer``.
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
    content: bytes | bytearray  # empty unless verdict is OK; read-only by convention
    wire_bytes: int  # bytes received, terminator excluded


def unstuff(wire: bytes) -> bytes:
    """Content from the DATA bytes that follow a virtual leading CRLF, terminator excluded."""
    return wire.replace(b"\r\n.", CRLF)[2:]


def unstuff_in_place(buffer: bytearray) -> None:
    """:func:`unstuff` on ``buffer`` itself: no second copy of the message is made."""
    find = buffer.find
    hit = find(b"\r\n.", 0)
    if hit == -1:
        del buffer[:2]  # the virtual CRLF; deleting at the front is O(1) for a bytearray
        return
    view = memoryview(buffer)
    write = 0
    read = 0
    try:
        while hit != -1:
            keep = hit + 2 - read  # up to and including the CRLF, without the dot
            view[write : write + keep] = view[read : read + keep]
            write += keep
            read = hit + 3
            hit = find(b"\r\n.", read)
        tail = len(buffer) - read
        view[write : write + tail] = view[read : read + tail]
        write += tail
    finally:
        view.release()
    del buffer[write:]
    del buffer[:2]


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


class Receiver:
    """One DATA section, fed in chunks as they arrive (a push parser).

    :meth:`feed` returns ``None`` while the end marker has not been seen, then how
    many bytes of its chunk belonged to the message (the rest is the client's next
    commands); :attr:`result` is then set. With a ``reservation``, the buffer grows
    only as far as it can be reserved (doubling from :data:`FIRST_STEP`).
    """

    __slots__ = (
        "_buffer",
        "_cap",
        "_dropped",
        "_limit",
        "_max_bytes",
        "_max_line_bytes",
        "_reservation",
        "_tail",
        "_verdict",
        "result",
    )

    def __init__(
        self, *, max_bytes: int, max_line_bytes: int, reservation: Reservation | None = None
    ) -> None:
        # A virtual CRLF before the first line lets a lone "." end an empty message
        # and lets one search find "<CRLF>.<CRLF>" everywhere.
        self._buffer = bytearray(CRLF)
        self._cap = wire_cap(max_bytes)
        self._limit = self._cap if reservation is None else first_step(max_bytes)
        self._max_bytes = max_bytes
        self._max_line_bytes = max_line_bytes
        self._reservation = reservation
        self._verdict: Verdict | None = None  # set while discarding a refused message
        self._tail = b""
        self._dropped = 0
        self.result: Data | None = None
        if reservation is not None and not reservation.ensure(self._limit):
            self._refuse(Verdict.BUSY)

    def feed(self, chunk: bytes | bytearray | memoryview) -> int | None:
        if self._verdict is not None:
            return self._discard(chunk)
        buffer = self._buffer
        start = max(0, len(buffer) - len(END) + 1)
        buffer += chunk
        end = buffer.find(END, start)
        if end == -1:
            while len(buffer) > self._limit:
                if self._limit >= self._cap:
                    self._refuse(Verdict.TOO_BIG)
                    return None
                self._limit = min(self._cap, self._limit * 2)
                if self._reservation is not None and not self._reservation.ensure(self._limit):
                    self._refuse(Verdict.BUSY)
                    return None
            return None
        used = len(chunk) - (len(buffer) - end - len(END))
        del buffer[end + len(CRLF) :]  # the final line's CRLF belongs to the message
        wire_bytes = end  # the virtual CRLF stands for the marker's own CRLF
        self._buffer = bytearray()
        if len(buffer) > self._cap:
            self.result = Data(Verdict.TOO_BIG, b"", wire_bytes)
            return used
        unstuff_in_place(buffer)
        if len(buffer) > self._max_bytes:
            self.result = Data(Verdict.TOO_BIG, b"", wire_bytes)
        elif longest_line_exceeds(buffer, self._max_line_bytes):
            self.result = Data(Verdict.LINE_TOO_LONG, b"", wire_bytes)
        else:
            self.result = Data(Verdict.OK, buffer, wire_bytes)
        return used

    def _refuse(self, verdict: Verdict) -> None:
        """Give back what was reserved; from now on, discard up to the end marker."""
        if self._reservation is not None:
            self._reservation.release()
        self._verdict = verdict
        self._dropped = len(self._buffer) - len(CRLF)
        self._tail = bytes(self._buffer[-(len(END) - 1) :])
        self._buffer = bytearray()

    def _discard(self, chunk: bytes | bytearray | memoryview) -> int | None:
        window = self._tail + bytes(chunk[: len(END) - 1]) if self._tail else b""
        hit = window.find(END) if window else -1
        if hit != -1:
            used = hit + len(END) - len(self._tail)
        else:
            found = bytes(chunk).find(END) if not isinstance(chunk, bytes) else chunk.find(END)
            if found == -1:
                self._dropped += len(chunk)
                self._tail = (self._tail + bytes(chunk[-(len(END) - 1) :]))[-(len(END) - 1) :]
                return None
            used = found + len(END)
        assert self._verdict is not None
        self.result = Data(self._verdict, b"", self._dropped + used - len(END) + len(CRLF))
        return used


async def read(
    reader: asyncio.StreamReader,
    *,
    max_bytes: int,
    max_line_bytes: int,
    reservation: Reservation | None = None,
) -> Data:
    """Read one DATA section from ``reader``, leaving anything pipelined after it unread.

    Raises ``asyncio.IncompleteReadError`` when the stream ends before the marker.
    """
    receiver = Receiver(max_bytes=max_bytes, max_line_bytes=max_line_bytes, reservation=reservation)
    while True:
        chunk = await reader.read(DISCARD_CHUNK)
        if not chunk:
            raise asyncio.IncompleteReadError(b"", None)
        used = receiver.feed(chunk)
        if used is not None:
            assert receiver.result is not None
            if used < len(chunk):
                reader._buffer[:0] = chunk[used:]  # type: ignore[attr-defined]
            return receiver.result
