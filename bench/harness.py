"""The benchmark harness: mailbridge against its peers, interleaved, in one run.

Started by ``bench/run`` (which installs the tools first). Every server under
test runs in its own process on 127.0.0.1; Postfix's ``smtp-source`` makes the
load; webhook servers post to ``bench/sink.py`` (its own process), which counts
arrivals. For each cell (message size x concurrency x connection mode) and each
repeat, every server gets the same load in turn, so drift hits them all alike;
the figures are medians over the repeats.

Figures per cell and server:

* msgs/s end to end: messages counted at the sink (webhook servers) or accepted
  by the server (discarding servers, where ``smtp-source`` exits 0 only if every
  reply was positive), divided by the time from the start of the load to the
  last arrival. A run in which not every message arrived is marked and not used.
* p50/p99 latency, end of DATA -> webhook arrival, from a paced probe client
  (``bench/probe.py``) that runs alongside the load (one extra session).
* CPU ms per message of the server process (utime+stime from /proc/PID/stat).
* peak RSS of the server during the run (VmHWM, reset through clear_refs).

Then, per server and repeat, on a freshly started server: KiB per idle
connection (1,000 sessions after EHLO, RSS delta) and the RSS peak above the
idle baseline while one 25 MiB message is received (and, for webhook servers,
delivered).

Every load is bounded in messages and in time; only loopback is used; only the
processes this harness started are stopped, by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import probe

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WORK = BENCH / ".work"
VENV_PY = ROOT / ".venv" / "bin" / "python"
HOST = "127.0.0.1"
KB = 1024
MB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
RUN_CAP_SECONDS = 120.0
#: After the load, stop waiting for webhooks when none arrived for this long.
STALL_SECONDS = 20.0
READY_SECONDS = 30.0
IDLE_SESSIONS = 1000
BIG_MESSAGE_BYTES = 25 * MB
SENDER = probe.SENDER
RECIPIENT = probe.RECIPIENT


def load_average() -> str:
    """The 1-minute load average, as /proc/loadavg writes it."""
    return Path("/proc/loadavg").read_text().split()[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def spawn(argv: list[str], log: Path, *, cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start a process whose output is appended to ``log`` (it returns at once)."""
    with log.open("ab") as out:
        return subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


# --- servers under test -------------------------------------------------------


@dataclasses.dataclass
class ServerSpec:
    name: str
    webhook: bool  # posts to the sink (else: accepts and discards)
    needs: str  # "python", "node", "postfix"
    command: Callable[[int, str, Path], tuple[list[str], dict[str, str]]]
    note: str = ""


def _mailbridge(
    mode: str, *, uvloop: bool = False
) -> Callable[[int, str, Path], tuple[list[str], dict[str, str]]]:
    def command(port: int, hook: str, work: Path) -> tuple[list[str], dict[str, str]]:
        secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
        env = {
            "MAILBRIDGE_WEBHOOK_URL": hook,
            "MAILBRIDGE_TARGET_EMAILS": "*",
            "MAILBRIDGE_WEBHOOK_SECRET": secret,
            "MAILBRIDGE_SMTP__PORT": str(port),
            "MAILBRIDGE_HTTP__PORT": str(free_port()),
            "MAILBRIDGE_SMTP__MAX_SESSIONS": "5000",
            "MAILBRIDGE_SMTP__MAX_SESSIONS_PER_IP": "5000",
            "MAILBRIDGE_SMTP__MAX_MESSAGE_SIZE_BYTES": str(64 * MB),
            "MAILBRIDGE_LOG__FORMAT": "json",
            "MAILBRIDGE_DELIVERY__MODE": mode,
        }
        if mode == "spool":
            env.update(_spool_env(work))
        if uvloop:
            return [str(VENV_PY), str(BENCH / "peers" / "mailbridge_uvloop.py")], env
        return [str(ROOT / ".venv" / "bin" / "mailbridge")], env

    return command


def _spool_env(work: Path) -> dict[str, str]:
    """Point every path-like setting of the spool group at a fresh folder."""
    from mailbridge import config

    group = config.Settings.model_fields.get("spool")
    env: dict[str, str] = {}
    if group is None or group.annotation is None:
        return env
    for name in getattr(group.annotation, "model_fields", {}):
        if name in ("dir", "path", "directory") or name.endswith(("_dir", "_path")):
            folder = work / "spool"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            env[f"MAILBRIDGE_SPOOL__{name.upper()}"] = str(folder)
    if "max_bytes" in getattr(group.annotation, "model_fields", {}):
        env["MAILBRIDGE_SPOOL__MAX_BYTES"] = str(8 * 1024 * MB)
    return env


