"""Fixtures for the observability tests: the real promtool and Prometheus binaries,
a process that exports the bridge's metrics, and a Prometheus scraping it.

Everything listens on 127.0.0.1 only, every wait is bounded, and teardown stops
exactly the processes started here, by PID. A missing binary fails the tests
(``scripts/setup`` installs it); it never skips them.
"""

from __future__ import annotations

import contextlib
import select
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_processes import (
    Prometheus,
    http_get,
    prometheus_config,
    start_prometheus,
    stop,
    wait_for,
)
from observability_assets import RULES_FILE

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


@pytest.fixture(scope="session")
def metrics_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``host:port`` of a running process that serves the bridge's ``/metrics``.

    For now: ``fake_bridge.py``, the real :class:`mailbridge.observability.metrics.Metrics`
    driven by a scripted workload. When the bridge can run as a process, this
    fixture is the one place to change: start ``mailbridge`` with
    ``MAILBRIDGE_HTTP__PORT`` and ``MAILBRIDGE_SMTP__PORT`` on loopback, send it
    mail with smtplib, and yield the HTTP address.
    """
    with _fake_bridge(tmp_path_factory.mktemp("target") / "target.log") as address:
        yield address


@pytest.fixture(scope="session")
def metrics_targets(
    metrics_target: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[str]]:
    """Two instances of one job, as a Deployment with two replicas gives: with
    two, a wrong ``on (...)`` join breaks (duplicate series) instead of matching
    by luck."""
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
