"""The PROXY header parser: v1 and v2 headers, what they carry, and what is refused."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from mailbridge.smtp import proxy


def v2(command: int, family: int, block: bytes, extra: bytes = b"") -> bytes:
    body = block + extra
    return proxy.V2_SIGNATURE + struct.pack("!BBH", 0x20 | command, family, len(body)) + body


def test_a_v1_header_gives_the_client_address_and_leaves_what_follows() -> None:
    wire = b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 25\r\nEHLO x\r\n"
    assert (proxy.ProxyData("203.0.113.7", 40000), 42) == proxy.parse(wire)
    assert b"EHLO x\r\n" == wire[42:]


def test_a_v1_ipv6_header_and_an_unknown_one() -> None:
    found = proxy.parse(b"PROXY TCP6 2001:db8::7 2001:db8::25 1 25\r\n")
    assert found is not None and "2001:db8::7" == found[0].src_addr
    assert proxy.ProxyData(None) == proxy.parse(b"PROXY UNKNOWN\r\n")[0]  # type: ignore[index]


@pytest.mark.parametrize("size", [1, 5, 6, 20, 41])
def test_a_header_cut_short_asks_for_more(size: int) -> None:
    assert proxy.parse(b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 25\r\n"[:size]) is None


@pytest.mark.parametrize(
    "wire",
    [
        b"EHLO client.test\r\n",
        b"PROXY TCP4 not-an-ip 10.0.0.1 1 2\r\n",
        b"PROXY TCP4 2001:db8::1 10.0.0.1 1 2\r\n",  # family mismatch
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
        b"PROXY " + b"A" * 300 + b"\r\n",
        b"PROXY " + b"A" * 200,  # no line end within the longest header
        b"PROXX",
        b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x0c" + b"\x00" * 12,  # version 3
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x04" + b"\x00" * 4,  # shorter than IPv4 addresses
        b"\r\n\r\nX",
    ],
)
def test_what_is_not_a_valid_header_is_refused(wire: bytes) -> None:
    with pytest.raises(proxy.Invalid):
        proxy.parse(wire)


def test_v2_headers_for_ipv4_ipv6_and_local() -> None:
    ipv4 = ipaddress.IPv4Address("203.0.113.9").packed + bytes(4) + struct.pack("!HH", 4000, 25)
    wire = v2(1, 0x11, ipv4, extra=b"\x03\x00\x04abcd") + b"EHLO"
    data, length = proxy.parse(wire)  # type: ignore[misc]
    assert (proxy.ProxyData("203.0.113.9", 4000), b"EHLO") == (data, wire[length:])
    ipv6 = ipaddress.IPv6Address("2001:db8::9").packed + bytes(16) + struct.pack("!HH", 5, 25)
    assert "2001:db8::9" == proxy.parse(v2(1, 0x21, ipv6))[0].src_addr  # type: ignore[index]
    assert proxy.ProxyData(None) == proxy.parse(v2(0, 0x00, b""))[0]  # type: ignore[index]
    assert proxy.parse(v2(1, 0x11, ipv4)[:20]) is None  # the address block has not arrived
