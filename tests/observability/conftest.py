"""Fixtures for the observability tests: the real promtool and Prometheus binaries,
the real bridge after real mail (plus a scripted second instance), and a
Prometheus scraping them.

Everything listens on 127.0.0.1 only, every wait is bounded, and teardown stops
exactly the processes started here, by PID. A missing binary fails the tests
(``scripts/setup`` installs it); it never skips them.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import smtplib
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest
from live_processes import (
    Prometheus,
    free_port,
    http_get,
    prometheus_config,
    start_prometheus,
    stop,
    wait_for,
)
from observability_assets import RULES_FILE

from tests.support.receiver import ReceiverThread

HERE = Path(__file__).resolve().parent


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH: run scripts/setup (Debian package 'prometheus')")
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    return _binary("promtool")


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    return _binary("prometheus")


@contextlib.contextmanager
def _fake_bridge(log: Path) -> Iterator[str]:
    """Run ``fake_bridge.py``; yield its ``host:port``; stop it by PID."""
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(HERE / "fake_bridge.py")],
            stdin=subprocess.PIPE,  # the target exits when this pipe closes
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 15)
        line = process.stdout.readline() if ready else ""  # "listening 127.0.0.1:PORT"
        if not line.startswith("listening "):
            pytest.fail(f"metrics target did not start: {line!r} {log.read_text()}")
        address = line.split()[1]
        wait_for("the metrics target", lambda: http_get(f"http://{address}/metrics"), timeout=10)
        yield address
    finally:
        if process.stdin is not None:
            process.stdin.close()
        stop(process)


#: Routes of the real bridge: billing's webhook answers 200, support's 503.
BRIDGE_CONFIG = """
routes:
  - name: billing
    recipients: ["billing@example.com"]
    webhook: {url: "%(receiver)s/billing"}
  - name: support
    recipients: ["support@example.com"]
    webhook: {url: "%(receiver)s/support"}
delivery:
  sync_attempts: 1
  sync_budget_seconds: 5
"""


@dataclass
class BridgeTarget:
    """The real bridge as a process, and the mail it was sent."""

    address: str  # host:port of /metrics
    smtp_port: int
    accepted: int  # messages that got 250
    replies: dict[str, int]  # recipient -> SMTP reply code at the end


def _send_mail(port: int, recipient: str, *, starttls: bool = False) -> int:
    """Send one message with smtplib; the reply code for it (250, 451, 550...)."""
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "app@example.org", recipient, "hello"
    message.set_content("One line of text.\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        if starttls:
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # self-signed
            smtp.starttls(context=context)
        try:
            smtp.send_message(message)
        except smtplib.SMTPRecipientsRefused as error:
            return error.recipients[recipient][0]
        except smtplib.SMTPResponseException as error:
            return error.smtp_code
    return 250


@pytest.fixture(scope="session")
def real_bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BridgeTarget]:
    """The ``mailbridge`` command running on loopback with two routes to a real
    webhook receiver, after it processed real mail over SMTP: delivered (plain
    and STARTTLS), refused by its webhook (451) and for an unknown recipient (550).
    Stopped by PID (SIGTERM, then SIGKILL)."""
    binary = Path(sys.executable).parent / "mailbridge"
    if not binary.exists():
        pytest.fail(f"{binary} is missing: run scripts/setup (pip install -e .)")
    workdir = tmp_path_factory.mktemp("bridge")
    smtp_port, http_port = free_port(), free_port()
    with ReceiverThread() as receiver:
        receiver.respond(lambda delivery: 503 if delivery.path == "/support" else 200)
        (workdir / "bridge.yaml").write_text(BRIDGE_CONFIG % {"receiver": receiver.base_url})
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MAILBRIDGE_", "OTEL_"))}
        env.update(
            MAILBRIDGE_CONFIG=str(workdir / "bridge.yaml"),
            MAILBRIDGE_SMTP__HOST="127.0.0.1",
            MAILBRIDGE_SMTP__PORT=str(smtp_port),
            MAILBRIDGE_HTTP__HOST="127.0.0.1",
            MAILBRIDGE_HTTP__PORT=str(http_port),
            MAILBRIDGE_LOG__FORMAT="json",
            MAILBRIDGE_SMTP__SHUTDOWN_GRACE_SECONDS="2",  # a bounded stop at teardown
        )
        log = workdir / "bridge.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                [str(binary)], cwd=workdir, env=env, stdout=output, stderr=subprocess.STDOUT
            )
        try:

            def ready() -> bool:
                if process.poll() is not None:
                    pytest.fail(f"mailbridge exited with {process.returncode}:\n{log.read_text()}")
                return bool(http_get(f"http://127.0.0.1:{http_port}/readyz", timeout=2))

            wait_for("mailbridge to be ready", ready, timeout=20)
            replies = {
                "billing@example.com": _send_mail(smtp_port, "billing@example.com"),
                "support@example.com": _send_mail(smtp_port, "support@example.com"),
                "nobody@example.com": _send_mail(smtp_port, "nobody@example.com"),
            }
            tls_reply = _send_mail(smtp_port, "billing@example.com", starttls=True)
            accepted = [*replies.values(), tls_reply].count(250)
            yield BridgeTarget(f"127.0.0.1:{http_port}", smtp_port, accepted, replies)
        finally:
            stop(process)


@pytest.fixture(scope="session")
def metrics_target(real_bridge: BridgeTarget) -> str:
    """``host:port`` of the real bridge's ``/metrics``, after it processed real mail."""
    return real_bridge.address


@pytest.fixture(scope="session")
def metrics_targets(
    metrics_target: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[str]]:
    """The real bridge and ``fake_bridge.py``, two instances of one job as a
    Deployment with two replicas gives. The second is the bridge's own
    ``Metrics`` under a scripted load: it shows what the bridge cannot yet
    (spool mode, an open circuit, dead letters), and with two instances a
    wrong ``on (...)`` join breaks (duplicate series) instead of matching by luck.
    """
    with _fake_bridge(tmp_path_factory.mktemp("target") / "target.log") as second:
        yield [metrics_target, second]


@pytest.fixture(scope="session")
def prometheus(
    prometheus_binary: str, metrics_targets: list[str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    """A real Prometheus on 127.0.0.1 scraping ``metrics_targets`` every second,
    with the chart's alert rules loaded; ready once ``rate()`` has data (~8 s:
    the first scrape comes only after service discovery's 5 s batching)."""
    workdir = tmp_path_factory.mktemp("prometheus")
    config = workdir / "prometheus.yml"
    config.write_text(
        prometheus_config(metrics_targets, [str(RULES_FILE)]),
        encoding="utf-8",
    )
    server = start_prometheus(prometheus_binary, config, workdir)
    try:
        wait_for(
            "two scrapes of the metrics target (rate() needs two samples)",
            lambda: server.query("rate(mailbridge_smtp_messages_accepted_total[1m]) > 0")["data"][
                "result"
            ],
            timeout=25,
        )
        yield server
    finally:
        stop(server.process)
