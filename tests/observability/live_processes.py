"""Processes for the live observability tests: start, wait for, query and stop them.

Loopback only; every wait has a deadline; :func:`stop` ends one process we
started, by its PID. Fixtures in conftest.py use these.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

#: The scrape job of the metrics targets, and the namespace label a
#: ServiceMonitor scrape would add; the rules and the dashboard group by them.
TARGET_JOB = "mailbridge-demo"
TARGET_NAMESPACE = "observability-test"


def wait_for(what: str, check: Callable[[], T | None], timeout: float, interval: float = 0.2) -> T:
    """Call ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except (OSError, ValueError) as error:
            last_error = error
        if time.monotonic() > deadline:
            pytest.fail(
                f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_error})"
            )
        time.sleep(interval)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(process: subprocess.Popen[Any], timeout: float = 10) -> None:
    """Stop one process we started, by its PID: SIGTERM, then SIGKILL."""
    if process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)


def http_get(url: str, timeout: float = 5) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


@dataclass
class Prometheus:
    """A Prometheus server started by the tests, and its HTTP API."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def api(self, path: str, **params: str) -> dict[str, Any]:
        """GET ``/api/v1/<path>``; the JSON answer, also for 4xx (``status: error``)."""
        query = urllib.parse.urlencode(params)
        try:
            body = http_get(f"{self.url}/api/v1/{path}?{query}", timeout=10)
        except urllib.error.HTTPError as error:
            body = error.read()
        return json.loads(body)

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("query", query=expr)


def prometheus_config(targets: list[str], rule_files: list[str]) -> str:
    """A config scraping ``targets`` as one job, labelled like ServiceMonitor
    scrapes of pods ``mailbridge-demo-0``, ``-1``, ...; 1 s intervals so that
    rate() has data after two scrapes. (JSON is YAML.)"""
    static_configs = [
        {"targets": [target], "labels": {"namespace": TARGET_NAMESPACE, "pod": f"{TARGET_JOB}-{i}"}}
        for i, target in enumerate(targets)
    ]
    return json.dumps(
        {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": rule_files,
            "scrape_configs": [{"job_name": TARGET_JOB, "static_configs": static_configs}],
        },
        indent=2,
    )


def start_prometheus(binary: str, config: Path, workdir: Path) -> Prometheus:
    """Start Prometheus on a free loopback port and wait until it is ready."""
    log = workdir / "prometheus.log"
    for _attempt in range(3):  # the free port can be taken between probe and bind
        port = free_port()
        with log.open("wb") as output:
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--storage.tsdb.retention.time=1h",
                ],
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        server = Prometheus(f"http://127.0.0.1:{port}", process, log)

        def ready_or_exited(server: Prometheus = server) -> bool:
            return server.process.poll() is not None or bool(http_get(f"{server.url}/-/ready"))

        try:
            wait_for("Prometheus to be ready", ready_or_exited, timeout=15)
        except BaseException:
            stop(process)
            raise
        if process.poll() is None:
            return server
        if "address already in use" not in log.read_text():
            break
    pytest.fail(f"prometheus exited with {process.returncode}:\n{log.read_text()[-3000:]}")
