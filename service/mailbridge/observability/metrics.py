"""Every Prometheus metric of the bridge, in one place.

Names follow ``mailbridge_<subsystem>_<name>_<unit>``; counters end in ``_total``;
units are base units (seconds, bytes). Label values come from closed sets known
at start (route names from the settings, outcome classes, reject reasons,
command verbs); an address, id or URL is never a label.

:class:`Metrics` owns its registry, so tests build a fresh one and the app builds
exactly one at start. Nothing here does I/O; ``http.py`` serves the registry.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)

from mailbridge import __version__

#: SMTP verbs counted by name; anything else is counted as ``OTHER``.
COMMANDS = (
    "HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "STARTTLS",
    "HELP", "EXPN", "AUTH", "OTHER",
)  # fmt: skip
#: Why a message (or one of its recipients) was refused.
REJECT_REASONS = (
    "unknown_recipient",  # 550 5.1.1 no route wants it
    "relay_denied",  # 550 5.7.1 an address that tries to relay
    "too_big",  # 552 5.3.4 SIZE or DATA over the limit
    "too_many_recipients",  # 452 4.5.3
    "tls_required",  # 530 5.7.0
    "rate_limited",  # 421 4.7.0 unknown-recipient cap
    "policy",  # other 5xx policy decisions
    "bad_syntax",  # 5.5.x syntax / sequence errors
    "temp_failure",  # 451 4.3.0 webhook not reached (sync) or internal error
    "permanent_failure",  # 554 5.6.0 webhook refused permanently (sync)
    "spool_full",  # 452 4.3.1
    "busy",  # 452 4.3.1 the process-wide DATA memory budget is spent
)
#: Why a connection was closed at once with 421.
REFUSE_REASONS = ("max_sessions", "max_sessions_per_ip", "untrusted_proxy", "shutting_down")
#: Result class of one webhook attempt.
OUTCOMES = ("delivered", "retry", "permanent", "timeout", "connection_error", "circuit_open")
STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx", "none")
CIRCUIT_STATES = ("closed", "open", "half_open")
SPOOL_STATES = ("queued", "deferred", "inflight", "dead")

SIZE_BUCKETS = tuple(float(2**n) for n in range(10, 27, 2))  # 1 KiB .. 64 MiB
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


def status_class(status: int | None) -> str:
    """``2xx``..``5xx`` for an HTTP status, ``none`` when there was no response."""
    if status is None or not 200 <= status <= 599:
        return "none"
    return f"{status // 100}xx"


class Metrics:
    """The bridge's metrics, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # process_* (memory, CPU, open files, start time) and python_info, the standard way.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.build_info = Info("mailbridge_build", "Version of the running bridge.", registry=r)
        self.build_info.info({"version": __version__, "python": platform.python_version()})

        # --- SMTP ingress ---
        self.sessions = Counter("mailbridge_smtp_sessions", "SMTP sessions opened.", registry=r)
        self.sessions_active = Gauge(
            "mailbridge_smtp_sessions_active", "SMTP sessions open now.", registry=r
        )
        self.sessions_per_ip_max = Gauge(
            "mailbridge_smtp_sessions_per_ip_max",
            "Open sessions of the client IP that has the most right now.",
            registry=r,
        )
        self.connections_refused = Counter(
            "mailbridge_smtp_connections_refused",
            "Connections closed at once with 421, by reason.",
            ["reason"],
            registry=r,
        )
        self.tls_sessions = Counter(
            "mailbridge_smtp_tls_sessions", "Sessions that completed STARTTLS.", registry=r
        )
        self.commands = Counter(
            "mailbridge_smtp_commands", "SMTP commands received, by verb.", ["command"], registry=r
        )
        self.messages_accepted = Counter(
            "mailbridge_smtp_messages_accepted",
            "Messages answered 250 at end of DATA.",
            registry=r,
        )
        self.messages_rejected = Counter(
            "mailbridge_smtp_messages_rejected",
            "Messages or recipients refused, by reason.",
            ["reason"],
            registry=r,
        )
        self.message_size = Histogram(
            "mailbridge_smtp_message_size_bytes",
            "Size of messages received (DATA bytes).",
            buckets=SIZE_BUCKETS,
            registry=r,
        )

        # --- delivery ---
        self.webhook_attempts = Counter(
            "mailbridge_webhook_attempts",
            "Webhook HTTP attempts, by route, outcome and status class.",
            ["route", "outcome", "status_class"],
            registry=r,
        )
        self.webhook_duration = Histogram(
            "mailbridge_webhook_request_duration_seconds",
            "Duration of one webhook HTTP attempt.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.delivery_latency = Histogram(
            "mailbridge_delivery_latency_seconds",
            "From the end of DATA to the webhook's 2xx.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.circuit_state = Gauge(
            "mailbridge_webhook_circuit_state",
            "1 for the current circuit-breaker state of a route's destination.",
            ["route", "state"],
            registry=r,
        )
        self.dead_letters = Counter(
            "mailbridge_dead_letters",
            "Deliveries given up and kept as dead letters, by route.",
            ["route"],
            registry=r,
        )

        # --- spool ---
        self.spool_messages = Gauge(
            "mailbridge_spool_messages", "Messages in the spool, by state.", ["state"], registry=r
        )
        self.spool_size = Gauge(
            "mailbridge_spool_size_bytes", "Bytes held in the spool.", registry=r
        )
        self.spool_oldest_age = Gauge(
            "mailbridge_spool_oldest_message_age_seconds",
            "Age of the oldest message waiting in the spool (0 when empty).",
            registry=r,
        )
        self.spool_corrupt = Counter(
            "mailbridge_spool_corrupt_files",
            "Spool files found damaged and moved aside.",
            registry=r,
        )

        # --- configured limits, so alerts can compare usage with them ---
        self.limit_sessions = Gauge(
            "mailbridge_smtp_sessions_limit", "Configured max concurrent sessions.", registry=r
        )
        self.limit_sessions_per_ip = Gauge(
            "mailbridge_smtp_sessions_per_ip_limit",
            "Configured max concurrent sessions per client IP.",
            registry=r,
        )
        self.limit_message_size = Gauge(
            "mailbridge_smtp_message_size_limit_bytes", "Configured max message size.", registry=r
        )
        self.limit_recipients = Gauge(
            "mailbridge_smtp_recipients_limit", "Configured max recipients per message.", registry=r
        )
        self.limit_spool_size = Gauge(
            "mailbridge_spool_size_limit_bytes",
            "Configured max spool size (0 = no spool).",
            registry=r,
        )
        self.limit_spool_messages = Gauge(
            "mailbridge_spool_messages_limit",
            "Configured max spooled messages (0 = no spool).",
            registry=r,
        )

        # Labelled children per label values, so the hot paths skip .labels().
        self._attempts: dict[tuple[str, str, str], Counter] = {}
        self._durations: dict[str, Histogram] = {}
        self._latencies: dict[str, Histogram] = {}
        self._commands: dict[str, Counter] = {}
        for command in COMMANDS:
            self._commands[command] = self.commands.labels(command)
        for reason in REJECT_REASONS:
            self.messages_rejected.labels(reason)
        for reason in REFUSE_REASONS:
            self.connections_refused.labels(reason)
        for state in SPOOL_STATES:
            self.spool_messages.labels(state)

    def add_routes(self, routes: Iterable[str]) -> None:
        """Create every labelled series of each route, so dashboards show zeros, not gaps."""
        for route in routes:
            for outcome in OUTCOMES:
                for cls in STATUS_CLASSES:
                    self.webhook_attempts.labels(route, outcome, cls)
            self.webhook_duration.labels(route)
            self.delivery_latency.labels(route)
            self.dead_letters.labels(route)
            self.set_circuit(route, "closed")

    def set_circuit(self, route: str, state: str) -> None:
        for candidate in CIRCUIT_STATES:
            self.circuit_state.labels(route, candidate).set(1 if candidate == state else 0)

    def command(self, verb: str) -> None:
        child = self._commands.get(verb)
        if child is None:
            child = self.commands.labels(verb if verb in COMMANDS else "OTHER")
        child.inc()

    def webhook_attempt(self, route: str, outcome: str, status_class: str) -> None:
        """Count one webhook attempt (``webhook_attempts``)."""
        key = (route, outcome, status_class)
        child = self._attempts.get(key)
        if child is None:
            child = self._attempts[key] = self.webhook_attempts.labels(*key)
        child.inc()

    def observe_webhook_duration(self, route: str, seconds: float) -> None:
        """One attempt's duration (``webhook_duration``)."""
        child = self._durations.get(route)
        if child is None:
            child = self._durations[route] = self.webhook_duration.labels(route)
        child.observe(seconds)

    def observe_delivery_latency(self, route: str, seconds: float) -> None:
        """Acceptance to 2xx for one route (``delivery_latency``)."""
        child = self._latencies.get(route)
        if child is None:
            child = self._latencies[route] = self.delivery_latency.labels(route)
        child.observe(seconds)

    def reject(self, reason: str) -> None:
        self.messages_rejected.labels(reason).inc()
