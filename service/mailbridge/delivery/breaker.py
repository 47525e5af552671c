"""Circuit breakers: pause delivery to a destination that keeps failing.

One :class:`Breaker` per destination (``scheme://host:port``), kept by
:class:`Breakers`. Pure state machine on a clock the caller passes as ``now``
(use a monotonic clock)::

    closed --threshold consecutive failures--> open
    open   --open_seconds later, allow()-----> half_open (exactly one trial in flight)
    half_open --trial succeeds--> closed      half_open --trial fails--> open

The breaker never drops anything: a caller that is not allowed treats it as a
temporary failure (sync: ``451``; spool: the message waits). Every request that
``allow`` let through must end in :meth:`Breaker.record_success`,
:meth:`Breaker.record_failure` or, when it was abandoned without an answer
(cancelled), :meth:`Breaker.release`; otherwise a half-open breaker would wait
for its trial forever.

Results of requests that were already in flight when the circuit opened are
late news: a late failure while open is ignored (it does not extend the pause);
a late success closes the circuit (the destination answered, it is up).

Settings read by the caller: ``delivery.breaker_failure_threshold``,
``delivery.breaker_open_seconds``.
"""

from __future__ import annotations

from typing import Literal

State = Literal["closed", "open", "half_open"]


class Breaker:
    """The circuit of one destination."""

    def __init__(self, threshold: int, open_seconds: float) -> None:
        if threshold < 1:
            raise ValueError(f"threshold must be at least 1, got {threshold}")
        if open_seconds < 0:
            raise ValueError(f"open_seconds must not be negative, got {open_seconds}")
        self.threshold = threshold
        self.open_seconds = open_seconds
        self._state: State = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._trial_in_flight = False

    def __repr__(self) -> str:
        return f"<Breaker {self._state} failures={self._failures}/{self.threshold}>"

    @property
    def state(self) -> State:
        """The state as of the last call (an open circuit turns half-open in :meth:`allow`)."""
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def state_at(self, now: float) -> State:
        """The state at time ``now``: an open circuit whose pause is over reads half-open."""
        if self._state == "open" and now >= self._opened_at + self.open_seconds:
            return "half_open"
        return self._state

    def retry_at(self) -> float | None:
        """When an open circuit lets its trial through; ``None`` unless open."""
        return self._opened_at + self.open_seconds if self._state == "open" else None

    def allow(self, now: float) -> bool:
        """May a request go to the destination now? ``True`` takes the half-open trial."""
        if self._state == "closed":
            return True
        if self._state == "open":
            if now < self._opened_at + self.open_seconds:
                return False
            self._state = "half_open"
            self._trial_in_flight = False
        if self._trial_in_flight:
            return False
        self._trial_in_flight = True
        return True

    def record_success(self, now: float) -> None:
        """The destination answered (2xx, or a permanent 4xx: it is up)."""
        self._state = "closed"
        self._failures = 0
        self._trial_in_flight = False

    def record_failure(self, now: float) -> None:
        """The destination failed (timeout, connection error, 5xx, 429, ...)."""
        if self._state == "open":
            return  # late news from a request sent before the circuit opened
        self._failures += 1
        if self._state == "half_open" or self._failures >= self.threshold:
            self._open(now)

    def release(self, now: float) -> None:
        """A request let through ended without an answer (cancelled): free the trial slot."""
        if self._state == "half_open":
            self._trial_in_flight = False

    def _open(self, now: float) -> None:
        self._state = "open"
        self._opened_at = now
        self._trial_in_flight = False


class Breakers:
    """One :class:`Breaker` per destination key (``scheme://host:port``), made on first use."""

    def __init__(self, threshold: int, open_seconds: float) -> None:
        Breaker(threshold, open_seconds)  # validate once, early
        self.threshold = threshold
        self.open_seconds = open_seconds
        self._breakers: dict[str, Breaker] = {}

    def get(self, destination: str) -> Breaker:
        breaker = self._breakers.get(destination)
        if breaker is None:
            breaker = self._breakers[destination] = Breaker(self.threshold, self.open_seconds)
        return breaker

    __getitem__ = get

    def states(self, now: float) -> dict[str, State]:
        """Every known destination's state at ``now`` (for /readyz and debugging)."""
        return {key: breaker.state_at(now) for key, breaker in self._breakers.items()}

    def __len__(self) -> int:
        return len(self._breakers)
