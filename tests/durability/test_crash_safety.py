"""Crash safety of spool mode: ``kill -9`` the real ``mailbridge`` process under load, again
and again, and restart it on the same spool.

Senders are real SMTP clients (``smtplib``) in threads that behave like an MTA:
a message counts as accepted only when DATA got ``250``; anything else (refused
connection, dropped session) is sent again later with the same bytes. The bridge
is killed at random moments (``SIGKILL`` from here) and at the precise points of
a commit (the test-only hook ``MAILBRIDGE_TEST_SPOOL_CRASH`` makes it
``os._exit`` between write, fsync, rename and directory fsync, or right before
answering). After the last restart every accepted message must reach the
receiver; a message delivered more than once must carry the same
``webhook-id`` each time; no spool file may be damaged.

Bounded: a fixed number of rounds, each at most a few seconds; loopback only;
every process is started here and stopped by its PID.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import smtplib
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailbridge.spool import record
from tests.support.receiver import ReceiverThread, Reply, unused_port

BIN = Path(sys.executable).parent / "mailbridge"
SENDERS = 6
#: (crash hook or None for a SIGKILL from the test, seconds of load before the SIGKILL)
ROUNDS = [
    ("written:7", None),
    (None, 0.7),
    ("synced:11", None),
    ("renamed:5", None),
    (None, 1.3),
    ("committed:9", None),
    (None, 0.4),
]
ROUND_LIMIT_SECONDS = 8.0
#: Every bridge process a test started: whatever happens, none outlives its test.
STARTED: list[Bridge] = []


@pytest.fixture(autouse=True)
def _no_process_left_behind() -> Iterator[None]:
    yield
    while STARTED:
        bridge = STARTED.pop()
        if bridge.proc.poll() is None:
            bridge.kill()


def _subject(path: Path) -> str:
    parsed = record.decode(path.read_bytes())
    raw = path.read_bytes()[parsed.raw_offset : parsed.raw_offset + parsed.header.size_bytes]
    return raw.split(b"\r\n", 1)[0].removeprefix(b"Subject: ").decode()


class Bridge:
    """One ``mailbridge`` process on the spool; stopped by its PID only."""

    def __init__(self, spool: Path, url: str, crash: str | None, log: Path, **extra: str) -> None:
        self.smtp_port, self.http_port = unused_port(), unused_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MAILBRIDGE_", "OTEL_"))}
        env |= {
            "MAILBRIDGE_WEBHOOK_URL": url,
            "MAILBRIDGE_TARGET_EMAILS": "*@a.test",
            "MAILBRIDGE_DELIVERY__MODE": "spool",
            "MAILBRIDGE_DELIVERY__RETRY_INITIAL_SECONDS": "0.05",
            "MAILBRIDGE_DELIVERY__RETRY_MAX_SECONDS": "0.5",
            "MAILBRIDGE_SPOOL__DIRECTORY": str(spool),
            "MAILBRIDGE_SMTP__PORT": str(self.smtp_port),
            "MAILBRIDGE_SMTP__HOSTNAME": "mx.test",
            "MAILBRIDGE_HTTP__PORT": str(self.http_port),
            "MAILBRIDGE_LOG__LEVEL": "WARNING",
            "MAILBRIDGE_LOG__FORMAT": "json",
        }
        if crash:
            env["MAILBRIDGE_TEST_SPOOL_CRASH"] = crash
        env |= extra
        self._log = log.open("a")
        self.proc = subprocess.Popen(
            [str(BIN)], env=env, stdout=self._log, stderr=self._log, cwd=spool.parent
        )
        STARTED.append(self)
        deadline = time.monotonic() + 30
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"bridge did not start (see {log})")
            time.sleep(0.05)

    def _ready(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.http_port}/readyz"
            with urllib.request.urlopen(url, timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        if not self._log.closed:
            self._log.close()

    def terminate(self) -> int:
        os.kill(self.proc.pid, signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        self._log.close()
        return code


class Senders:
    """MTA-like clients: resend until 250, same bytes each time."""

    def __init__(self) -> None:
        self.port = 0
        self.accepted: set[str] = set()
        self.unacknowledged: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(SENDERS)
        ]

    @staticmethod
    def message(token: str) -> bytes:
        return f"Subject: {token}\r\nMessage-ID: <{token}@test>\r\n\r\nbody of {token}\r\n".encode()

    def start(self) -> None:
        """Start the sender threads (once; later calls only follow the new port)."""
        for thread in self._threads:
            if not thread.is_alive() and not self._stop.is_set() and thread.ident is None:
                thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=20)

    def _run(self, sender: int) -> None:
        number, client = 0, None
        token = f"s{sender}-m{number}"
        while not self._stop.is_set():
            try:
                if client is None:
                    client = smtplib.SMTP("127.0.0.1", self.port, timeout=10)
                with self._lock:
                    self.unacknowledged.add(token)
                client.sendmail("sender@x.test", ["rcpt@a.test"], self.message(token))
            except (OSError, smtplib.SMTPException):
                if client is not None:
                    client.close()
                client = None
                time.sleep(0.05)  # the bridge is down: try the same message again
                continue
            with self._lock:
                self.accepted.add(token)
                self.unacknowledged.discard(token)
            number += 1
            token = f"s{sender}-m{number}"
        if client is not None:
            client.close()


def test_every_message_answered_250_survives_repeated_kill_9(tmp_path: Path) -> None:
    spool, log = tmp_path / "spool", tmp_path / "bridge.log"
    rng = random.Random(int(os.environ.get("MAILBRIDGE_TEST_SEED", "1")))
    with ReceiverThread() as rx:
        senders = Senders()
        crashes: list[tuple[str, int | None]] = []
        try:
            for crash, load_seconds in ROUNDS:
                bridge = Bridge(spool, rx.url, crash, log)
                senders.port = bridge.smtp_port
                senders.start()
                if load_seconds is None:  # the hook kills it mid-commit
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        bridge.proc.wait(timeout=ROUND_LIMIT_SECONDS)
                else:
                    time.sleep(load_seconds * rng.uniform(0.5, 1.5))
                bridge.kill()
                crashes.append((crash or "SIGKILL", bridge.proc.returncode))
            final = Bridge(spool, rx.url, None, log)
            senders.port = final.smtp_port
            time.sleep(1.0)  # senders resend what was never acknowledged
        finally:
            senders.stop()
        accepted = set(senders.accepted)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            delivered = {d.json["subject"] for d in rx.deliveries}
            waiting = [p for d in ("queue", "active") for p in (spool / d).iterdir()]
            if accepted <= delivered and not waiting:
                break
            time.sleep(0.1)
        exit_code = final.terminate()
        ids: dict[str, set[str]] = defaultdict(set)
        for delivery in rx.deliveries:
            ids[delivery.json["subject"]].add(delivery.webhook_id or "")

    lost = sorted(accepted - ids.keys())
    unstable = {token: sorted(found) for token, found in ids.items() if len(found) != 1}
    duplicates = len(rx.deliveries) - len(ids)
    report = (
        f"crashes={crashes} accepted={len(accepted)} delivered={len(ids)} "
        f"duplicates={duplicates} lost={lost[:10]} unstable={list(unstable.items())[:5]}"
    )
    print(report)
    assert all(code in (-signal.SIGKILL, 137) for _, code in crashes), report
    assert [code for name, code in crashes if name != "SIGKILL"] == [137] * 4, report
    assert len(accepted) > 100, report
    assert [] == lost, report
    assert {} == unstable, report
    assert 0 == exit_code
    assert [] == sorted(p.name for p in (spool / "corrupt").iterdir()), report
    leftovers = [p.name for d in ("queue", "active", "tmp", "dead") for p in (spool / d).iterdir()]
    assert [] == leftovers, report


def test_sigterm_under_load_with_a_slow_webhook_exits_in_bounds_and_keeps_everything(
    tmp_path: Path,
) -> None:
    """SIGTERM while senders push and every webhook answer takes 2 s: the bridge finishes
    its SMTP transactions, gives attempts in flight 1 s, exits; the next start delivers
    every acknowledged message, with the same webhook-id as any earlier attempt."""
    spool, log = tmp_path / "spool", tmp_path / "bridge.log"
    with ReceiverThread(default=Reply.slow(2.0)) as slow:
        bridge = Bridge(
            spool, slow.url, None, log,
            MAILBRIDGE_SPOOL__SHUTDOWN_GRACE_SECONDS="1",
            MAILBRIDGE_SMTP__SHUTDOWN_GRACE_SECONDS="3",
        )  # fmt: skip
        senders = Senders()
        senders.port = bridge.smtp_port
        senders.start()
        time.sleep(1.5)
        started = time.monotonic()
        os.kill(bridge.proc.pid, signal.SIGTERM)
        code = bridge.proc.wait(timeout=30)
        drain_seconds = time.monotonic() - started
        bridge._log.close()
        senders.stop()
        first_ids = {d.json["subject"]: d.webhook_id for d in slow.deliveries}
    accepted = set(senders.accepted)
    # Delivered before the stop: the bridge saw the 2xx and removed the file.
    left = sorted(p.name for p in (spool / "queue").iterdir())
    left_subjects = {_subject(spool / "queue" / name) for name in left}
    in_flight_after_stop = sorted(p.name for p in (spool / "active").iterdir())
    with ReceiverThread() as rx:
        final = Bridge(spool, rx.url, None, log)
        deadline = time.monotonic() + 30
        while len({d.json["subject"] for d in rx.deliveries}) < len(left):
            assert time.monotonic() < deadline, "the spool was not delivered after the restart"
            time.sleep(0.05)
        time.sleep(0.3)  # let the last removals land
        assert 0 == final.terminate()
    after = {d.json["subject"] for d in rx.deliveries}
    print(f"accepted={len(accepted)} left in spool={len(left)} drain={drain_seconds:.2f}s")
    assert 0 == code
    assert set() == accepted - set(first_ids) - after, "acknowledged and never delivered"
    assert set() == left_subjects - after, "left in the spool and not delivered after the restart"
    assert [] == sorted(p.name for d in ("queue", "active") for p in (spool / d).iterdir())
    assert drain_seconds < 1 + 3 + 2  # both graces, plus start-up slack
    assert len(accepted) > 20
    assert left, "a slow webhook must leave mail in the spool at shutdown"
    assert [] == in_flight_after_stop  # cut-short attempts went back to the queue
    later_ids = {d.json["subject"]: d.webhook_id for d in rx.deliveries}
    assert all(later_ids.get(s, i) == i for s, i in first_ids.items())
