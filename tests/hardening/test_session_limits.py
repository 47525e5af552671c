"""Per-client caps that an attacker cannot sidestep by changing addresses within a /64."""

from __future__ import annotations

import pytest

from mailbridge.smtp import limits
from tests.hardening.smtp_client import Raw
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
