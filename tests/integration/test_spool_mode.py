"""Spool mode end to end: the real bridge (in a thread), real SMTP clients, real receivers.

What is protected: a 250 only once the message is on disk; every route
delivered (and only the failing ones retried) with one stable webhook-id;
outages and open circuits delay, never drop; a full spool answers 452 4.3.1 at
MAIL and DATA, an unwritable one 451 4.3.0 and /readyz says so; what a previous
run left is delivered and damaged files are moved aside; dead letters are
visible and the ``mailbridge spool`` command retries and purges them while the
bridge runs; SIGTERM leaves undelivered mail in the spool for the next start.
"""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mailbridge.delivery import signing
from tests.support.bridge import BridgeThread, route
from tests.support.receiver import ReceiverThread, Reply, unused_port

SECRET = signing.new_secret()
BIN = Path(sys.executable).parent / "mailbridge"
#: Fast retries so outages of a second or two are crossed quickly.
FAST = {
    "retry_initial_seconds": 0.05,
    "retry_max_seconds": 0.3,
    "breaker_failure_threshold": 3,
    "breaker_open_seconds": 0.4,
}


def message(n: int, size: int = 0) -> bytes:
    padding = ("x" * 76 + "\r\n") * (size // 78)
    return f"Subject: message {n}\r\nMessage-ID: <{n}@test>\r\n\r\nbody {n}\r\n{padding}".encode()


def spool_bridge(directory: Path, *routes: dict[str, Any], **settings: Any) -> BridgeThread:
    delivery = {"mode": "spool", **FAST, **settings.pop("delivery", {})}
    spool = {"directory": str(directory), **settings.pop("spool", {})}
    return BridgeThread(routes=list(routes), delivery=delivery, spool=spool, **settings)


def send(port: int, n: int, to: str = "user@a.test", size: int = 0) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        try:
            client.sendmail("sender@x.test", [to], message(n, size))
        except smtplib.SMTPResponseException as error:
            return error.smtp_code, error.smtp_error.decode()
        except smtplib.SMTPRecipientsRefused as error:
            code, text = next(iter(error.recipients.values()))
            return code, text.decode()
    return 250, "ok"


def files(directory: Path, where: str) -> list[str]:
    path = directory / where
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.02)


def readyz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def subjects(rx: ReceiverThread) -> list[str]:
    return sorted(d.json["subject"] for d in rx.deliveries if d.reply.status == 200)


def test_250_means_spooled_and_each_route_gets_one_signed_post_with_the_stable_id(
    tmp_path: Path,
) -> None:
    with ReceiverThread(secrets=[SECRET]) as rx:
        routes = (
            route("a", ["*@a.test"], rx.url, secrets=[SECRET]),
            route("b", ["*@b.test"], rx.url_for("/b"), secrets=[SECRET]),
        )
        with (
            spool_bridge(tmp_path, *routes) as bridge,
            smtplib.SMTP("127.0.0.1", bridge.smtp_port) as client,
        ):
            client.ehlo("client.test")
            client.mail("sender@x.test")
            client.rcpt("one@a.test")
            client.rcpt("two@b.test")
            code, text = client.data(message(1))
            first, second = rx.wait_for(2)
            wait_until(lambda: not files(tmp_path, "queue") and not files(tmp_path, "active"))
            assert 0 == bridge.metric("mailbridge_spool_size_bytes")
    assert 250 == code
    assert text.decode().startswith("2.0.0 Ok: queued as msg_")
    assert {"a", "b"} == {first.json["route"], second.json["route"]}
    assert first.verified and second.verified
    message_id = text.decode().rsplit(" ", 1)[1]
    expected = {f"{message_id}.a", f"{message_id}.b"}
    assert expected == {first.webhook_id, second.webhook_id}
    assert expected == {first.json["id"], second.json["id"]}
    assert first.json["received_at"] == second.json["received_at"]


def test_only_the_failing_route_is_retried(tmp_path: Path) -> None:
    with ReceiverThread() as rx:
        rx.respond(lambda d: 503 if d.path == "/b" and len(rx) < 4 else 200)
        routes = (route("a", ["*@a.test"], rx.url), route("b", ["*@a.test"], rx.url_for("/b")))
        with spool_bridge(tmp_path, *routes) as bridge:
            assert 250 == send(bridge.smtp_port, 1)[0]
            wait_until(lambda: any(d.path == "/b" and d.reply.status == 200 for d in rx.deliveries))
            wait_until(lambda: not files(tmp_path, "queue") and not files(tmp_path, "active"))
    paths = [d.path for d in rx.deliveries]
    assert 1 == paths.count("/hook")
    assert paths.count("/b") >= 2
    assert {"/hook": 1, "/b": 1} == {
        path: len({d.webhook_id for d in rx.deliveries if d.path == path}) for path in paths
    }