def spool_available() -> bool:
    """Whether the bridge in this checkout has a spool mode wired in."""
    app = ROOT / "service" / "mailbridge" / "app.py"
    spool = ROOT / "service" / "mailbridge" / "spool.py"
    spool_pkg = ROOT / "service" / "mailbridge" / "spool"
    return (spool.exists() or spool_pkg.is_dir()) and "spool" in app.read_text()


def _python(script: str) -> Callable[[int, str, Path], tuple[list[str], dict[str, str]]]:
    def command(port: int, hook: str, work: Path) -> tuple[list[str], dict[str, str]]:
        return [str(VENV_PY), str(BENCH / "peers" / script), str(port)], {}

    return command


def _node(*args: str) -> Callable[[int, str, Path], tuple[list[str], dict[str, str]]]:
    def command(port: int, hook: str, work: Path) -> tuple[list[str], dict[str, str]]:
        extra = [hook if a == "{hook}" else str(work / "tmp") if a == "{tmp}" else a for a in args]
        return ["node", str(BENCH / "peers" / extra[0]), str(port), *extra[1:]], {}

    return command


def _haraka(port: int, hook: str, work: Path) -> tuple[list[str], dict[str, str]]:
    """Haraka with bench/peers/haraka (accept every recipient, queue/discard), one process."""
    home = work / "haraka"
    haraka_home = BENCH / "node_modules" / "Haraka"
    shutil.copytree(haraka_home / "config", home / "config", dirs_exist_ok=True)  # defaults
    shutil.copytree(BENCH / "peers" / "haraka", home, dirs_exist_ok=True)
    # nodes=0: no cluster, so the process we measure is the one doing the work.
    (home / "config" / "smtp.ini").write_text(f"[main]\nlisten={HOST}:{port}\nnodes=0\n")
    return ["node", str(haraka_home / "bin" / "haraka"), "-c", str(home)], {
        "YES_REALLY_DO_DISCARD": "1"
    }


def _smtp_sink(port: int, hook: str, work: Path) -> tuple[list[str], dict[str, str]]:
    return ["smtp-sink", "-u", "nobody", f"{HOST}:{port}", "1024"], {}


SERVERS: dict[str, ServerSpec] = {
    spec.name: spec
    for spec in [
        ServerSpec("mailbridge-sync", True, "python", _mailbridge("sync")),
        ServerSpec("mailbridge-spool", True, "python", _mailbridge("spool")),
        ServerSpec("mailbridge-sync-uvloop", True, "uvloop", _mailbridge("sync", uvloop=True)),
        ServerSpec("aiosmtpd-discard", False, "python", _python("aiosmtpd_discard.py")),
        ServerSpec("smtp-server-post", True, "node", _node("smtp_server.js", "post", "{hook}")),
        ServerSpec("smtp-server-discard", False, "node", _node("smtp_server.js", "discard")),
        ServerSpec(
            "mailin",
            True,
            "node",
            _node("mailin.js", "{hook}", "{tmp}"),
            note="answers 250 before it posts (fire and forget)",
        ),
        ServerSpec("haraka-discard", False, "node", _haraka),
        ServerSpec("smtp-sink", False, "postfix", _smtp_sink),
    ]
}
DEFAULT_SERVERS = list(SERVERS)


