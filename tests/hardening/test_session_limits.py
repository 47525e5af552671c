"""Per-client caps that an attacker cannot sidestep by changing addresses within a /64."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable

import pytest

from mailbridge.smtp import limits
from tests.hardening.smtp_client import Raw, still_serves, transaction
from tests.support.bridge import BridgeThread, route
from tests.support.receiver import ReceiverThread


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("fe80::1%eth0", "fe80::/64"),
        ("not an ip", "not an ip"),
    ],
)
def test_the_per_ip_cap_counts_ipv4_addresses_and_ipv6_slash_64s(ip: str, key: str) -> None:
    assert key == limits.client_key(ip)


def test_addresses_of_one_ipv6_slash_64_share_one_allowance() -> None:
    caps = limits.SessionLimits(max_sessions=100, max_sessions_per_ip=2)
    assert caps.admit("2001:db8::1") is None
    assert caps.admit("2001:db8::2") is None
    assert "max_sessions_per_ip" == caps.admit("2001:db8::3")
    assert caps.admit("2001:db8:0:1::3") is None  # another /64
    caps.release("2001:db8::1")
    assert caps.admit("2001:db8::99") is None
    for ip in ("2001:db8::2", "2001:db8:0:1::3", "2001:db8::99"):
        caps.release(ip)
    assert 0 == caps.active


def test_a_client_rotating_ipv6_addresses_behind_a_proxy_is_capped(
    receiver: ReceiverThread,
) -> None:
    with BridgeThread(
        routes=[route("r", ["*"], receiver.url)],
        smtp={"proxy_protocol": True, "max_sessions_per_ip": 2},
    ) as bridge:
        held: list[Raw] = []
        try:
            greetings = []
            for source in ("2001:db8::1", "2001:db8::2", "2001:db8::3", "2001:db8:0:1::1"):
                raw = Raw(bridge.smtp_port, greet=False)
                held.append(raw)
                raw.send(f"PROXY TCP6 {source} 2001:db8::25 40000 25\r\n".encode())
                greetings.append(raw.reply()[:9])
            assert ["220 mx.te", "220 mx.te", "421 4.7.0", "220 mx.te"] == greetings
        finally:
            for raw in held:
                raw.close()


def test_every_way_of_abandoning_a_session_gives_its_slot_back(
    receiver: ReceiverThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Silent, half-closed, mid-DATA, mid-handshake, after TLS, not reading, refused:
    with every client still holding its socket open, the bridge frees every slot."""
    with BridgeThread(
        routes=[route("r", ["*"], receiver.url)],
        smtp={
            "command_timeout_seconds": 1.0,
            "data_timeout_seconds": 1.5,
            "session_timeout_seconds": 2.0,
            "max_sessions": 40,
        },
    ) as bridge:

        def silent(raw: Raw) -> None:
            pass

        def half_close(raw: Raw) -> None:
            raw.command("EHLO client.test")
            raw.sock.shutdown(socket.SHUT_WR)

        def mid_data(raw: Raw) -> None:
            transaction(raw, rcpt="x@y.test")
            raw.command("DATA")
            raw.send(b"Subject: never ends\r\n\r\n")

        def mid_handshake(raw: Raw) -> None:
            raw.command("EHLO client.test")
            raw.command("STARTTLS")
            raw.send(b"\x16\x03\x01\x00")

        def tls_then_silent(raw: Raw) -> None:
            raw.command("EHLO client.test")
            raw.starttls()

        def not_reading(raw: Raw) -> None:
            raw.sock.settimeout(0.5)
            with contextlib.suppress(OSError):
                for _ in range(200):
                    raw.sock.sendall(b"HELP\r\n" * 2000)

        def refused(raw: Raw) -> None:
            raw.command("EHLO client.test")
            raw.command("MAIL FROM:<a@b.test>")
            raw.send(b"".join(b"RCPT TO:<u%d@evil.test%%x>\r\n" % n for n in range(30)))

        behaviours: list[Callable[[Raw], None]] = [
            silent, half_close, mid_data, mid_handshake, tls_then_silent, not_reading, refused
        ]  # fmt: skip
        opened: list[Raw] = []
        lock = threading.Lock()

        def run(behaviour: Callable[[Raw], None]) -> None:
            raw = Raw(bridge.smtp_port)
            with lock:
                opened.append(raw)
            with contextlib.suppress(OSError):
                behaviour(raw)

        threads = [threading.Thread(target=run, args=(b,)) for b in behaviours * 3]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            assert len(opened) == len(threads)
            # Every client still holds its socket: only the bridge can end these sessions.
            deadline = time.monotonic() + 10
            while bridge.metric("mailbridge_smtp_sessions_active") > 0:
                active = bridge.metric("mailbridge_smtp_sessions_active")
                assert time.monotonic() < deadline, f"{active} sessions never ended"
                time.sleep(0.05)
        finally:
            for raw in opened:
                raw.close()
        still_serves(bridge.smtp_port)
