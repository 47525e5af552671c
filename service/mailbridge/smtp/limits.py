"""Admission of SMTP connections and of the memory their messages take.

Pure bookkeeping, shared by every session of one listener; the session asks
:meth:`SessionLimits.admit` once it knows the client's IP (after the PROXY header
when that is enabled) and calls :meth:`release` when the connection ends.
IPv6 clients are counted per /64 (:func:`client_key`). :class:`DataBudget` caps
the DATA bytes all sessions hold in memory at once.
"""

from __future__ import annotations

import ipaddress
from collections import Counter

#: IPv6 clients are counted per /64: one host usually holds a whole /64, so
#: counting single addresses would let it open any number of sessions.
IPV6_PREFIX_BITS = 64


def client_key(ip: str) -> str:
    """What the per-IP cap counts: the IPv4 address, or the IPv6 /64 (an IPv4-mapped
    IPv6 address counts as its IPv4 address); unparsable text as itself."""
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, IPV6_PREFIX_BITS), strict=False))
    return str(address)


class SessionLimits:
    def __init__(self, *, max_sessions: int, max_sessions_per_ip: int) -> None:
        self.max_sessions = max_sessions
        self.max_sessions_per_ip = max_sessions_per_ip
        self.draining = False
        self._per_ip: Counter[str] = Counter()

    @property
    def active(self) -> int:
        return self._per_ip.total()

    @property
    def busiest_ip_sessions(self) -> int:
        """Open sessions of the client IP that has the most (no IP is exposed)."""
        return max(self._per_ip.values(), default=0)

    def admit(self, ip: str) -> str | None:
        """Count a new session from ``ip``; or return why it is refused (a metrics reason)."""
        if self.draining:
            return "shutting_down"
        if self.active >= self.max_sessions:
            return "max_sessions"
        key = client_key(ip)
        if self._per_ip[key] >= self.max_sessions_per_ip:
            return "max_sessions_per_ip"
        self._per_ip[key] += 1
        return None

    def release(self, ip: str) -> None:
        key = client_key(ip)
        self._per_ip[key] -= 1
        if self._per_ip[key] <= 0:
            del self._per_ip[key]


class DataBudget:
    """A process-wide cap on the DATA bytes buffered by all sessions at once.

    Each session buffers its message in memory while it arrives and while it is
    parsed and delivered. Without a shared cap, 200 clients sending 25 MiB each
    would make the bridge hold 5 GiB (several times that while parsing). A session
    takes a :class:`Reservation` and grows it as its buffer grows; when the budget
    is spent the message is refused with ``452 4.3.1`` (the sender retries later)
    instead of being buffered. Single event loop: no locking.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.in_flight = 0

    @property
    def available(self) -> int:
        return self.max_bytes - self.in_flight

    def reservation(self) -> Reservation:
        return Reservation(self)


class Reservation:
    """One session's share of a :class:`DataBudget`; released when its message is done."""

    def __init__(self, budget: DataBudget) -> None:
        self._budget = budget
        self.held = 0

    def ensure(self, total_bytes: int) -> bool:
        """Hold at least ``total_bytes`` in all; ``False`` (holding what it had) if it cannot."""
        more = total_bytes - self.held
        if more <= 0:
            return True
        if more > self._budget.available:
            return False
        self._budget.in_flight += more
        self.held = total_bytes
        return True

    def release(self) -> None:
        self._budget.in_flight -= self.held
        self.held = 0