def test_an_outage_of_503s_then_refused_connections_delays_but_loses_nothing(
    tmp_path: Path,
) -> None:
    """503s open the circuit; then nothing listens; then the receiver is back on its port."""
    port = unused_port()
    down = ReceiverThread(port=port, default=Reply(503, headers={"Retry-After": "0"}))
    down.start()
    try:
        with spool_bridge(tmp_path, route("a", ["*@a.test"], down.url)) as bridge:
            for n in range(10):
                assert 250 == send(bridge.smtp_port, n)[0]
            wait_until(lambda: bridge.metric(
                "mailbridge_webhook_circuit_state", route="a", state="open") == 1)  # fmt: skip
            down.close()  # now: connection refused
            for n in range(10, 20):
                assert 250 == send(bridge.smtp_port, n)[0]
            time.sleep(1.0)
            assert 20 == len(files(tmp_path, "queue")) + len(files(tmp_path, "active"))
            assert 0 == bridge.metric("mailbridge_dead_letters_total", route="a")
            with ReceiverThread(port=port) as up:
                wait_until(lambda: len(subjects(up)) >= 20, timeout=15)
                wait_until(lambda: not files(tmp_path, "queue") and not files(tmp_path, "active"))
                refused = bridge.metric(
                    "mailbridge_webhook_attempts_total",
                    route="a",
                    outcome="connection_error",
                    status_class="none",
                )
                paused = bridge.metric(
                    "mailbridge_webhook_attempts_total",
                    route="a",
                    outcome="circuit_open",
                    status_class="none",
                )
    finally:
        down.close()
    assert [f"message {n}" for n in sorted(range(20), key=str)] == subjects(up)
    assert refused > 0 and paused >= 0
    first_ids = {d.json["subject"]: d.webhook_id for d in down.deliveries}
    later_ids = {d.json["subject"]: d.webhook_id for d in up.deliveries}
    assert all(later_ids[s] == i for s, i in first_ids.items())  # same id across the outage


def test_a_full_spool_answers_452_at_mail_and_data_and_takes_mail_again_once_drained(
    tmp_path: Path,
) -> None:
    with ReceiverThread(default=503) as rx:
        settings = {"spool": {"max_messages": 3, "max_bytes": 1024 * 1024}}
        with spool_bridge(tmp_path, route("a", ["*@a.test"], rx.url), **settings) as bridge:
            assert 250 == send(bridge.smtp_port, 1, size=500_000)[0]
            assert 250 == send(bridge.smtp_port, 2)[0]
            # Room for a message, not for 600 kB: declared with SIZE, refused at MAIL...
            code, text = send(bridge.smtp_port, 3, size=600_000)
            assert (452, "4.3.1") == (code, text[:5])
            # ... undeclared, refused at the end of DATA.
            with smtplib.SMTP("127.0.0.1", bridge.smtp_port) as client:
                client.ehlo("client.test")
                assert 250 == client.mail("sender@x.test")[0]
                assert 250 == client.rcpt("user@a.test")[0]
                code, reply = client.data(message(3, 600_000))
            assert (452, b"4.3.1") == (code, reply[:5])
            assert 250 == send(bridge.smtp_port, 4)[0]
            code, text = send(bridge.smtp_port, 5)  # 3 messages: refused at MAIL
            assert (452, "4.3.1") == (code, text[:5])
            assert 3 == bridge.metric(
                "mailbridge_smtp_messages_rejected_total", reason="spool_full"
            )
            rx.respond(lambda d: 200)
            wait_until(lambda: len(subjects(rx)) == 3, timeout=15)
            wait_until(lambda: bridge.running.spool is not None and bridge.running.spool.has_room())
            assert 250 == send(bridge.smtp_port, 6)[0]
            wait_until(lambda: len(subjects(rx)) == 4)
    assert ["message 1", "message 2", "message 4", "message 6"] == subjects(rx)


