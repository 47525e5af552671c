"""A second, scripted bridge instance: the metrics the real bridge cannot show yet.

The live tests scrape the real bridge after real mail, but a sync-mode bridge
has no spool (so no spool gauges or dead letters) and its circuits stay closed.

This builds the bridge's real :class:`~mailbridge.observability.metrics.Metrics`
(so every name and label is the bridge's own), serves its registry on
127.0.0.1 with ``prometheus_client``, and drives it with a scripted workload
every 0.1 s: sessions, commands, accepted and rejected messages, webhook
attempts with several outcomes for the routes ``billing`` and ``support``,
latencies, spool gauges, dead letters, and the circuit of ``support`` open.

Run: ``python fake_bridge.py``. Prints ``listening 127.0.0.1:PORT`` once ready;
exits when its stdin closes (the test that started it is gone) or on SIGTERM.
"""

from __future__ import annotations

import sys
import threading

from prometheus_client import start_http_server

from mailbridge.observability.metrics import Metrics, status_class

ROUTES = ("billing", "support")
TICK_SECONDS = 0.1


def configure(metrics: Metrics) -> None:
    """What the bridge sets at start: routes and configured limits."""
    metrics.add_routes(ROUTES)
    metrics.limit_sessions.set(1000)
    metrics.limit_sessions_per_ip.set(20)
    metrics.limit_message_size.set(25 * 1024 * 1024)
    metrics.limit_recipients.set(100)
    metrics.limit_spool_size.set(1024**3)
    metrics.limit_spool_messages.set(100_000)
    metrics.set_circuit("support", "open")
    metrics.spool_corrupt.inc()


def tick(metrics: Metrics, n: int) -> None:
    """One step of traffic; ``n`` counts the steps."""
    metrics.sessions.inc()
    for verb in ("EHLO", "MAIL", "RCPT", "DATA", "QUIT"):
        metrics.command(verb)
    if n % 2 == 0:
        metrics.command("STARTTLS")
        metrics.tls_sessions.inc()
    metrics.messages_accepted.inc()
    metrics.message_size.observe(2_000 + 50_000 * (n % 7))
    if n % 3 == 0:
        metrics.reject("unknown_recipient")
    if n % 7 == 0:
        metrics.reject("too_big")
    if n % 5 == 0:
        metrics.connections_refused.labels("max_sessions_per_ip").inc()

    # billing: healthy, with an occasional 503 that is retried
    delivered = n % 4 != 0
    outcome, status = ("delivered", 200) if delivered else ("retry", 503)
    metrics.webhook_attempts.labels("billing", outcome, status_class(status)).inc()
    metrics.webhook_duration.labels("billing").observe(0.02 + 0.01 * (n % 5))
    if delivered:
        metrics.delivery_latency.labels("billing").observe(0.05 + 0.03 * (n % 9))
    # support: its webhook times out, the breaker is open, messages wait
    metrics.webhook_attempts.labels("support", "timeout", "none").inc()
    metrics.webhook_attempts.labels("support", "circuit_open", "none").inc()
    metrics.webhook_duration.labels("support").observe(10)
    if n % 10 == 0:
        metrics.dead_letters.labels("support").inc()

    metrics.sessions_active.set(3 + n % 4)
    metrics.sessions_per_ip_max.set(1 + n % 3)
    metrics.spool_messages.labels("queued").set(5 + n % 3)
    metrics.spool_messages.labels("deferred").set(n)
    metrics.spool_messages.labels("inflight").set(2)
    metrics.spool_messages.labels("dead").set(n // 10)
    metrics.spool_size.set(60_000 * (n + 7))
    metrics.spool_oldest_age.set(n * TICK_SECONDS)


def main() -> None:
    metrics = Metrics()
    configure(metrics)
    server, _thread = start_http_server(0, addr="127.0.0.1", registry=metrics.registry)
    host, port = server.server_address[:2]
    print(f"listening {host}:{port}", flush=True)

    stop = threading.Event()  # set when stdin closes: whoever started us is gone
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    n = 0
    while not stop.wait(TICK_SECONDS):
        n += 1
        tick(metrics, n)
    server.shutdown()


if __name__ == "__main__":
    main()
