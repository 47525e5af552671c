"""The PROXY protocol header (HAProxy's v1 text and v2 binary forms), parsed from bytes.

A load balancer in front of the bridge sends this header first so the real client
address survives. :func:`parse` is pure: it takes what has arrived so far and says
whether more is needed, the header is invalid, or what it carries and how long it
was (the bytes after it are the client's SMTP). Trusting the peer that sent it is
the handler's decision, not this module's.

Known limits: TLVs in v2 are skipped; AF_UNIX addresses count as "no address"
(the proxy itself is then the client).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
#: The longest v1 header, CRLF included (the specification's figure).
V1_MAX_BYTES = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER_BYTES = 16
#: Sizes of the address block for each v2 family (high nibble of byte 13).
_V2_ADDRESS_BYTES = {0x1: 12, 0x2: 36, 0x3: 216}


@dataclass(frozen=True, slots=True)
class ProxyData:
    """What a valid header carries: the client's address, or ``None`` (LOCAL/UNKNOWN)."""

    src_addr: str | None
    src_port: int | None = None


class Invalid(ValueError):
    """The bytes are not a PROXY header we accept."""


def parse(buffer: bytes | bytearray) -> tuple[ProxyData, int] | None:
    """``(data, header_length)`` for a complete header, ``None`` if more bytes are needed.

    Raises :class:`Invalid` as soon as the bytes cannot start a valid header.
    """
    size = len(buffer)
    if buffer[:1] == b"P" or not size:
        if buffer[: len(V1_PREFIX)] != V1_PREFIX[: min(size, len(V1_PREFIX))]:
            raise Invalid("not a PROXY header")
        return _parse_v1(buffer)
    if buffer[: len(V2_SIGNATURE)] != V2_SIGNATURE[: min(size, len(V2_SIGNATURE))]:
        raise Invalid("not a PROXY header")
    return _parse_v2(buffer)


def _parse_v1(buffer: bytes | bytearray) -> tuple[ProxyData, int] | None:
    end = buffer.find(b"\r\n", 0, V1_MAX_BYTES)
    if end == -1:
        if len(buffer) >= V1_MAX_BYTES:
            raise Invalid("PROXY v1 header too long")
        return None
    try:
        fields = bytes(buffer[:end]).decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise Invalid("PROXY v1 header not ASCII") from None
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        return ProxyData(None), end + 2
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise Invalid("malformed PROXY v1 header")
    _, family, source, destination, source_port, destination_port = fields
    version = 4 if family == "TCP4" else 6
    try:
        addresses = [ipaddress.ip_address(text) for text in (source, destination)]
    except ValueError:
        raise Invalid("bad address in PROXY v1 header") from None
    if any(address.version != version for address in addresses):
        raise Invalid("address family mismatch in PROXY v1 header")
    ports = [_port(text) for text in (source_port, destination_port)]
    return ProxyData(str(addresses[0]), ports[0]), end + 2


def _port(text: str) -> int:
    if not text.isdigit() or len(text) > 5 or int(text) > 65535:
        raise Invalid("bad port in PROXY v1 header")
    return int(text)


def _parse_v2(buffer: bytes | bytearray) -> tuple[ProxyData, int] | None:
    if len(buffer) < V2_HEADER_BYTES:
        return None
    version_command, family_protocol, length = struct.unpack_from("!BBH", buffer, 12)
    if version_command >> 4 != 2 or version_command & 0xF not in (0, 1):
        raise Invalid("bad PROXY v2 version or command")
    total = V2_HEADER_BYTES + length
    family = family_protocol >> 4
    needed = _V2_ADDRESS_BYTES.get(family, 0)
    if family > 0x3 or family_protocol & 0xF > 0x2 or length < needed:
        raise Invalid("bad PROXY v2 family or length")
    if len(buffer) < total:
        return None
    if version_command & 0xF == 0 or family in (0x0, 0x3):
        return ProxyData(None), total  # LOCAL, UNSPEC or a UNIX socket: no client address
    block = bytes(buffer[V2_HEADER_BYTES:total])
    if family == 0x1:
        source = ipaddress.IPv4Address(block[:4])
        (port,) = struct.unpack_from("!H", block, 8)
    else:
        source = ipaddress.IPv6Address(block[:16])  # type: ignore[assignment]
        (port,) = struct.unpack_from("!H", block, 32)
    return ProxyData(str(source), port), total