def test_an_unwritable_spool_answers_451_and_is_not_ready_until_it_recovers(
    tmp_path: Path,
) -> None:
    with ReceiverThread() as rx, spool_bridge(tmp_path, route("a", ["*@a.test"], rx.url)) as bridge:
        assert (200, "ready\n") == readyz(bridge.http_port)
        (tmp_path / "tmp").rmdir()
        (tmp_path / "tmp").write_text("a file where the directory was: every write fails")
        code, text = send(bridge.smtp_port, 1)
        assert (451, "4.3.0") == (code, text[:5])
        assert (503, "not ready: spool_writable\n") == readyz(bridge.http_port)
        (tmp_path / "tmp").unlink()
        (tmp_path / "tmp").mkdir()
        assert 250 == send(bridge.smtp_port, 2)[0]
        assert (200, "ready\n") == readyz(bridge.http_port)
        rx.wait_for(1)
    assert ["message 2"] == subjects(rx)


def test_a_previous_runs_spool_is_delivered_and_damaged_files_are_moved_aside(
    tmp_path: Path,
) -> None:
    with ReceiverThread(default=503) as rx:
        with spool_bridge(tmp_path, route("a", ["*@a.test"], rx.url)) as bridge:
            for n in range(3):
                assert 250 == send(bridge.smtp_port, n)[0]
        queued = files(tmp_path, "queue")
        assert 3 == len(queued)
        original = (tmp_path / "queue" / queued[0]).read_bytes()
        (tmp_path / "queue" / "0000000000000aaaaaaaa").write_bytes(original[:-40])  # no end
        flipped = original.replace(b"body 0", b"body X")
        (tmp_path / "queue" / "0000000000000bbbbbbbb").write_bytes(flipped)
        (tmp_path / "tmp" / "half-written").write_bytes(original[:100])
        rx.respond(lambda d: 200)
        with spool_bridge(tmp_path, route("a", ["*@a.test"], rx.url)) as bridge:
            wait_until(lambda: len(subjects(rx)) == 3)
            corrupt = bridge.metric("mailbridge_spool_corrupt_files_total")
    assert ["message 0", "message 1", "message 2"] == subjects(rx)
    assert 2 == corrupt
    assert ["queue-0000000000000aaaaaaaa", "queue-0000000000000bbbbbbbb"] == files(
        tmp_path, "corrupt"
    )
    assert [] == files(tmp_path, "tmp")


def spool_cli(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN), "spool", "--directory", str(directory), *args],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def test_dead_letters_are_kept_listed_retried_and_purged_from_the_command_line(
    tmp_path: Path,
) -> None:
    with (
        ReceiverThread(default=410) as rx,
        spool_bridge(tmp_path, route("a", ["*@a.test"], rx.url)) as bridge,
    ):
        for n in range(3):
            assert 250 == send(bridge.smtp_port, n)[0]
        wait_until(lambda: len(files(tmp_path, "dead")) == 3)
        assert 3 == bridge.metric("mailbridge_dead_letters_total", route="a")
        assert 3 == bridge.metric("mailbridge_spool_messages", state="dead")
        listed = spool_cli(tmp_path, "list", "--state", "dead")
        assert 0 == listed.returncode, listed.stderr
        assert 3 == listed.stdout.count("HTTP 410")
        as_json = [
            json.loads(line) for line in spool_cli(tmp_path, "list", "--json").stdout.splitlines()
        ]
        by_subject = {}
        for item in as_json:
            shown = spool_cli(tmp_path, "show", item["queue_id"], "--raw")
            by_subject[shown.stdout.split("\n", 1)[0].strip()] = item
        first = by_subject["Subject: message 0"]
        second = by_subject["Subject: message 1"]
        assert {"status": "dead", "attempts": 1, "last_error": "HTTP 410"}.items() <= first[
            "routes"
        ]["a"].items()

        rx.respond(lambda d: 200)
        refused = spool_cli(tmp_path, "purge", first["queue_id"][:-2] + "zz")
        assert 1 == refused.returncode and "no such message" in refused.stderr
        retried = spool_cli(tmp_path, "retry", first["webhook_id"])
        assert 0 == retried.returncode, retried.stderr
        assert "will be retried within a second" in retried.stdout
        wait_until(lambda: "message 0" in subjects(rx))
        purged = spool_cli(tmp_path, "purge", second["queue_id"])
        assert 0 == purged.returncode, purged.stderr
        wait_until(lambda: len(files(tmp_path, "dead")) == 1)
        everything = spool_cli(tmp_path, "retry", "--all-dead")
        assert "1 dead letters handed" in everything.stdout
        wait_until(lambda: "message 2" in subjects(rx))
        wait_until(lambda: not any(files(tmp_path, w) for w in ("queue", "active", "dead")))
    assert ["message 0", "message 2"] == subjects(rx)
    ids = {
        d.json["subject"]: {x.webhook_id for x in rx.deliveries if x.json == d.json}
        for d in rx.deliveries
    }
    assert all(1 == len(v) for v in ids.values())