class Server:
    """One running server under test: started, watched and stopped by PID."""

    def __init__(self, spec: ServerSpec, hook: str) -> None:
        self.spec = spec
        self.hook = hook
        self.port = free_port()
        self.work = WORK / spec.name
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.work / "server.log"
        shutil.rmtree(self.work, ignore_errors=True)  # fresh for each harness run
        self.work.mkdir(parents=True)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        # A restart keeps the log: what went wrong before it is the interesting part.
        for child in self.work.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            elif child != self.log:
                child.unlink()
        (self.work / "tmp").mkdir(parents=True)
        argv, extra = self.spec.command(self.port, self.hook, self.work)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MAILBRIDGE_", "OTEL_"))}
        env.update(extra)
        self.proc = spawn(argv, self.log, cwd=self.work, env=env)
        deadline = time.monotonic() + READY_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited at start: {self.tail()}")
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, self.port), 1)
                line = await asyncio.wait_for(reader.readline(), 2)
                writer.close()
                if line.startswith(b"220"):
                    return
            except (OSError, TimeoutError):
                pass
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.spec.name} not ready in {READY_SECONDS:g}s: {self.tail()}")

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-800:]
        except OSError:
            return ""

    async def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        for _ in range(100):
            if self.proc.poll() is not None:
                return
            await asyncio.sleep(0.05)
        self.proc.kill()
        self.proc.wait()

    # --- /proc readings
    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime

    def status_kib(self, key: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return 0

    def reset_peak(self) -> None:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")


# --- the sink -----------------------------------------------------------------


class Sink:
    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def hook(self) -> str:
        return f"http://{HOST}:{self.port}/hook"

    async def start(self) -> None:
        WORK.mkdir(parents=True, exist_ok=True)
        argv = [str(VENV_PY), str(BENCH / "sink.py"), str(self.port)]
        (WORK / "sink.log").unlink(missing_ok=True)
        self.proc = spawn(argv, WORK / "sink.log", cwd=WORK, env=dict(os.environ))
        for _ in range(100):
            with contextlib.suppress(OSError):
                self.stats()
                return
            await asyncio.sleep(0.1)
        raise RuntimeError("the webhook sink did not start")

    def _call(self, method: str, path: str) -> bytes:
        request = urllib.request.Request(f"http://{HOST}:{self.port}{path}", method=method)
        with urllib.request.urlopen(request, timeout=10) as response:
            return bytes(response.read())

    def stats(self) -> dict[str, Any]:
        return dict(json.loads(self._call("GET", "/stats")))

    def reset(self) -> None:
        self._call("POST", "/reset")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            await asyncio.to_thread(self.proc.wait, 10)


# --- one measured run -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cell:
    size: int
    concurrency: int
    reuse: bool
    messages: int

    @property
    def label(self) -> str:
        return f"{human(self.size)} c={self.concurrency} {'reuse' if self.reuse else 'new-conn'}"


@dataclasses.dataclass
class RunResult:
    server: str
    cell: Cell
    repeat: int
    sent: int
    arrived: int
    ok: bool
    msgs_per_s: float | None
    p50_ms: float | None
    p99_ms: float | None
    latency_samples: int
    cpu_ms_per_msg: float | None
    peak_rss_mib: float
    error: str = ""
    #: The run hit RUN_CAP_SECONDS: its later repeats are not run (they would only
    #: spend the same time to fail the same way).
    capped: bool = False


def human(size: int) -> str:
    if size >= MB:
        return f"{size // MB} MB"
    return f"{size // KB} KB"


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def probe_period(size: int) -> float:
    return 0.02 if size <= 10 * KB else 0.05 if size <= MB else 2.0


async def measure(
    server: Server, sink: Sink | None, cell: Cell, repeat: int, run_id: str
) -> RunResult:
    webhook = server.spec.webhook
    if webhook:
        assert sink is not None
        sink.reset()
    server.reset_peak()
    cpu_before = server.cpu_seconds()
    argv = [
        "smtp-source",
        "-s",
        str(cell.concurrency),
        "-m",
        str(cell.messages),
        "-l",
        str(cell.size),
        "-f",
        SENDER,
        "-t",
        RECIPIENT,
        "-M",
        "source.bench.local",
        "-S",
        "bench",
    ]
    if cell.reuse:
        argv.append("-d")
    argv.append(f"{HOST}:{server.port}")
    error = ""
    capped = False
    started_ns = time.time_ns()
    deadline = time.monotonic() + RUN_CAP_SECONDS
    source = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    stop = asyncio.Event()
    probed = probe.ProbeResult()
    probe_task = None
    if webhook:
        probe_task = asyncio.create_task(
            probe.run_probe(
                HOST,
                server.port,
                size=cell.size,
                reuse=cell.reuse,
                period_seconds=probe_period(cell.size),
                run_id=run_id,
                stop=stop,
                max_messages=2000,
                result=probed,
            )
        )
    try:
        output, _ = await asyncio.wait_for(source.communicate(), RUN_CAP_SECONDS)
        if source.returncode != 0:
            text = output.decode(errors="replace")[-300:]
            error = f"smtp-source exit {source.returncode}: {text}"
    except TimeoutError:
        source.kill()
        await source.wait()
        error = f"smtp-source still running after {RUN_CAP_SECONDS:g}s (stopped)"
        capped = True
    source_done_ns = time.time_ns()
    stop.set()
    if probe_task is not None:
        await probe_task
    arrived = cell.messages if not error else 0
    stats: dict[str, Any] = {}
    if webhook and sink is not None:
        seen, changed = -1, time.monotonic()
        while True:
            stats = await asyncio.to_thread(sink.stats)
            if stats["count"] + stats["probe_count"] != seen:
                seen, changed = stats["count"] + stats["probe_count"], time.monotonic()
            complete = stats["count"] >= cell.messages and stats["probe_count"] >= len(probed.sent)
            stalled = time.monotonic() - changed > STALL_SECONDS
            if complete or stalled or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        arrived = int(stats["count"])
        capped = capped or time.monotonic() > deadline
        if arrived < cell.messages and not error:
            error = (
                f"only {arrived} of {cell.messages} arrived (none for {STALL_SECONDS:g}s, "
                f"or {RUN_CAP_SECONDS:g}s in all)"
            )
    cpu = server.cpu_seconds() - cpu_before
    peak = server.status_kib("VmHWM") / 1024
    ok = not error and arrived == cell.messages
    end_ns = int(stats.get("last_ns") or 0) if webhook else source_done_ns
    rate = cell.messages / ((end_ns - started_ns) / 1e9) if ok and end_ns > started_ns else None
    latencies = []
    if webhook:
        arrivals = stats.get("probes", {})
        latencies = [
            (arrivals[key] - sent) / 1e6 for key, sent in probed.sent.items() if key in arrivals
        ]
        if probed.failures and not error:
            error = f"probe failures: {probed.failures[:2]}"
    total = cell.messages + len(probed.sent)
    return RunResult(
        server=server.spec.name,
        cell=cell,
        repeat=repeat,
        sent=cell.messages,
        arrived=arrived,
        ok=ok,
        msgs_per_s=rate,
        p50_ms=percentile(latencies, 0.5) if latencies else None,
        p99_ms=percentile(latencies, 0.99) if latencies else None,
        latency_samples=len(latencies),
        cpu_ms_per_msg=cpu * 1000 / total if ok else None,
        peak_rss_mib=peak,
        error=error,
        capped=capped,
    )


# --- memory tests ---------------------------------------------------------------


@dataclasses.dataclass
class MemoryResult:
    server: str
    repeat: int
    idle_kib_per_conn: float | None
    big_peak_mib: float | None  # RSS peak above the idle baseline
    big_ratio: float | None  # ... divided by the message size
    error: str = ""


async def memory_tests(
    server: Server, sink: Sink | None, repeat: int, big_shape: str = "text"
) -> MemoryResult:
    error = ""
    idle = big = ratio = None
    await asyncio.sleep(0.5)
    before = server.status_kib("VmRSS")
    writers: list[asyncio.StreamWriter] = []
    try:
        writers = await asyncio.wait_for(probe.open_idle(HOST, server.port, IDLE_SESSIONS), 60)
        await asyncio.sleep(1.0)
        idle = (server.status_kib("VmRSS") - before) / IDLE_SESSIONS
    except (OSError, probe.SmtpError, TimeoutError) as problem:
        error = f"idle sessions: {problem!r}"
    finally:
        await probe.close_all(writers)
    await asyncio.sleep(1.0)
    if sink is not None:
        sink.reset()
    baseline = server.status_kib("VmRSS")
    server.reset_peak()
    client = probe.Client(HOST, server.port)
    try:
        body, last = probe.big_message(big_shape, BIG_MESSAGE_BYTES, f"mbprobe-big{repeat}")
        await asyncio.wait_for(client.connect(), 10)
        await asyncio.wait_for(client.send(body, last), RUN_CAP_SECONDS)
        del body
        delivered = sink is None or not server.spec.webhook
        if not delivered and sink is not None:
            delivered = await wait_for_probe(sink, RUN_CAP_SECONDS)
        if not delivered:
            error += " 25 MiB message did not arrive"
        peak = server.status_kib("VmHWM")
        big = (peak - baseline) / 1024
        ratio = big * MB / BIG_MESSAGE_BYTES
    except (OSError, probe.SmtpError, TimeoutError) as problem:
        error += f" 25 MiB message: {problem!r}"
    finally:
        await client.close()
    return MemoryResult(server.spec.name, repeat, idle, big, ratio, error.strip())


async def wait_for_probe(sink: Sink, seconds: float) -> bool:
    """Whether a probe message reached the sink within ``seconds``."""
    deadline = time.monotonic() + seconds
    while not sink.stats()["probe_count"]:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


# --- the whole run --------------------------------------------------------------


COUNTS = {KB: 2000, 100 * KB: 400}


def messages_for(size: int, concurrency: int, reuse: bool = True) -> int:
    """Messages per run: enough to reach a steady state, bounded for the slow peers.

    One session opening a connection per message gets fewer: nodemailer's
    smtp-server (and mailin's) waits a fixed 100 ms before its greeting.
    """
    if size >= MB:
        return max(3, concurrency)  # 10 MB: one per session
    if concurrency == 1 and not reuse:
        return 200 if size <= KB else 100
    return COUNTS[size]


def cells(quick: bool, spec: str | None = None) -> list[Cell]:
    """The matrix, or ``spec``: ``SIZE:CONCURRENCY:reuse|new[:COUNT],...`` (SIZE 1K, 100K, 10M)."""
    if spec:
        found = []
        for item in spec.split(","):
            size_text, concurrency_text, mode, *count = item.strip().split(":")
            unit = {"K": KB, "M": MB}[size_text[-1].upper()]
            size, concurrency = int(size_text[:-1]) * unit, int(concurrency_text)
            reuse = mode == "reuse"
            messages = int(count[0]) if count else messages_for(size, concurrency, reuse)
            found.append(Cell(size, concurrency, reuse, messages))
        return found
    if quick:
        return [Cell(KB, 10, True, 300)]
    return [
        Cell(size, concurrency, reuse, messages_for(size, concurrency, reuse))
        for size in (KB, 100 * KB, 10 * MB)
        for concurrency in (1, 10, 50)
        for reuse in (True, False)
    ]


def available(spec: ServerSpec) -> str | None:
    """Why ``spec`` cannot run here, or None."""
    if spec.name == "mailbridge-spool" and not spool_available():
        return "pending: the spool mode has not landed in this checkout yet"
    if spec.needs == "uvloop":
        found = subprocess.run(
            [str(VENV_PY), "-c", "import uvloop"], capture_output=True, check=False
        )
        if found.returncode != 0:
            return "uvloop is not installed in .venv (it is not a dependency; pip install uvloop)"
    if spec.needs == "node":
        if shutil.which("node") is None:
            return "node is not installed"
        if not (BENCH / "node_modules" / "smtp-server").is_dir():
            return "npm peers not installed (bench/run installs them)"
    if spec.needs == "postfix" and shutil.which("smtp-sink") is None:
        return "Postfix smtp-sink is not installed"
    return None


async def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="300 messages, 1 KB, 10 sessions")
    parser.add_argument("--servers", default=",".join(DEFAULT_SERVERS), help="comma list")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (quick: 1)")
    parser.add_argument("--cells", default=None, help="e.g. 1K:10:reuse,100K:10:new:200")
    parser.add_argument("--no-memory", action="store_true", help="skip idle / 25 MiB tests")
    parser.add_argument("--memory-only", action="store_true", help="only idle / 25 MiB tests")
    parser.add_argument(
        "--big-shape",
        choices=probe.BIG_SHAPES,
        default="text",
        help="the 25 MiB message: plain text, or multipart with a base64 attachment",
    )
    parser.add_argument("--out", type=Path, default=None, help="Markdown report")
    parser.add_argument("--json", type=Path, default=None, help="raw results as JSON")
    args = parser.parse_args(argv)
    if shutil.which("smtp-source") is None:
        print("smtp-source (Debian postfix) is missing: run bench/run", file=sys.stderr)
        return 2
    repeats = args.repeats or (1 if args.quick else 3)
    partial = (
        args.quick or args.cells or args.memory_only or args.servers != ",".join(DEFAULT_SERVERS)
    )
    out = args.out or (WORK / "PARTIAL.md" if partial else BENCH / "RESULTS.md")
    wanted = [name.strip() for name in args.servers.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in SERVERS]
    if unknown:
        print(f"unknown servers: {unknown}; known: {list(SERVERS)}", file=sys.stderr)
        return 2
    skipped = {name: why for name in wanted if (why := available(SERVERS[name]))}
    names = [name for name in wanted if name not in skipped]
    started_at = datetime.datetime.now(datetime.UTC)
    loads = [load_average()]
    sink = Sink()
    await sink.start()
    servers: dict[str, Server] = {}
    results: list[RunResult] = []
    memory: list[MemoryResult] = []
    try:
        for name in names:
            server = Server(SERVERS[name], sink.hook)
            try:
                await server.start()
            except RuntimeError as error:
                skipped[name] = f"did not start: {error}"
                await server.stop()
                continue
            servers[name] = server
        order = list(servers)
        capped: set[tuple[int, str]] = set()
        plan = [] if args.memory_only else cells(args.quick, args.cells)
        for repeat in range(repeats):
            for index, cell in enumerate(plan):
                shift = (repeat + index) % max(1, len(order))
                for name in order[shift:] + order[:shift]:
                    server = servers[name]
                    if (index, name) in capped:
                        result = RunResult(
                            name,
                            cell,
                            repeat,
                            cell.messages,
                            0,
                            False,
                            None,
                            None,
                            None,
                            0,
                            None,
                            0.0,
                            f"not repeated: an earlier repeat ran into the "
                            f"{RUN_CAP_SECONDS:g}s cap",
                        )
                        results.append(result)
                        report_line(result)
                        continue
                    run_id = f"r{repeat}c{index}{name.replace('-', '')}"
                    result = await measure(server, sink, cell, repeat, run_id)
                    if result.capped:
                        capped.add((index, name))
                    results.append(result)
                    report_line(result)
                    loads.append(load_average())
                    if not result.ok:  # whatever it still holds must not leak into the next run
                        await server.stop()
                        try:
                            await server.start()
                        except RuntimeError as error:
                            skipped[name] = f"stopped measuring after a failed restart: {error}"
                            order.remove(name)
        if args.memory_only or not (args.no_memory or args.quick or args.cells):
            for repeat in range(repeats):
                for name, server in servers.items():
                    await server.stop()
                    try:
                        await server.start()
                    except RuntimeError:
                        continue
                    mem = await memory_tests(server, sink, repeat, args.big_shape)
                    memory.append(mem)
                    print(
                        f"memory {name} #{repeat}: idle {fmt(mem.idle_kib_per_conn)} KiB/conn, "
                        f"25 MiB peak +{fmt(mem.big_peak_mib)} MiB {mem.error}",
                        flush=True,
                    )
    finally:
        for server in servers.values():
            await server.stop()
        await sink.stop()
    finished_at = datetime.datetime.now(datetime.UTC)
    args.loads = loads
    report = render(results, memory, skipped, names, started_at, finished_at, args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(f"wrote {out}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "runs": [
                        {**dataclasses.asdict(r), "cell": dataclasses.asdict(r.cell)}
                        for r in results
                    ],
                    "memory": [dataclasses.asdict(m) for m in memory],
                    "skipped": skipped,
                },
                indent=1,
            )
        )
    if args.memory_only:
        return 0 if memory and not any(m.error for m in memory) else 1
    return 0 if results and all(r.ok for r in results) else 1


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def report_line(result: RunResult) -> None:
    print(
        f"{result.cell.label:22} {result.server:20} #{result.repeat} "
        f"{fmt(result.msgs_per_s):>8} msg/s  p50 {fmt(result.p50_ms, 2):>7} ms  "
        f"p99 {fmt(result.p99_ms, 2):>7} ms  cpu {fmt(result.cpu_ms_per_msg, 3):>6} ms/msg  "
        f"rss {result.peak_rss_mib:7.1f} MiB  {result.arrived}/{result.sent} {result.error}",
        flush=True,
    )


