"""STARTTLS under attack: injected plaintext, nested TLS, garbage handshakes."""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time

import pytest

from tests.hardening.smtp_client import Raw, client_tls, still_serves
from tests.support.bridge import BridgeThread, route
from tests.support.receiver import ReceiverThread


def test_commands_pipelined_after_starttls_in_the_same_packet_are_discarded(
    bridge: BridgeThread, receiver: ReceiverThread
) -> None:
    """CVE-2011-0411 style injection: plaintext after STARTTLS must never run inside TLS."""
    with Raw(bridge.smtp_port) as raw:
        raw.command("EHLO client.test")
        raw.send(
            b"STARTTLS\r\nMAIL FROM:<inj@evil.test>\r\nRCPT TO:<inj@example.com>\r\n"
            b"DATA\r\nSubject: injected\r\n\r\nx\r\n.\r\n"
        )
        assert raw.reply().startswith("220 2.0.0")
        tls = client_tls().wrap_socket(raw.sock, server_hostname="localhost")
        reader = tls.makefile("rb")
        # Had MAIL been kept, RCPT would be accepted; it must say "need MAIL".
        tls.sendall(b"RCPT TO:<user@example.com>\r\n")
        assert reader.readline().startswith(b"503 5.5.1")
        tls.sendall(b"QUIT\r\n")
        assert reader.readline().startswith(b"221 ")
        reader.close()
        tls.close()
    still_serves(bridge.smtp_port)
    assert ["still serving"] == [d.json["subject"] for d in receiver.wait_for(1)]


def test_a_command_sent_with_the_clients_tls_finished_message_is_answered(
    bridge: BridgeThread,
) -> None:
    """TLS 1.3 lets a client send EHLO in the same packet as its Finished message: that
    is TLS data, not injected plaintext, and must be answered (aiosmtplib does this)."""
    context = client_tls()
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    with Raw(bridge.smtp_port) as raw:
        raw.command("EHLO client.test")
        assert raw.command("STARTTLS").startswith("220 2.0.0")
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                raw.sock.sendall(outgoing.read())
                incoming.write(raw.sock.recv(65536))
        tls.write(b"EHLO client.test\r\n")
        raw.sock.sendall(outgoing.read())  # Finished and EHLO in one packet
        replies = b""
        while not replies.endswith(b"250 HELP\r\n"):
            with contextlib.suppress(ssl.SSLWantReadError):
                replies += tls.read(65536)
                continue
            chunk = raw.sock.recv(65536)
            assert chunk, f"connection closed after {replies!r}"
            incoming.write(chunk)
    assert replies.startswith(b"250-")
    assert b"STARTTLS" not in replies


def test_a_second_starttls_inside_tls_is_refused_and_the_session_goes_on(
    bridge: BridgeThread,
) -> None:
    with Raw(bridge.smtp_port) as raw:
        raw.command("EHLO client.test")
        raw.starttls()
        ehlo = raw.command("EHLO client.test")
        assert "STARTTLS" not in ehlo
        assert raw.command("STARTTLS").startswith("503 5.5.1")
        assert raw.command("NOOP").startswith("250 2.0.0")
    still_serves(bridge.smtp_port)


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"\x16\x03\x01\x00\x05hello", id="truncated-client-hello"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", id="http"),
        pytest.param(b"\x00" * 4096, id="zeros"),
        pytest.param(b"\x16\x03\x00" + b"\xff" * 600, id="sslv3-junk"),
        pytest.param(b"", id="eof"),
    ],
)
def test_garbage_tls_handshakes_close_quietly_without_an_internal_error(
    bridge: BridgeThread, garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailbridge")
    with Raw(bridge.smtp_port) as raw:
        raw.command("EHLO client.test")
        assert raw.command("STARTTLS").startswith("220 2.0.0")
        if garbage:
            raw.send(garbage)
        else:
            raw.sock.shutdown(socket.SHUT_WR)
        assert raw.closed()
    still_serves(bridge.smtp_port)
    assert [] == [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    # A client's broken handshake is not a refused message.
    assert 0 == bridge.metric("mailbridge_smtp_messages_rejected_total", reason="temp_failure")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_an_sslv3_or_tls10_client_is_refused_and_tls12_works(bridge: BridgeThread) -> None:
    old = client_tls()
    old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    with contextlib.suppress(ssl.SSLError):  # an OpenSSL without the old ciphers
        old.set_ciphers("ALL:@SECLEVEL=0")
    with Raw(bridge.smtp_port) as raw:
        raw.command("EHLO client.test")
        assert raw.command("STARTTLS").startswith("220 ")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            old.wrap_socket(raw.sock, server_hostname="localhost")
    modern = client_tls()
    modern.maximum_version = ssl.TLSVersion.TLSv1_2
    with Raw(bridge.smtp_port) as raw:
        raw.command("EHLO client.test")
        raw.starttls(modern)
        assert "TLSv1.2" == raw.sock.version()  # type: ignore[attr-defined]
        assert raw.command("NOOP").startswith("250 ")
    still_serves(bridge.smtp_port)


def test_starttls_is_not_offered_when_tls_is_disabled(receiver: ReceiverThread) -> None:
    with BridgeThread(routes=[route("r", ["*"], receiver.url)], tls={"enabled": False}) as bridge:
        with Raw(bridge.smtp_port) as raw:
            assert "STARTTLS" not in raw.command("EHLO client.test")
            assert raw.command("STARTTLS")[:3] in ("454", "502")
            assert raw.command("NOOP").startswith("250 ")
        still_serves(bridge.smtp_port)


@pytest.mark.parametrize("sent", [b"", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"])
def test_a_stalled_tls_handshake_is_dropped_by_the_command_timeout(
    receiver: ReceiverThread, sent: bytes
) -> None:
    """STARTTLS, then nothing (or half a ClientHello): the handshake must not wait for ever."""
    with BridgeThread(
        routes=[route("r", ["*"], receiver.url)], smtp={"command_timeout_seconds": 1.0}
    ) as bridge:
        with Raw(bridge.smtp_port) as raw:
            raw.command("EHLO client.test")
            assert raw.command("STARTTLS").startswith("220 ")
            raw.send(sent)
            started = time.monotonic()
            assert raw.closed()
            assert time.monotonic() - started < 8
        deadline = time.monotonic() + 5
        while bridge.metric("mailbridge_smtp_sessions_active") > 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        still_serves(bridge.smtp_port)
