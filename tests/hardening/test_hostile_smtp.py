"""Hostile clients on the SMTP path: smuggling, over-long lines, slow and vanishing clients.

After each attack the bridge must still deliver a normal message.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator

import pytest

from tests.hardening.conftest import SECRET, SMTP_LIMITS
from tests.hardening.smtp_client import Raw, still_serves, transaction
from tests.support.bridge import BridgeThread, route
from tests.support.receiver import ReceiverThread

#: End-of-data look-alikes: none of these may end a message (only <CRLF>.<CRLF> does).
LOOK_ALIKES = [
    pytest.param(b"\n.\n", id="LF.LF"),
    pytest.param(b"\r.\r", id="CR.CR"),
    pytest.param(b"\r\n.\n", id="CRLF.LF"),
    pytest.param(b"\n.\r\n", id="LF.CRLF"),
    pytest.param(b"\r.\r\n", id="CR.CRLF"),
    pytest.param(b"\r\n.\r", id="CRLF.CR"),
    pytest.param(b"\n\r\n.\r\r\n", id="LF-CRLF.CR-CRLF"),
    pytest.param(b"\r\n.\x00\r\n", id="CRLF.NUL-CRLF"),
    pytest.param(b"\r\n .\r\n", id="CRLF-SP.CRLF"),
]


@pytest.mark.parametrize("look_alike", LOOK_ALIKES)
def test_smtp_smuggling_look_alikes_never_end_the_message(
    bridge: BridgeThread, receiver: ReceiverThread, look_alike: bytes
) -> None:
    smuggled = (
        b"MAIL FROM:<smuggler@evil.test>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
        b"From: ceo@example.com\r\nSubject: smuggled\r\n\r\nwire money"
    )
    with Raw(bridge.smtp_port) as raw:
        transaction(raw)
        assert raw.command("DATA").startswith("354")
        raw.send(b"Subject: carrier\r\n\r\nhello" + look_alike + smuggled + look_alike)
        raw.send(b"\r\n.\r\n")
        reply = raw.reply()
        # The one and only reply to everything sent: then the next command's reply.
        assert reply.startswith(("250 2.0.0", "500 5.5.2")), reply
        assert raw.command("NOOP").startswith("250 2.0.0 OK")
    still_serves(bridge.smtp_port)
    deliveries = receiver.wait_for(2 if reply.startswith("250") else 1)
    subjects = [d.json["subject"] for d in deliveries]
    assert "smuggled" not in subjects
    assert ["victim@example.com"] not in [d.json["recipients"] for d in deliveries]
    if reply.startswith("250"):
        assert "carrier" == subjects[0]
        assert "wire money" in deliveries[0].json["body"]
    assert len(receiver.deliveries) == len(deliveries)


def test_a_pipelined_burst_after_the_end_of_data_is_read_as_commands_in_order(
    bridge: BridgeThread, receiver: ReceiverThread
) -> None:
    with Raw(bridge.smtp_port) as raw:
        transaction(raw)
        raw.command("DATA")
        raw.send(
            b"Subject: first\r\n\r\n..leading dot\r\n.\r\n"
            b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<second@example.com>\r\nDATA\r\n"
        )
        assert [r[:3] for r in (raw.reply(), raw.reply(), raw.reply(), raw.reply())] == [
            "250",
            "250",
            "250",
            "354",
        ]
        raw.send(b"Subject: second\r\n\r\n.\r\n")
        assert raw.reply().startswith("250")
    first, second = receiver.wait_for(2)
    assert ("first", "second") == (first.json["subject"], second.json["subject"])
    assert ".leading dot" in first.json["body"]


@pytest.mark.parametrize("size", [600, 5000, 70_000, 300_000])
def test_over_long_command_lines_are_refused_and_the_session_goes_on(
    bridge: BridgeThread, size: int
) -> None:
    with Raw(bridge.smtp_port) as raw:
        raw.command("EHLO client.test")
        reply = raw.command(b"MAIL FROM:<" + b"a" * size + b"@sender.test>")
        assert reply.startswith("500 5.5.2"), reply
        reply = raw.command(b"NOOP " + b"n" * size)
        assert reply[:3] in ("250", "500"), reply
        assert raw.command("MAIL FROM:<alice@sender.test>").startswith("250")
    still_serves(bridge.smtp_port)


def test_over_long_body_lines_are_refused_with_500_and_nothing_is_delivered(
    bridge: BridgeThread, receiver: ReceiverThread
) -> None:
    limit = SMTP_LIMITS["max_line_length_bytes"]
    with Raw(bridge.smtp_port) as raw:
        transaction(raw)
        raw.command("DATA")
        raw.send(b"Subject: long\r\n\r\n" + b"x" * (limit + 1) + b"\r\n.\r\n")
        assert raw.reply().startswith("500 5.5.2")
        assert raw.command("NOOP").startswith("250")
        # A bare-LF "line" counts as part of one long line too (no CRLF inside).
        transaction(raw)
        raw.command("DATA")
        raw.send(b"Subject: lf\r\n\r\n" + b"y\n" * limit + b"\r\n.\r\n")
        assert raw.reply().startswith("500 5.5.2")
    still_serves(bridge.smtp_port)
    assert ["still serving"] == [d.json["subject"] for d in receiver.wait_for(1)]


def test_an_oversized_message_is_discarded_as_it_arrives_and_refused_with_552(
    bridge: BridgeThread, receiver: ReceiverThread
) -> None:
    with Raw(bridge.smtp_port) as raw:
        transaction(raw)
        raw.command("DATA")
        line = b"z" * 98 + b"\r\n"
        for _ in range(40):  # 40 x 100 KiB: far over the 64 KiB limit
            raw.send(line * 1024)
        raw.send(b".\r\n")
        assert raw.reply().startswith("552 5.3.4")
        assert raw.command("NOOP").startswith("250")
    still_serves(bridge.smtp_port)


@pytest.fixture
def impatient(receiver: ReceiverThread, monkeypatch: pytest.MonkeyPatch) -> Iterator[BridgeThread]:
    with BridgeThread(
        routes=[route("r", ["*"], receiver.url, secrets=[SECRET])],
        smtp={
            "command_timeout_seconds": 1.0,
            "data_timeout_seconds": 1.5,
            "session_timeout_seconds": 2.0,
        },
    ) as running:
        yield running


def _trickle(raw: Raw, data: bytes, *, every: float, max_seconds: float) -> bool:
    """Send ``data`` one byte at a time; whether the server closed before the end."""
    deadline = time.monotonic() + max_seconds
    for byte in data:
        if time.monotonic() > deadline:
            return False
        try:
            raw.send(bytes([byte]))
        except OSError:
            return True
        time.sleep(every)
    return False


def test_a_client_trickling_one_byte_at_a_time_is_closed_by_the_command_timeout(
    impatient: BridgeThread,
) -> None:
    with Raw(impatient.smtp_port) as raw:
        started = time.monotonic()
        raw.send(b"EH")
        assert raw.closed()
        assert time.monotonic() - started < 5


def test_a_client_trickling_valid_commands_is_closed_by_the_session_deadline(
    impatient: BridgeThread,
) -> None:
    """Each NOOP completes within the command timeout, yet the session must end."""
    with Raw(impatient.smtp_port, timeout=0.05) as raw:
        closed = _trickle(raw, b"NOOP\r\n" * 30, every=0.1, max_seconds=10)
        raw.sock.settimeout(5)
        assert closed or raw.closed()
    still_serves(impatient.smtp_port)


def test_a_client_trickling_its_message_is_closed_by_the_data_timeout_and_nothing_delivered(
    impatient: BridgeThread, receiver: ReceiverThread
) -> None:
    with Raw(impatient.smtp_port) as raw:
        transaction(raw)
        assert raw.command("DATA").startswith("354")
        raw.sock.settimeout(0.05)
        closed = _trickle(raw, b"Subject: slow\r\n\r\n" + b"s" * 200, every=0.05, max_seconds=8)
        raw.sock.settimeout(5)
        assert closed or raw.closed()
    still_serves(impatient.smtp_port)
    assert ["still serving"] == [d.json["subject"] for d in receiver.wait_for(1)]


def test_a_session_that_keeps_delivering_is_not_cut_by_the_session_deadline(
    impatient: BridgeThread, receiver: ReceiverThread
) -> None:
    with Raw(impatient.smtp_port) as raw:
        raw.command("EHLO client.test")
        for n in range(4):  # ~0.9 s apart: 3.6 s in all, past the 2 s deadline
            raw.command("MAIL FROM:<alice@sender.test>")
            raw.command("RCPT TO:<user@example.com>")
            raw.command("DATA")
            raw.send(b"Subject: keep %d\r\n\r\nhi\r\n.\r\n" % n)
            assert raw.reply().startswith("250")
            time.sleep(0.9)
        assert raw.command("NOOP").startswith("250")
    assert 4 == len(receiver.wait_for(4))


@pytest.mark.parametrize(
    "partial",
    [
        pytest.param(b"Subject: half\r\n\r\nthis never ends", id="mid-line"),
        pytest.param(b"Subject: half\r\n\r\nalmost\r\n.", id="before-final-crlf"),
        pytest.param(b"Subject: half\r\n\r\nalmost\r\n.\r", id="before-final-lf"),
        pytest.param(b"", id="right-after-354"),
    ],
)
@pytest.mark.parametrize("how", ["close", "reset", "half-close"])
def test_a_client_vanishing_mid_data_delivers_nothing(
    bridge: BridgeThread, receiver: ReceiverThread, partial: bytes, how: str
) -> None:
    raw = Raw(bridge.smtp_port)
    transaction(raw)
    assert raw.command("DATA").startswith("354")
    if partial:
        raw.send(partial)
    if how == "reset":
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    elif how == "half-close":
        raw.sock.shutdown(socket.SHUT_WR)
        assert raw.closed()
    raw.close()
    still_serves(bridge.smtp_port)
    assert ["still serving"] == [d.json["subject"] for d in receiver.wait_for(1)]
    time.sleep(0.1)
    assert 1 == len(receiver.deliveries)


def test_bogus_and_binary_commands_are_refused_then_the_session_is_closed(
    bridge: BridgeThread,
) -> None:
    with Raw(bridge.smtp_port) as raw:
        replies = [raw.command(c) for c in (b"\x16\x03\x01\x02\x00", b"GET / HTTP/1.1", b"")]
        assert all(r[:3] == "500" for r in replies), replies
        for n in range(6):
            try:
                raw.command(b"XBOGUS%d" % n)
            except ConnectionError:
                break
        assert raw.closed()
    still_serves(bridge.smtp_port)


def test_a_client_cannot_put_control_bytes_into_a_reply_line(bridge: BridgeThread) -> None:
    """aiosmtpd echoes an unknown verb; a CR or an escape in it must not reach the client."""
    with Raw(bridge.smtp_port) as raw:
        raw.send(b"\x1b[2J\rFAKE\r\n")
        line = raw.file.readline()
        assert line.startswith(b"500 5.5.2 ")
        assert not any(byte < 0x20 for byte in line[:-2]), line
        raw.send(b"Y" * 500 + b"\r\n")
        assert len(raw.file.readline()) <= 512
        assert raw.command("EHLO").startswith("501 5.5.")
    still_serves(bridge.smtp_port)


def test_an_http_request_to_the_smtp_port_is_refused_and_closed(bridge: BridgeThread) -> None:
    with Raw(bridge.smtp_port) as raw:
        raw.send(b"POST /hook HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\r\n" * 2)
        assert raw.closed()
    still_serves(bridge.smtp_port)


def test_many_sequential_sessions_leave_nothing_behind(
    strict_bridge: BridgeThread, receiver: ReceiverThread
) -> None:
    for _ in range(50):
        with Raw(strict_bridge.smtp_port) as raw:
            raw.command("EHLO client.test")
            raw.command("MAIL FROM:<a@sender.test>")
            raw.send(b"RCPT TO:<nobody@example.com>\r\n")
    deadline = time.monotonic() + 10
    while strict_bridge.metric("mailbridge_smtp_sessions_active") > 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    still_serves(strict_bridge.smtp_port, rcpt="billing@example.com")


def test_a_client_that_pipelines_without_reading_replies_is_dropped_at_the_deadline(
    impatient: BridgeThread,
) -> None:
    """Found while testing: each command re-armed the timer at the deadline (so it never
    fired), a burst never yielded to the loop, and close() waited for the client to
    read. Now the slot is freed while the client still holds its socket unread."""
    with socket.socket() as sock:
        # A small receive window: the bridge's replies back up quickly.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(0.5)
        sock.connect(("127.0.0.1", impatient.smtp_port))
        burst = b"HELP\r\n" * 10_000  # short commands, long replies
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            try:
                sock.sendall(burst)
            except OSError:  # TimeoutError: the server stopped reading (back-pressure)
                break
        # Not reading, not closing: the bridge must let go by itself.
        deadline = time.monotonic() + 15
        while impatient.metric("mailbridge_smtp_sessions_active") > 0:
            assert time.monotonic() < deadline, "the session outlived its deadline"
            time.sleep(0.05)
        with Raw(impatient.smtp_port) as other:  # the loop was not starved meanwhile
            assert other.command("NOOP").startswith("250")
    still_serves(impatient.smtp_port)


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(b"PROXY TCP4 not-an-ip 10.0.0.1 1 2\r\n", id="v1-garbage"),
        pytest.param(b"PROXY " + b"A" * 300 + b"\r\n", id="v1-overlong"),
        pytest.param(b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff" + b"\x00" * 64, id="v2-bad-length"),
        pytest.param(b"EHLO client.test\r\n", id="no-header"),
    ],
)
def test_bad_proxy_headers_are_refused_and_the_listener_goes_on(
    receiver: ReceiverThread, header: bytes
) -> None:
    with BridgeThread(
        routes=[route("r", ["*"], receiver.url)],
        smtp={"proxy_protocol": True, "proxy_timeout_seconds": 1},
    ) as bridge:
        with Raw(bridge.smtp_port, greet=False) as raw:
            raw.send(header)
            assert raw.closed()
        with Raw(bridge.smtp_port, greet=False) as raw:
            raw.send(b"PROXY TCP4 203.0.113.9 10.0.0.1 40000 25\r\n")
            assert raw.reply().startswith("220 ")
            assert raw.command("EHLO client.test").startswith("250")
        assert 0 == bridge.metric("mailbridge_smtp_messages_rejected_total", reason="temp_failure")


def test_a_half_closed_pipelined_session_is_answered_in_full_then_closed(
    bridge: BridgeThread, receiver: ReceiverThread
) -> None:
    """A client that sends everything, then shuts its sending side, gets every reply:
    more commands than one event-loop turn handles, a message, what follows it."""
    with socket.create_connection(("127.0.0.1", bridge.smtp_port), timeout=10) as sock:
        sock.sendall(
            b"EHLO client.test\r\n"
            + b"NOOP\r\n" * 40
            + b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n"
            + b"Subject: half-closed\r\n\r\nhi\r\n.\r\nNOOP\r\nQUIT\r\n"
        )
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    codes = [line[:3] for line in received.decode().split("\r\n") if line[3:4] == " "]
    assert ["220", "250", *["250"] * 40, "250", "250", "354", "250", "250", "221"] == codes
    assert "half-closed" == receiver.wait_for(1)[0].json["subject"]
