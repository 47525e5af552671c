"""The ``mailbridge`` command as a user runs it: a real process, real signals."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mailbridge.delivery import signing
from tests.support.receiver import ReceiverThread, unused_port

BIN = Path(sys.executable).parent / "mailbridge"
SECRET = signing.new_secret()


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAILBRIDGE_", "OTEL_"))}
    env.update(extra)
    return env


def run(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN), *args], cwd=cwd, env=clean_env(**env), capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip


class Process:
    """``mailbridge`` running in the background; stopped by its PID."""

    def __init__(self, cwd: Path, **env: str) -> None:
        self.smtp_port, self.http_port = unused_port(), unused_port()
        env = {
            "MAILBRIDGE_SMTP__PORT": str(self.smtp_port),
            "MAILBRIDGE_HTTP__PORT": str(self.http_port),
            "MAILBRIDGE_LOG__FORMAT": "json",
            **env,
        }
        self.proc = subprocess.Popen(
            [str(BIN)], cwd=cwd, env=clean_env(**env), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while not self.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                out, err = self.proc.communicate()
                raise RuntimeError(f"bridge did not start:\n{out}\n{err}")
            time.sleep(0.1)

    def get(self, path: str) -> tuple[int, str]:
        try:
            url = f"http://127.0.0.1:{self.http_port}{path}"
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def ready(self) -> bool:
        try:
            return self.get("/readyz")[0] == 200
        except OSError:
            return False

    def stop(self) -> tuple[int, str, str]:
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=40)
        return self.proc.returncode, out, err


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


def test_help_of_every_command(workdir: Path) -> None:
    for args in ([], ["run"], ["check-config"], ["send-test"], ["gen-secret"]):
        result = run(*args, "--help", cwd=workdir)
        assert 0 == result.returncode, result.stderr
        assert "usage: mailbridge" in result.stdout


def test_gen_secret_makes_a_usable_secret(workdir: Path) -> None:
    result = run("gen-secret", cwd=workdir)
    assert 0 == result.returncode
    assert 32 == len(signing.decode_secret(result.stdout.strip()))


def test_check_config_prints_effective_settings_with_secrets_redacted(workdir: Path) -> None:
    result = run(
        "check-config", cwd=workdir, MAILBRIDGE_WEBHOOK_URL="https://hooks.example.com/x",
        MAILBRIDGE_TARGET_EMAILS="a@example.com", MAILBRIDGE_WEBHOOK_SECRET=SECRET,
    )  # fmt: skip
    assert 0 == result.returncode, result.stderr
    assert SECRET not in result.stdout
    assert "'**********'" in result.stdout
    assert "https://hooks.example.com/x" in result.stdout


@pytest.mark.parametrize("command", [[], ["check-config"]])
def test_bad_config_exits_2_with_one_clear_message(workdir: Path, command: list[str]) -> None:
    result = run(*command, cwd=workdir, MAILBRIDGE_SMTP__PORT="seventy")
    assert 2 == result.returncode
    assert "invalid configuration" in result.stderr
    assert "smtp.port" in result.stderr
    assert "'seventy'" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreadable_certificate_is_a_config_error(workdir: Path) -> None:
    result = run(
        cwd=workdir, MAILBRIDGE_TLS__CERT_FILE=str(workdir / "missing.crt"),
        MAILBRIDGE_TLS__KEY_FILE=str(workdir / "missing.key"), MAILBRIDGE_SMTP__PORT="0",
        MAILBRIDGE_HTTP__PORT="0",
    )  # fmt: skip
    assert 2 == result.returncode
    assert "tls.cert_file: no such file" in result.stderr


def test_demo_delivers_a_verified_payload_to_console_and_folder(workdir: Path) -> None:
    bridge = Process(workdir)
    try:
        sent = run("send-test", "--port", str(bridge.smtp_port), cwd=workdir)
        assert 0 == sent.returncode, sent.stderr
        assert "250 2.0.0 Ok: delivered as msg_" in sent.stdout
    finally:
        code, out, err = bridge.stop()
    assert 0 == code, err
    assert "swaks --server 127.0.0.1:" in out  # the banner says how to send mail
    assert "Signature:   verified" in out
    assert "Subject:     Hello from mailbridge" in out
    [saved] = (workdir / "mailbridge-inbox").glob("msg_*.json")
    payload = json.loads(saved.read_text())
    assert ("demo", "Hello from mailbridge") == (payload["route"], payload["subject"])
    assert ["test.csv"] == [a["filename"] for a in payload["attachments"]]


def test_demo_refuses_addresses_outside_its_domains(workdir: Path) -> None:
    bridge = Process(workdir)
    try:
        sent = run("send-test", "--port", str(bridge.smtp_port), "--to", "x@gmail.com", cwd=workdir)
    finally:
        bridge.stop()
    assert 1 == sent.returncode
    assert "550 5.1.1" in sent.stderr


def test_health_readiness_and_metrics_endpoints(workdir: Path) -> None:
    with ReceiverThread() as rx:
        bridge = Process(workdir, MAILBRIDGE_WEBHOOK_URL=rx.url, MAILBRIDGE_TARGET_EMAILS="*")
        try:
            assert (200, "ok\n") == bridge.get("/healthz")
            assert (200, "ready\n") == bridge.get("/readyz")
            status, text = bridge.get("/metrics")
            assert 200 == status
            assert 'mailbridge_build_info{python="' in text
            assert "mailbridge_smtp_sessions_limit 1000.0" in text
            assert 'mailbridge_webhook_circuit_state{route="default",state="closed"} 1.0' in text
        finally:
            code, _, err = bridge.stop()
    assert 0 == code, err
    for line in err.splitlines():
        json.loads(line)  # every log line is one JSON object


def test_sigterm_lets_an_open_transaction_finish_then_exits_0(workdir: Path) -> None:
    with ReceiverThread() as rx:
        bridge = Process(workdir, MAILBRIDGE_WEBHOOK_URL=rx.url, MAILBRIDGE_TARGET_EMAILS="*")
        client = smtplib.SMTP("127.0.0.1", bridge.smtp_port, timeout=10)
        client.ehlo("client.test")
        client.mail("a@b.test")
        client.rcpt("x@y.test")
        bridge.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        status, text = bridge.get("/readyz")
        assert (503, "not ready: smtp_listening, not_draining\n") == (status, text)
        with pytest.raises(OSError):
            smtplib.SMTP("127.0.0.1", bridge.smtp_port, timeout=2)
        code, _ = client.data(b"Subject: in flight\r\n\r\nbody\r\n")
        assert 250 == code
        client.close()
        _out, err = bridge.proc.communicate(timeout=40)
    assert 0 == bridge.proc.returncode, err
    assert ["in flight"] == [d.json["subject"] for d in rx.deliveries]
