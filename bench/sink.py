"""A fast webhook sink for the benchmarks: counts POSTs and records when they arrive.

A bare HTTP/1.1 server on ``asyncio.Protocol`` (keep-alive, pipelining,
``Content-Length`` or chunked bodies; every request answered ``200`` with an
empty body), so the sink costs far less CPU per request than the bridges it
measures. It runs in its own process.

Control (same port): ``GET /stats`` returns JSON ``{"count", "first_ns",
"last_ns", "probe_count", "probes": {id: arrival_ns}}``; ``POST /reset`` clears
it. A body that contains ``mbprobe-<id>`` is a latency probe (see
``bench/probe.py``): its arrival time is kept under that id and it is not
counted in ``count``. Arrival times are ``time.time_ns()`` (wall clock), taken
when the last byte of the request has been read.

Usage: ``python bench/sink.py PORT`` (listens on 127.0.0.1 only).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
import time

PROBE = b"mbprobe-"
PROBE_ID = re.compile(rb"mbprobe-([0-9A-Za-z_]+)")
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
OK_CLOSE = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.first_ns = 0
        self.last_ns = 0
        self.probes: dict[str, int] = {}

    def arrived(self, body: bytes) -> None:
        now = time.time_ns()
        if PROBE in body:
            match = PROBE_ID.search(body)
            if match is not None:
                self.probes[match.group(1).decode()] = now
                return
        self.count += 1
        if not self.first_ns:
            self.first_ns = now
        self.last_ns = now

    def as_json(self) -> bytes:
        return json.dumps(
            {
                "count": self.count,
                "first_ns": self.first_ns,
                "last_ns": self.last_ns,
                "probe_count": len(self.probes),
                "probes": self.probes,
            }
        ).encode()


class SinkProtocol(asyncio.Protocol):
    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.head: tuple[bytes, bytes, bool] | None = None  # method, path, close
        self.length = -1  # body length; -2 = chunked
        self.chunks: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self._step():
            pass

    def _step(self) -> bool:
        """Consume one request (or one chunk) from the buffer; False when more is needed."""
        buffer = self.buffer
        if self.head is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return False
            lines = bytes(buffer[:end]).split(b"\r\n")
            del buffer[: end + 4]
            method, path = lines[0].split(b" ", 2)[:2]
            length, close = 0, False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    length = -2
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            self.head = (method, path, close)
            self.length = length
            self.chunks = []
        if self.length == -2:
            end = buffer.find(b"\r\n")
            if end < 0:
                return False
            size = int(bytes(buffer[:end]).split(b";")[0], 16)
            if size == 0:
                trailer = buffer.find(b"\r\n\r\n", end)
                if trailer < 0:
                    return False
                del buffer[: trailer + 4]
                self._finish(b"".join(self.chunks))
                return True
            if len(buffer) < end + 2 + size + 2:
                return False
            self.chunks.append(bytes(buffer[end + 2 : end + 2 + size]))
            del buffer[: end + 2 + size + 2]
            return True
        if len(buffer) < self.length:
            return False
        body = bytes(buffer[: self.length])
        del buffer[: self.length]
        self._finish(body)
        return True

    def _finish(self, body: bytes) -> None:
        assert self.head is not None and self.transport is not None
        method, path, close = self.head
        self.head = None
        if method == b"GET" and path.startswith(b"/stats"):
            data = self.stats.as_json()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(data)).encode()
                + b"\r\n\r\n"
                + data
            )
        elif method == b"POST" and path.startswith(b"/reset"):
            self.stats.reset()
            self.transport.write(OK)
        elif method == b"POST":
            self.stats.arrived(body)
            self.transport.write(OK_CLOSE if close else OK)
        else:  # HEAD/GET elsewhere: mailin checks its webhook with HEAD at start
            self.transport.write(OK_CLOSE if close else OK)
        if close:
            self.transport.close()


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    stats = Stats()
    server = await loop.create_server(
        lambda: SinkProtocol(stats), "127.0.0.1", port, backlog=1024, reuse_address=True
    )
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"sink listening on 127.0.0.1:{port}", flush=True)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
