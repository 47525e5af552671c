"""SMTP client side of the benchmarks that smtp-source cannot do: latency probes,
idle sessions and one big message. Plain asyncio streams, no SMTP library.

A probe message is ``size`` bytes of 78-character lines, like smtp-source's,
with ``mbprobe-<id>`` in its Subject and first body line. The time the last
bytes of DATA (the final line and ``<CRLF>.<CRLF>``) are handed to the kernel is
its *end of DATA* (``time.time_ns()``); the webhook sink records when the
document carrying that id arrives (``bench/sink.py``). Their difference is the
end-to-end latency.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from dataclasses import dataclass, field

LINE = b"X" * 78 + b"\r\n"
SENDER = "bench@example.com"
RECIPIENT = "rcpt@example.com"


def message(size: int, marker: str) -> tuple[bytes, bytes]:
    """A message of about ``size`` bytes, split into (all but the last line, last line)."""
    head = (
        f"From: Bench <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: {marker}\r\n"
        f"Message-ID: <{marker}@bench.local>\r\n\r\n{marker}\r\n"
    ).encode()
    lines = max(0, (size - len(head)) // len(LINE))
    body = head + LINE * lines
    return body, b"end of message\r\n"


#: 57 bytes of an attachment: one 76-character base64 line each.
_BASE64_LINE_BYTES = 57
BIG_SHAPES = ("text", "attachment")


def attachment_message(size: int, marker: str) -> tuple[bytes, bytes]:
    """Like :func:`message`, but multipart: a short text part and a base64 attachment.

    The usual shape of scanner mail; about ``size`` bytes on the wire, the
    attachment's lines 76 characters long (CRLF), as mail clients write them.
    """
    head = (
        f"From: Bench <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: {marker}\r\n"
        f"Message-ID: <{marker}@bench.local>\r\nMIME-Version: 1.0\r\n"
        f'Content-Type: multipart/mixed; boundary="mbprobe-boundary"\r\n\r\n'
        f"--mbprobe-boundary\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        f"{marker}: the scan is attached.\r\n"
        f"--mbprobe-boundary\r\nContent-Type: application/pdf\r\n"
        f'Content-Disposition: attachment; filename="scan.pdf"\r\n'
        f"Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode()
    line = base64.b64encode(_PDFISH) + b"\r\n"
    lines = max(1, (size - len(head)) // len(line))
    return head + line * lines, b"--mbprobe-boundary--\r\n"


_PDFISH = bytes((i * 37 + 11) % 256 for i in range(_BASE64_LINE_BYTES))


def big_message(shape: str, size: int, marker: str) -> tuple[bytes, bytes]:
    """The memory test's big message: ``text`` (:func:`message`) or ``attachment``."""
    if shape == "attachment":
        return attachment_message(size, marker)
    return message(size, marker)


class SmtpError(Exception):
    pass


class Client:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(
            self.host, self.port, limit=1 << 20
        )
        await self.expect(b"220")
        self.writer.write(b"EHLO probe.bench.local\r\n")
        await self.expect(b"250")

    async def reply(self) -> bytes:
        assert self.reader is not None
        while True:
            line = await self.reader.readline()
            if not line:
                raise SmtpError("connection closed")
            if line[3:4] != b"-":
                return line

    async def expect(self, code: bytes) -> bytes:
        line = await self.reply()
        if not line.startswith(code):
            raise SmtpError(line.decode(errors="replace").strip())
        return line

    async def send(self, body: bytes, last: bytes) -> int:
        """One transaction; returns the end-of-DATA time in ns (after a 250 reply)."""
        assert self.writer is not None
        self.writer.write(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\nDATA\r\n".encode())
        await self.expect(b"250")
        await self.expect(b"250")
        await self.expect(b"354")
        self.writer.write(body)
        await self.writer.drain()
        end_of_data = time.time_ns()
        self.writer.write(last + b".\r\n")
        await self.writer.drain()
        await self.expect(b"250")
        return end_of_data

    async def close(self) -> None:
        if self.writer is None:
            return
        try:
            self.writer.write(b"QUIT\r\n")
            await asyncio.wait_for(self.reply(), 2)
        except (OSError, SmtpError, TimeoutError):
            pass
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()
        self.reader = self.writer = None


@dataclass
class ProbeResult:
    sent: dict[str, int] = field(default_factory=dict)  # id -> end-of-DATA ns
    failures: list[str] = field(default_factory=list)


async def run_probe(
    host: str,
    port: int,
    *,
    size: int,
    reuse: bool,
    period_seconds: float,
    run_id: str,
    stop: asyncio.Event,
    max_messages: int,
    result: ProbeResult,
) -> None:
    """Send probe messages one at a time, one every ``period_seconds``, until ``stop``."""
    client: Client | None = None
    number = 0
    try:
        while not stop.is_set() and number < max_messages:
            started = time.monotonic()
            number += 1
            marker = f"mbprobe-{run_id}x{number}"
            body, last = message(size, marker)
            try:
                if client is None:
                    client = Client(host, port)
                    await client.connect()
                result.sent[marker.removeprefix("mbprobe-")] = await client.send(body, last)
            except (OSError, SmtpError) as error:
                result.failures.append(str(error))
                if client is not None:
                    await client.close()
                client = None
                await asyncio.sleep(0.05)
                continue
            if not reuse:
                await client.close()
                client = None
            wait = period_seconds - (time.monotonic() - started)
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)
    finally:
        if client is not None:
            await client.close()


async def open_idle(host: str, port: int, count: int) -> list[asyncio.StreamWriter]:
    """Open ``count`` sessions that read the greeting, say EHLO, and then sit idle."""
    writers: list[asyncio.StreamWriter] = []

    async def one() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        writers.append(writer)
        line = await reader.readline()
        if not line.startswith(b"220"):
            raise SmtpError(f"greeting: {line!r}")
        writer.write(b"EHLO idle.bench.local\r\n")
        while True:
            line = await reader.readline()
            if not line.startswith(b"250"):
                raise SmtpError(f"EHLO: {line!r}")
            if line[3:4] != b"-":
                break

    for start in range(0, count, 100):  # in batches: stay under listen backlogs
        await asyncio.gather(*(one() for _ in range(min(100, count - start))))
    return writers


async def close_all(writers: list[asyncio.StreamWriter]) -> None:
    for writer in writers:
        writer.close()
    await asyncio.sleep(0.2)
