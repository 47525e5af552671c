"""Secrets never leave the bridge: not in logs (at DEBUG), replies, metrics, spans or check-config.

Each test plants recognisable credentials (signing secrets inline and from a
file, a password and a token in the webhook URL, an Authorization header) and
looks for every one of them in everything the bridge emits during real runs
that succeed, fail and time out.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import smtplib
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import generate_latest

from mailbridge.delivery import signing
from tests.hardening.smtp_client import message
from tests.support.bridge import BridgeThread
from tests.support.receiver import ReceiverThread, Reply, unused_port

INLINE_SECRET = signing.new_secret()
FILE_SECRET = signing.new_secret()
URL_PASSWORD = "URLPASS-s3cr3t"
URL_TOKEN = "QUERYTOKEN-s3cr3t"
HEADER_TOKEN = "HEADERTOKEN-s3cr3t"
API_KEY = "APIKEY-s3cr3t"


def _forms(secret: str) -> list[str]:
    """A signing secret as written, its base64 key, and the key in hex and urlsafe base64."""
    encoded = secret.removeprefix("whsec_")
    key = base64.b64decode(encoded)
    return [secret, encoded, key.hex(), base64.urlsafe_b64encode(key).decode().rstrip("=")]


SIGNING_FORMS = _forms(INLINE_SECRET) + _forms(FILE_SECRET)
CREDENTIALS = [URL_PASSWORD, URL_TOKEN, HEADER_TOKEN, API_KEY]


def leaks(text: str, secrets: list[str]) -> list[str]:
    return [secret for secret in secrets if secret in text]


def _routes(receiver: ReceiverThread, secret_file: Path) -> list[dict[str, Any]]:
    base = receiver.base_url.removeprefix("http://")
    return [
        {
            "name": "userinfo",
            "recipients": ["*@a.test"],
            "webhook": {
                "url": f"http://hookuser:{URL_PASSWORD}@{base}/a?token={URL_TOKEN}",
                "secrets": [INLINE_SECRET],
                "secret_files": [str(secret_file)],
                "timeout_seconds": 1,
            },
        },
        {
            "name": "header",
            "recipients": ["*@b.test"],
            "webhook": {
                "url": f"http://{base}/b",
                "secrets": [INLINE_SECRET],
                "headers": {"Authorization": f"Bearer {HEADER_TOKEN}", "X-Api-Key": API_KEY},
                "timeout_seconds": 1,
            },
        },
        {
            "name": "closed",
            "recipients": ["*@c.test"],
            "webhook": {
                "url": f"http://hookuser:{URL_PASSWORD}@127.0.0.1:{unused_port()}/c?t={URL_TOKEN}",
                "secrets": [INLINE_SECRET],
            },
        },
    ]


def _send_all(port: int) -> list[str]:
    """A run that succeeds, is refused (401, 500), times out and cannot connect; the replies."""
    replies = []
    for to in ("x@a.test", "x@b.test", "x@a.test", "x@b.test", "x@a.test", "x@c.test"):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("client.test")
            client.mail("alice@sender.test")
            client.rcpt(to)
            try:
                code, text = client.data(message("secret test", to=to))
            except smtplib.SMTPResponseException as error:
                code, text = error.smtp_code, error.smtp_error
            replies.append(f"{code} {text.decode()}")
    return replies


def _script(receiver: ReceiverThread) -> None:
    receiver.respond_with(200, 200, 401, 500, Reply.slow(3))


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "signing-secret"
    path.write_text(FILE_SECRET + "\n")
    return path


def test_a_real_process_logging_at_debug_leaks_no_secret(
    tmp_path: Path, secret_file: Path, receiver: ReceiverThread
) -> None:
    config = tmp_path / "mailbridge.yaml"
    config.write_text(yaml.safe_dump({"routes": _routes(receiver, secret_file)}))
    smtp_port, http_port = unused_port(), unused_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAILBRIDGE_", "OTEL_"))}
    env.update(
        MAILBRIDGE_CONFIG=str(config),
        MAILBRIDGE_SMTP__PORT=str(smtp_port),
        MAILBRIDGE_HTTP__PORT=str(http_port),
        MAILBRIDGE_LOG__LEVEL="DEBUG",
        MAILBRIDGE_LOG__FORMAT="json",
        MAILBRIDGE_DELIVERY__SYNC_ATTEMPTS="1",
        PYTHONASYNCIODEBUG="1",
    )
    _script(receiver)
    bridge = subprocess.Popen(
        [str(Path(sys.executable).parent / "mailbridge")],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with smtplib.SMTP("127.0.0.1", smtp_port, timeout=5) as probe:
                    probe.noop()
                break
            except OSError:
                assert time.monotonic() < deadline and bridge.poll() is None
                time.sleep(0.1)
        replies = _send_all(smtp_port)
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as page:
            metrics = page.read().decode()
    finally:
        bridge.send_signal(signal.SIGTERM)
        out, err = bridge.communicate(timeout=30)
    assert 0 == bridge.returncode, err[-2000:]
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(r["level"] == "debug" for r in records), "the run did not log at DEBUG"
    assert ["250", "250", "451", "451", "451", "451"] == [r[:3] for r in replies], replies
    everything = "\n".join([out, err, metrics, *replies])
    assert [] == leaks(everything, SIGNING_FORMS + CREDENTIALS)


@pytest.fixture
def spans(span_exporter: InMemorySpanExporter) -> InMemorySpanExporter:
    """Spans of this test only (tests/conftest.py's span_exporter)."""
    return span_exporter


def test_spans_logs_and_metrics_of_a_running_bridge_carry_no_secret(
    secret_file: Path,
    receiver: ReceiverThread,
    spans: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(1)  # every logger, every level
    spans.clear()
    _script(receiver)
    with BridgeThread(
        routes=_routes(receiver, secret_file), delivery={"sync_attempts": 1}
    ) as bridge:
        replies = _send_all(bridge.smtp_port)
        assert bridge.running is not None
        metrics = generate_latest(bridge.running.metrics.registry).decode()
    finished = spans.get_finished_spans()
    assert {"smtp session", "receive message", "POST"} <= {span.name for span in finished}
    span_text = json.dumps(
        [
            {
                "name": span.name,
                "attributes": dict(span.attributes or {}),
                "status": span.status.description,
                "events": [(e.name, dict(e.attributes or {})) for e in span.events],
                "links": [dict(link.attributes or {}) for link in span.links],
            }
            for span in finished
        ],
        default=str,
    )
    log_text = "\n".join(f"{r.name} {r.getMessage()} {r.__dict__}" for r in caplog.records)
    # Delivery happened, so the secrets were used; none of them was shown.
    assert 2 <= len(receiver.deliveries)
    assert [] == leaks(span_text, SIGNING_FORMS + CREDENTIALS)
    assert [] == leaks(log_text, SIGNING_FORMS + CREDENTIALS)
    assert [] == leaks(metrics, SIGNING_FORMS + CREDENTIALS)
    assert [] == leaks("\n".join(replies), SIGNING_FORMS + CREDENTIALS)


def _check_config(tmp_path: Path, document: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "check.yaml"
    config.write_text(yaml.safe_dump(document))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAILBRIDGE_", "OTEL_"))}
    env["MAILBRIDGE_CONFIG"] = str(config)
    return subprocess.run(
        [str(Path(sys.executable).parent / "mailbridge"), "check-config"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_config_never_prints_a_signing_secret(
    tmp_path: Path, secret_file: Path, receiver: ReceiverThread
) -> None:
    shown = _check_config(tmp_path, {"routes": _routes(receiver, secret_file)})
    assert 0 == shown.returncode, shown.stderr
    assert "userinfo" in shown.stdout
    assert [] == leaks(shown.stdout + shown.stderr, SIGNING_FORMS)
    broken = _routes(receiver, secret_file)
    broken[0]["webhook"]["secrets"] = [INLINE_SECRET[:-4] + "!!!!"]
    refused = _check_config(tmp_path, {"routes": broken})
    assert 2 == refused.returncode
    assert "secrets" in refused.stderr
    assert [] == leaks(refused.stdout + refused.stderr, [INLINE_SECRET[:-4], *SIGNING_FORMS])


def test_check_config_and_config_errors_never_print_url_or_header_credentials(
    tmp_path: Path, secret_file: Path, receiver: ReceiverThread
) -> None:
    shown = _check_config(tmp_path, {"routes": _routes(receiver, secret_file)})
    assert 0 == shown.returncode, shown.stderr
    broken = _routes(receiver, secret_file)
    broken[0]["webhook"]["url"] = f"http://u:{URL_PASSWORD}@127.0.0.1:99999/a?token={URL_TOKEN}"
    refused = _check_config(tmp_path, {"routes": broken})
    assert 2 == refused.returncode
    assert [] == leaks(shown.stdout + refused.stderr, CREDENTIALS)
