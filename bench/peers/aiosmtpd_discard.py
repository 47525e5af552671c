"""Bare aiosmtpd (>= 1.4.6) that accepts every message and throws it away: a baseline.

No parsing, no webhook, no logging: aiosmtpd's own line-by-line DATA reading is
all it does. Counts messages; on SIGTERM/SIGINT it prints the count and exits.

Usage: ``python bench/peers/aiosmtpd_discard.py PORT`` (127.0.0.1 only).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

from aiosmtpd.smtp import SMTP

MAX_BYTES = 64 * 1024 * 1024


class Discard:
    def __init__(self) -> None:
        self.count = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.count += 1
        return "250 OK"


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    handler = Discard()
    server = await loop.create_server(
        lambda: SMTP(handler, data_size_limit=MAX_BYTES, hostname="aiosmtpd-discard"),
        "127.0.0.1",
        port,
        backlog=1024,
        reuse_address=True,
    )
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.close()
    print(f"discarded {handler.count}", flush=True)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