def test_a_deferred_message_can_be_retried_now_and_queued_mail_needs_force_to_purge(
    tmp_path: Path,
) -> None:
    with (
        ReceiverThread(default=Reply(503, headers={"Retry-After": "3600"})) as rx,
        spool_bridge(tmp_path, route("a", ["*@a.test"], rx.url)) as bridge,
    ):
        assert 250 == send(bridge.smtp_port, 1)[0]
        assert 250 == send(bridge.smtp_port, 2)[0]
        wait_until(lambda: bridge.metric("mailbridge_spool_messages", state="deferred") == 2)
        listed = spool_cli(tmp_path, "list", "--json").stdout.splitlines()
        one, two = sorted((json.loads(line) for line in listed), key=lambda i: i["received_at"])
        assert "deferred" == one["state"]
        refused = spool_cli(tmp_path, "purge", two["queue_id"])
        assert 1 == refused.returncode and "--force" in refused.stderr
        assert 0 == spool_cli(tmp_path, "purge", "--force", two["queue_id"]).returncode
        rx.respond(lambda d: 200)
        assert 0 == spool_cli(tmp_path, "retry", one["queue_id"]).returncode
        wait_until(lambda: subjects(rx) == ["message 1"])
        wait_until(lambda: not files(tmp_path, "queue") and not files(tmp_path, "active"))
    assert ["message 1"] == subjects(rx)


def test_shutdown_cuts_slow_attempts_after_the_grace_and_the_next_start_delivers(
    tmp_path: Path,
) -> None:
    with ReceiverThread(default=Reply.slow(10.0)) as slow:
        bridge = spool_bridge(
            tmp_path, route("a", ["*@a.test"], slow.url), spool={"shutdown_grace_seconds": 0.5}
        )
        with bridge:
            assert 250 == send(bridge.smtp_port, 1)[0]
            slow.wait_for(1)
            started = time.monotonic()
            bridge.stop()
            drain_seconds = time.monotonic() - started
        assert 0 == bridge.exit_code
    assert drain_seconds < 5.0  # the attempt (10 s) was cut after the 0.5 s grace
    [left] = files(tmp_path, "queue")
    assert [] == files(tmp_path, "active")
    with ReceiverThread() as fast, spool_bridge(tmp_path, route("a", ["*@a.test"], fast.url)):
        (delivery,) = fast.wait_for(1)
    assert slow.deliveries[0].webhook_id == delivery.webhook_id
    assert left not in files(tmp_path, "queue")


def test_a_second_bridge_on_the_same_spool_refuses_to_start(tmp_path: Path) -> None:
    with ReceiverThread() as rx, spool_bridge(tmp_path, route("a", ["*@a.test"], rx.url)):
        second = spool_bridge(tmp_path, route("a", ["*@a.test"], rx.url))
        with pytest.raises(RuntimeError, match="did not start"):
            second.__enter__()
        second.stop()
        assert 1 == second.exit_code


@pytest.fixture
def spans(span_exporter: Any) -> Any:
    """Spans of this test only (tests/conftest.py's span_exporter)."""
    return span_exporter


def test_a_spooled_delivery_span_is_linked_to_the_message_span(tmp_path: Path, spans: Any) -> None:
    """The trace context saved with the message links each later POST to its message."""
    with ReceiverThread() as rx, spool_bridge(tmp_path, route("a", ["*@a.test"], rx.url)) as b:
        assert 250 == send(b.smtp_port, 1)[0]
        (delivery,) = rx.wait_for(1)
        wait_until(lambda: any(s.name == "POST" for s in spans.get_finished_spans()))
    finished = spans.get_finished_spans()
    message = next(s for s in finished if s.name == "receive message")
    post = next(s for s in finished if s.name == "POST")
    assert post.parent is None or post.parent.span_id != message.context.span_id
    assert [message.context.span_id] == [link.context.span_id for link in post.links]
    assert f"{post.context.span_id:016x}" in delivery.headers["traceparent"]
