"""Throughput of the delivery modes side by side: spool (fsync) vs sync vs spool without fsync.

For each repeat, each mode in turn (interleaved, so drift hits all alike): start
the real ``mailbridge`` process (its own process, defaults except the mode and a
per-IP session cap that lets the load in), point its one route at
``bench/sink.py`` (a fast webhook sink in its own process), and push ``--messages``
messages of ``--size-bytes`` through ``--clients`` parallel SMTP sessions (a
minimal asyncio SMTP client in this process, one connection per client, kept
open). Figures:

* accepted/s: messages / time until the last ``250``;
* delivered/s: messages / time until the sink counted the last one (end to end,
  the figure the ratios use: in sync mode the two are the same by design);
* ratios against sync, medians over the repeats;
* CPU milliseconds the bridge process spent per message (utime + stime from
  /proc), in all and on the event-loop thread alone (the one that bounds a
  bridge's throughput; spool mode adds file-system work on other threads): the
  figures least disturbed by other load on the machine;
* SIGTERM to exit: the bridge's drain time after the run (worst of the repeats).

Then the commit layer alone (no SMTP, no HTTP, in this process): the same
number of messages made durable one at a time, and from ``--clients`` concurrent
tasks, with the number of sync rounds: that is the group commit at work.

Every load is bounded in messages and time; only loopback; only processes
started here are stopped, by PID. Results are printed as Markdown
(``--markdown FILE`` also writes them) for ``bench/SPOOL.md``.

Usage: ``.venv/bin/python bench/spool_modes.py [--messages 3000] [--clients 50]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent / "mailbridge"
MODES = ("sync", "spool", "spool-nofsync")
RUN_LIMIT_SECONDS = 180.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def http(method: str, port: int, path: str) -> bytes:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    with urllib.request.urlopen(request, timeout=5) as response:
        return bytes(response.read())


def wait_http(port: int, path: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while True:
        try:
            http("GET", port, path)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Sink:
    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "sink.py"), str(self.port)],
            stdout=subprocess.DEVNULL,
        )
        wait_http(self.port, "/stats")

    def count(self) -> int:
        return int(json.loads(http("GET", self.port, "/stats"))["count"])

    def reset(self) -> None:
        http("POST", self.port, "/reset")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Bridge:
    def __init__(self, mode: str, sink_port: int, workdir: Path) -> None:
        self.smtp_port, self.http_port = free_port(), free_port()
        spool = workdir / "spool"
        shutil.rmtree(spool, ignore_errors=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MAILBRIDGE_", "OTEL_"))}
        env |= {
            "MAILBRIDGE_WEBHOOK_URL": f"http://127.0.0.1:{sink_port}/hook",
            "MAILBRIDGE_TARGET_EMAILS": "*@bench.test",
            "MAILBRIDGE_DELIVERY__MODE": "sync" if mode == "sync" else "spool",
            "MAILBRIDGE_SPOOL__DIRECTORY": str(spool),
            "MAILBRIDGE_SPOOL__FSYNC": "false" if mode == "spool-nofsync" else "true",
            "MAILBRIDGE_SMTP__PORT": str(self.smtp_port),
            "MAILBRIDGE_SMTP__HOSTNAME": "mx.bench",
            "MAILBRIDGE_SMTP__MAX_SESSIONS_PER_IP": "1000",
            "MAILBRIDGE_HTTP__PORT": str(self.http_port),
            "MAILBRIDGE_LOG__LEVEL": "WARNING",
            "MAILBRIDGE_LOG__FORMAT": "json",
        }
        self.proc = subprocess.Popen(
            [str(BIN)], env=env, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        wait_http(self.http_port, "/readyz")
        deadline = time.monotonic() + 30
        while http("GET", self.http_port, "/readyz").strip() != b"ready":
            if time.monotonic() > deadline:
                raise RuntimeError("bridge not ready")
            time.sleep(0.05)

    def cpu_seconds(self) -> tuple[float, float]:
        """(event-loop thread, all other threads): utime + stime so far, from /proc."""
        tick = os.sysconf("SC_CLK_TCK")
        main = rest = 0.0
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            with contextlib.suppress(OSError):
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                used = (int(fields[11]) + int(fields[12])) / tick
                if task.name == str(self.proc.pid):
                    main += used
                else:
                    rest += used
        return main, rest

    def stop(self) -> float:
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return time.monotonic() - started


def message(number: int, size: int) -> bytes:
    line = b"x" * 76 + b"\r\n"
    body = line * max(1, size // len(line))
    head = f"From: bench <b@bench.test>\r\nTo: r@bench.test\r\nSubject: bench {number}\r\n\r\n"
    return head.encode() + body


async def client(port: int, numbers: list[int], size: int, accepted: list[float]) -> None:
    for attempt in range(3):  # like an MTA: a refused session is tried again, a few times
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        greeting = await reader.readline()
        if greeting.startswith(b"220"):
            break
        writer.close()
        if attempt == 2:
            raise ConnectionError(f"no greeting: {greeting!r}")
        await asyncio.sleep(0.2)

    async def reply() -> bytes:
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError("server closed the connection")
            if line[3:4] != b"-":
                return line

    writer.write(b"EHLO bench.test\r\n")
    await reply()
    for number in numbers:
        data = message(number, size)
        writer.write(b"MAIL FROM:<b@bench.test>\r\nRCPT TO:<r@bench.test>\r\nDATA\r\n")
        for expected in (b"250", b"250", b"354"):
            line = await reply()
            if not line.startswith(expected):
                raise RuntimeError(f"unexpected reply {line!r}")
        writer.write(data + b".\r\n")
        line = await reply()
        if not line.startswith(b"250"):
            raise RuntimeError(f"message refused: {line!r}")
        accepted.append(time.monotonic())
    writer.write(b"QUIT\r\n")
    await writer.drain()
    writer.close()


async def load(port: int, messages: int, clients: int, size: int) -> tuple[float, list[float]]:
    accepted: list[float] = []
    started = time.monotonic()
    shares = [list(range(n, messages, clients)) for n in range(clients)]
    async with asyncio.timeout(RUN_LIMIT_SECONDS):
        await asyncio.gather(*(client(port, share, size, accepted) for share in shares))
    return started, accepted


def run_mode(mode: str, sink: Sink, args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    sink.reset()
    bridge = Bridge(mode, sink.port, workdir)
    attached = None
    if args.attach:  # a profiler on the bridge for the measured part only (e.g. strace -c)
        command = args.attach.format(pid=bridge.proc.pid, mode=mode)
        attached = subprocess.Popen(command, shell=True, start_new_session=True)
        time.sleep(1.0)
    cpu_before = bridge.cpu_seconds()
    try:
        started, accepted = asyncio.run(
            load(bridge.smtp_port, args.messages, args.clients, args.size_bytes)
        )
        deadline = time.monotonic() + RUN_LIMIT_SECONDS
        while sink.count() < args.messages:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{mode}: only {sink.count()} of {args.messages} delivered")
            time.sleep(0.005)
        delivered_at = time.monotonic()
        cpu_after = bridge.cpu_seconds()
    finally:
        if attached is not None:  # the profiler writes its report on SIGINT
            os.killpg(attached.pid, signal.SIGINT)
            try:
                attached.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(attached.pid, signal.SIGKILL)
                attached.wait()
        drain = bridge.stop()
    return {
        "accepted_per_s": args.messages / (max(accepted) - started),
        "delivered_per_s": args.messages / (delivered_at - started),
        "cpu_ms_per_msg": 1000 * (sum(cpu_after) - sum(cpu_before)) / args.messages,
        "loop_cpu_ms_per_msg": 1000 * (cpu_after[0] - cpu_before[0]) / args.messages,
        "drain_s": drain,
    }


async def commit_layer(messages: int, clients: int, size: int, workdir: Path) -> dict[str, float]:
    """Spool.accept alone: one at a time, then ``clients`` at once (group commit)."""
    sys.path.insert(0, str(ROOT / "service"))
    from prometheus_client import CollectorRegistry

    from mailbridge.config import SpoolSettings
    from mailbridge.observability.metrics import Metrics
    from mailbridge.payload import Envelope
    from mailbridge.spool.queue import Spool

    envelope = Envelope("b@bench.test", ("r@bench.test",), "bench.test", "127.0.0.1", None)
    raw = message(0, size)
    results: dict[str, float] = {}
    for label, concurrency in (("serial", 1), ("concurrent", clients)):
        directory = workdir / f"commit-{label}"
        shutil.rmtree(directory, ignore_errors=True)
        settings = SpoolSettings(directory=directory, max_messages=10 * messages)  # type: ignore[call-arg]
        spool = Spool(settings, Metrics(CollectorRegistry()), environ={})
        await spool.open()
        started = time.monotonic()

        async def one(n: int, spool: Spool = spool) -> None:
            await spool.accept(
                envelope=envelope, raw=raw, routes={"r": ("r@bench.test",)},
                webhook_id=f"msg_{n}", received_at=time.time(), carrier={},
            )  # fmt: skip

        for first in range(0, messages, concurrency):
            await asyncio.gather(
                *(one(n) for n in range(first, min(first + concurrency, messages)))
            )
        elapsed = time.monotonic() - started
        assert spool.committer is not None
        results[f"{label}_per_s"] = messages / elapsed
        results[f"{label}_rounds"] = spool.committer.batches
        await spool.close()
    return results


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    fs = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        target = Path(tempfile.gettempdir()).stat().st_dev
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            mount = Path(parts[1])
            if mount.is_dir() and mount.stat().st_dev == target:
                fs = f"{parts[2]} on {parts[0]}"
    return (
        f"{os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}, Python "
        f"{platform.python_version()}, spool on {fs}, load average before the run "
        f"{os.getloadavg()[0]:.1f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000, help="messages per run")
    parser.add_argument("--clients", type=int, default=50, help="parallel SMTP sessions")
    parser.add_argument("--size-bytes", type=int, default=4096, help="message size")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats")
    parser.add_argument("--markdown", type=Path, help="also write the results here")
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}"
    )
    parser.add_argument(
        "--no-commit-layer", action="store_true", help="skip the commit-layer measurement"
    )
    parser.add_argument(
        "--attach",
        help="shell command run against the bridge during each run, stopped with SIGINT "
        "('{pid}' and '{mode}' are replaced), e.g. 'strace -c -f -o /tmp/{mode}.txt -p {pid}'",
    )
    args = parser.parse_args()
    modes = [mode for mode in args.modes.split(",") if mode]
    if "sync" not in modes or any(mode not in MODES for mode in modes):
        parser.error(f"--modes: 'sync' and any of {', '.join(MODES)}")
    host = machine()
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory(prefix="mb-bench-") as tmp:
        workdir = Path(tmp)
        sink = Sink()
        try:
            for repeat in range(args.repeats):
                for mode in modes:
                    figures = run_mode(mode, sink, args, workdir)
                    results[mode].append(figures)
                    print(f"repeat {repeat + 1} {mode:>14}: " + ", ".join(
                        f"{k} {v:.1f}" for k, v in figures.items()), file=sys.stderr)  # fmt: skip
        finally:
            sink.stop()
        commit = None
        if not args.no_commit_layer:
            commit = asyncio.run(
                commit_layer(args.messages, args.clients, args.size_bytes, workdir)
            )

    def median(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in results[mode])

    base = median("sync", "delivered_per_s")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Run {stamp}: {args.messages} messages of {args.size_bytes} bytes, {args.clients} "
        f"parallel SMTP sessions, medians of {args.repeats} interleaved repeats.",
        f"Machine: {host}.",
        "",
        "| mode | accepted/s | delivered/s (end to end) | vs sync | bridge CPU ms/msg "
        "| of which event loop | SIGTERM to exit (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in modes:
        delivered = median(mode, "delivered_per_s")
        lines.append(
            f"| {mode} | {median(mode, 'accepted_per_s'):.0f} | {delivered:.0f} | "
            f"{delivered / base:.2f}x | {median(mode, 'cpu_ms_per_msg'):.2f} | "
            f"{median(mode, 'loop_cpu_ms_per_msg'):.2f} | "
            f"{max(r['drain_s'] for r in results[mode]):.2f} |"
        )
    lines += (
        []
        if commit is None
        else [
            "",
            f"Commit layer alone ({args.messages} x {args.size_bytes} bytes, fsync on):",
            "",
            "| | messages/s | sync rounds | messages per round |",
            "|---|---:|---:|---:|",
            f"| one at a time | {commit['serial_per_s']:.0f} | {commit['serial_rounds']:.0f} | "
            f"{args.messages / commit['serial_rounds']:.1f} |",
            f"| {args.clients} concurrent | {commit['concurrent_per_s']:.0f} | "
            f"{commit['concurrent_rounds']:.0f} | "
            f"{args.messages / commit['concurrent_rounds']:.1f} |",
        ]
    )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown is not None:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
