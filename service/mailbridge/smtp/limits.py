"""Admission of SMTP connections and of the memory their messages take.

Pure bookkeeping, shared by every session of one listener; the session asks
:meth:`SessionLimits.admit` once it knows the client's IP (after the PROXY header
when that is enabled) and calls :meth:`release` when the connection ends.
:class:`DataBudget` caps the DATA bytes all sessions hold in memory at once.
"""

from __future__ import annotations

from collections import Counter


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
        if self._per_ip[ip] >= self.max_sessions_per_ip:
            return "max_sessions_per_ip"
        self._per_ip[ip] += 1
        return None

    def release(self, ip: str) -> None:
        self._per_ip[ip] -= 1
        if self._per_ip[ip] <= 0:
            del self._per_ip[ip]


#: Default process-wide cap on DATA bytes buffered at once (see :class:`DataBudget`).
DEFAULT_MAX_DATA_IN_FLIGHT_BYTES = 128 * 1024 * 1024


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
