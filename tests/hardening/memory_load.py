"""Measure the bridge's memory under many concurrent large uploads.

Runs the real ``mailbridge`` in a child process (so only its memory is counted),
with the process-wide DATA budget set by ``smtp.max_data_in_flight_bytes``
and a webhook on a closed loopback port (each accepted message is parsed, its
payload built, then answered 451: nothing is kept anywhere). ``clients`` threads
upload ``message_bytes`` each at once; the child's RSS is sampled throughout.

    .venv/bin/python -m tests.hardening.memory_load --clients 200 --mib 25 --budget-mib 256

Loopback only; the child is stopped by its PID at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

MiB = 1024 * 1024
LAUNCHER = "import sys; from mailbridge import cli; sys.exit(cli.main(['run']))"


@dataclass(frozen=True)
class Result:
    baseline_rss_bytes: int
    peak_rss_bytes: int
    replies: Counter[str]

    @property
    def growth_bytes(self) -> int:
        return self.peak_rss_bytes - self.baseline_rss_bytes


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(
    budget_bytes: int, max_message_bytes: int, clients: int, folder: Path
) -> tuple[subprocess.Popen[bytes], int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAILBRIDGE_", "OTEL_"))}
    env.update(
        MAILBRIDGE_SMTP__HOST="127.0.0.1",
        MAILBRIDGE_SMTP__PORT="0",
        MAILBRIDGE_SMTP__HOSTNAME="mx.test",
        MAILBRIDGE_SMTP__MAX_MESSAGE_SIZE_BYTES=str(max_message_bytes),
        MAILBRIDGE_SMTP__MAX_SESSIONS_PER_IP=str(clients + 10),
        MAILBRIDGE_SMTP__MAX_SESSIONS=str(clients + 10),
        MAILBRIDGE_SMTP__MAX_DATA_IN_FLIGHT_BYTES=str(budget_bytes),
        MAILBRIDGE_HTTP__PORT="0",
        MAILBRIDGE_WEBHOOK_URL=f"http://127.0.0.1:{_closed_port()}/hook",
        MAILBRIDGE_TARGET_EMAILS="*",
        MAILBRIDGE_DELIVERY__SYNC_ATTEMPTS="1",
        MAILBRIDGE_LOG__FORMAT="json",
        MAILBRIDGE_LOG__LEVEL="INFO",
    )
    child = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER],
        cwd=folder,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert child.stderr is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = child.stderr.readline()
        if not line:
            break
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("event") == "listening":
                port = int(str(record["smtp"]).rsplit(":", 1)[1])
                # Keep draining stderr so the child never blocks on a full pipe.
                threading.Thread(target=child.stderr.read, daemon=True).start()
                return child, port
    child.kill()
    raise RuntimeError("the bridge did not start")


def _upload(port: int, message_bytes: int, number: int) -> str:
    line = (b"%03d" % (number % 1000)) * 33 + b"\r\n"
    body = line * (message_bytes // len(line))
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        reader = sock.makefile("rb")

        def reply() -> str:
            while True:
                text = reader.readline()
                if not text:
                    return "closed"
                if text[3:4] != b"-":
                    return text[:9].decode("ascii", "replace")

        reply()
        for command in (b"EHLO load.test", b"MAIL FROM:<a@load.test>", b"RCPT TO:<u@x.test>"):
            sock.sendall(command + b"\r\n")
            reply()
        sock.sendall(b"DATA\r\n")
        answer = reply()
        if answer.startswith("354"):
            sock.sendall(b"Subject: load\r\n\r\n" + body + b".\r\n")
            answer = reply()
        sock.sendall(b"QUIT\r\n")
        reader.close()
        return answer


def measure(
    *, clients: int, message_bytes: int, budget_bytes: int, folder: Path, max_seconds: float = 120
) -> Result:
    child, port = _start(budget_bytes, message_bytes + MiB, clients, folder)
    try:
        time.sleep(0.3)
        baseline = _rss(child.pid)
        peak = [baseline]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.01):
                with contextlib.suppress(OSError):
                    peak[0] = max(peak[0], _rss(child.pid))

        replies: Counter[str] = Counter()
        lock = threading.Lock()

        def one(number: int) -> None:
            try:
                answer = _upload(port, message_bytes, number)
            except OSError as error:
                answer = type(error).__name__
            with lock:
                replies[answer] += 1

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        threads = [threading.Thread(target=one, args=(n,), daemon=True) for n in range(clients)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + max_seconds
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stop.set()
        sampler.join(5)
        return Result(baseline, peak[0], replies)
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--mib", type=float, default=25, help="message size in MiB")
    parser.add_argument("--budget-mib", type=float, default=256, help="DATA budget in MiB")
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        result = measure(
            clients=args.clients,
            message_bytes=int(args.mib * MiB),
            budget_bytes=int(args.budget_mib * MiB),
            folder=Path(folder),
            max_seconds=600,
        )
    print(
        f"clients={args.clients} message={args.mib} MiB budget={args.budget_mib} MiB "
        f"rss baseline={result.baseline_rss_bytes / MiB:.0f} MiB "
        f"peak={result.peak_rss_bytes / MiB:.0f} MiB growth={result.growth_bytes / MiB:.0f} MiB "
        f"replies={dict(result.replies)}"
    )


if __name__ == "__main__":
    main()
