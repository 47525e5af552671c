"""Admission of SMTP connections: a cap on all sessions and on sessions per client IP.

Pure bookkeeping, shared by every session of one listener; the session asks
:meth:`SessionLimits.admit` once it knows the client's IP (after the PROXY header
when that is enabled) and calls :meth:`release` when the connection ends.
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