# --- the report -----------------------------------------------------------------


def median(values: Sequence[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return statistics.median(found) if found else None


@dataclasses.dataclass
class Summary:
    msgs_per_s: float | None
    p50_ms: float | None
    p99_ms: float | None
    cpu_ms_per_msg: float | None
    peak_rss_mib: float | None
    runs_ok: int
    runs: int
    samples: int
    errors: list[str]


def summarise(results: Sequence[RunResult]) -> dict[tuple[Cell, str], Summary]:
    groups: dict[tuple[Cell, str], list[RunResult]] = {}
    for result in results:
        groups.setdefault((result.cell, result.server), []).append(result)
    summary = {}
    for key, runs in groups.items():
        good = [r for r in runs if r.ok]
        summary[key] = Summary(
            msgs_per_s=median([r.msgs_per_s for r in good]),
            p50_ms=median([r.p50_ms for r in good]),
            p99_ms=median([r.p99_ms for r in good]),
            cpu_ms_per_msg=median([r.cpu_ms_per_msg for r in good]),
            peak_rss_mib=median([r.peak_rss_mib for r in good]),
            runs_ok=len(good),
            runs=len(runs),
            samples=sum(r.latency_samples for r in good),
            errors=[r.error for r in runs if r.error],
        )
    return summary


def machine() -> list[str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    node = subprocess.run(["node", "--version"], capture_output=True, text=True, check=False)
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    python = subprocess.run(
        [str(VENV_PY), "--version"], capture_output=True, text=True, check=False
    )
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "service"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.splitlines()
    state = f"{len(dirty)} uncommitted changes under service/" if dirty else "clean service/"
    return [
        f"- cores: {os.cpu_count()}, CPU: {model}, memory: "
        f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') // MB // 1024} GiB",
        f"- kernel: {platform.release()}; {python.stdout.strip()} (the bridge's .venv); "
        f"Node {node.stdout.strip() or 'absent'}",
        f"- mailbridge commit: {commit.stdout.strip() or 'unknown'} ({state})",
    ]


PEERS_FOR_RATIO = [
    "mailbridge-spool",
    "mailbridge-sync-uvloop",
    "aiosmtpd-discard",
    "smtp-server-post",
    "smtp-server-discard",
    "mailin",
    "haraka-discard",
    "smtp-sink",
]


def render(
    results: Sequence[RunResult],
    memory: Sequence[MemoryResult],
    skipped: dict[str, str],
    names: Sequence[str],
    started: datetime.datetime,
    finished: datetime.datetime,
    args: argparse.Namespace,
) -> str:
    summary = summarise(results)
    plan = list(dict.fromkeys(r.cell for r in results))
    ran = [n for n in names if any(r.server == n for r in results)]
    command = "bench/run" + (" --quick" if args.quick else "")
    lines = [
        "# mailbridge benchmarks",
        "",
        f"Produced by `{command}` on {started:%Y-%m-%d} "
        f"({started:%H:%M}-{finished:%H:%M} UTC); medians of "
        f"{args.repeats or (1 if args.quick else 3)} interleaved repeats.",
        "",
        "## Machine",
        "",
        *machine(),
        f"- 1-minute load average during the run (sampled after each measurement): "
        f"min {min(map(float, args.loads)):.1f}, "
        f"median {statistics.median(map(float, args.loads)):.1f}, "
        f"max {max(map(float, args.loads)):.1f} on {os.cpu_count()} cores. Above about 2, "
        "other work shared the CPUs: msgs/s and latency then understate every server "
        "alike (interleaving spreads the disturbance); CPU ms/msg is the steadier figure.",
        "",
        "## Servers",
        "",
        "| server | what it does |",
        "|---|---|",
        "| mailbridge-sync | this bridge, sync mode: parse, signed JSON POST, "
        "250 after the webhook's 2xx |",
        "| mailbridge-spool | this bridge, spool mode: 250 once fsynced, delivered by the worker |",
        "| mailbridge-sync-uvloop | mailbridge-sync on uvloop's event loop (bench/peers/"
        "mailbridge_uvloop.py; uvloop is not a dependency) |",
        "| aiosmtpd-discard | bare aiosmtpd 1.4.6, accepts and discards (no parsing, no POST) |",
        "| smtp-server-post | nodemailer smtp-server + mailparser + JSON POST, "
        "250 after the POST's 2xx; its greeting waits a fixed 100 ms (early-talker check) |",
        "| smtp-server-discard | nodemailer smtp-server, accepts and discards |",
        "| mailin | npm mailin 3.0.4 (SMTP → parse → multipart POST); "
        "answers 250 *before* posting |",
        "| haraka-discard | Haraka 3.3.4, one process, accept-all recipient plugin + "
        "queue/discard |",
        "| smtp-sink | Postfix smtp-sink (C), accepts and discards: the ceiling |",
        "",
    ]
    if skipped:
        lines += ["Not measured in this run:", ""]
        lines += [f"- **{name}**: {why}" for name, why in skipped.items()]
        lines.append("")
    lines += [
        "## Throughput, latency, CPU, memory",
        "",
        "Load: Postfix `smtp-source` (`-l SIZE -s CONCURRENCY -m COUNT`, `-d` for reused "
        "connections), one recipient. msgs/s are counted at the webhook sink "
        "(discarding servers: accepted replies). Latency: end of DATA → webhook "
        "arrival, from a paced probe session running alongside the load. CPU: the "
        "server process's user+system time per message. RSS: the server's peak during the run.",
        "",
        "| size | conc | connections | server | msgs/s | p50 ms | p99 ms | CPU ms/msg "
        "| peak RSS MiB | runs ok | msgs/run |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in plan:
        for name in ran:
            s = summary.get((cell, name))
            if s is None:
                continue
            lines.append(
                f"| {human(cell.size)} | {cell.concurrency} | "
                f"{'reused' if cell.reuse else 'new per msg'} | {name} | "
                f"{fmt(s.msgs_per_s)} | {fmt(s.p50_ms, 2)} | {fmt(s.p99_ms, 2)} | "
                f"{fmt(s.cpu_ms_per_msg, 3)} | {fmt(s.peak_rss_mib)} | {s.runs_ok}/{s.runs} | "
                f"{cell.messages} |"
            )
    lines.append("")
    peers = [p for p in PEERS_FOR_RATIO if p in ran]
    if "mailbridge-sync" in ran and peers:
        lines += [
            "## Ratios: mailbridge-sync msgs/s ÷ peer msgs/s",
            "",
            "| cell | " + " | ".join(peers) + " |",
            "|---|" + "---:|" * len(peers),
        ]
        for cell in plan:
            ours = summary.get((cell, "mailbridge-sync"))
            row = []
            for peer in peers:
                theirs = summary.get((cell, peer))
                if ours and theirs and ours.msgs_per_s and theirs.msgs_per_s:
                    row.append(f"{ours.msgs_per_s / theirs.msgs_per_s:.2f}x")
                else:
                    row.append("-")
            lines.append(f"| {cell.label} | " + " | ".join(row) + " |")
        lines.append("")
    if memory:
        lines += [
            "## Memory",
            "",
            f"Idle: RSS growth per session with {IDLE_SESSIONS:,} sessions open (after EHLO), "
            "on a freshly started server. Big: RSS peak above the idle baseline while one "
            "25 MiB message is received (and, for webhook servers, delivered); ratio = "
            "peak ÷ 25 MiB.",
            "",
            "| server | idle KiB/conn | 25 MiB: peak above idle MiB | ratio to size | notes |",
            "|---|---:|---:|---:|---|",
        ]
        for name in ran:
            rows = [m for m in memory if m.server == name]
            if not rows:
                continue
            errors = "; ".join(sorted({m.error for m in rows if m.error}))
            lines.append(
                f"| {name} | {fmt(median([m.idle_kib_per_conn for m in rows]))} | "
                f"{fmt(median([m.big_peak_mib for m in rows]))} | "
                f"{fmt(median([m.big_ratio for m in rows]), 2)} | {errors} |"
            )
        lines.append("")
    lines += targets(summary, memory, plan)
    failures = [r for r in results if not r.ok]
    if failures:
        lines += ["## Runs that did not complete", ""]
        lines += [f"- {r.cell.label} {r.server} #{r.repeat}: {r.error}" for r in failures]
        lines.append("")
    return "\n".join(lines)


def targets(
    summary: dict[tuple[Cell, str], Summary], memory: Sequence[MemoryResult], plan: list[Cell]
) -> list[str]:
    lines = ["## Targets (issue 6)", "", "| target | measured | met |", "|---|---|---|"]

    def rate(cell: Cell, name: str) -> float | None:
        s = summary.get((cell, name))
        return s.msgs_per_s if s else None

    def ratio_row(text: str, cell: Cell, peer: str, want: float) -> None:
        ours, theirs = rate(cell, "mailbridge-sync"), rate(cell, peer)
        if ours and theirs:
            value = ours / theirs
            lines.append(
                f"| {text} ({cell.label}) | {value:.2f}x | {'yes' if value >= want else 'no'} |"
            )
        else:
            lines.append(f"| {text} ({cell.label}) | not measured | - |")

    for cell in plan:
        if cell.concurrency != 10 or cell.size not in (KB, 100 * KB):
            continue
        ratio_row("sync ≥ 2x smtp-server-post", cell, "smtp-server-post", 2)
        ratio_row("sync ≥ 4x mailin", cell, "mailin", 4)
        if cell.size == 100 * KB:
            ratio_row("sync ≥ 1x aiosmtpd-discard", cell, "aiosmtpd-discard", 1)
        sync, spool = rate(cell, "mailbridge-sync"), rate(cell, "mailbridge-spool")
        if sync and spool:
            value = spool / sync
            lines.append(
                f"| spool ≥ 0.8x sync ({cell.label}) | {value:.2f}x | "
                f"{'yes' if value >= 0.8 else 'no'} |"
            )
        else:
            lines.append(f"| spool ≥ 0.8x sync ({cell.label}) | pending (no spool mode) | - |")
    rows = [m for m in memory if m.server == "mailbridge-sync"]
    idle = median([m.idle_kib_per_conn for m in rows])
    big = median([m.big_ratio for m in rows])
    lines.append(
        f"| ≤ 8 KiB per idle connection | {fmt(idle)} KiB | "
        f"{'-' if idle is None else 'yes' if idle <= 8 else 'no'} |"
    )
    lines.append(
        f"| 25 MiB message: peak RSS ≤ 2.5x size above idle | {fmt(big, 2)}x | "
        f"{'-' if big is None else 'yes' if big <= 2.5 else 'no'} |"
    )
    lines.append("")
    return lines


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
