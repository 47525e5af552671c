"""The operator's own Prometheus metrics, in one registry, and the server that exposes them.

Names follow the bridge's rules (``mailbridge_operator_<name>_<unit>``, ``_total``
for counters, closed label sets created at start, never a resource name as a
label): reconciliations by outcome, their duration, and the children the
operator created, updated or deleted by kind. ``serve(host, port)`` starts an
aiohttp server with ``/metrics``; the CLI runs it next to kopf's ``/healthz``.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

OUTCOMES = ("settled", "waiting", "invalid", "failed")
KINDS = (
    "ConfigMap",
    "Service",
    "Deployment",
    "StatefulSet",
    "ServiceMonitor",
    "PodDisruptionBudget",
)
ACTIONS = ("Created", "Updated", "Deleted")

REGISTRY = CollectorRegistry(auto_describe=True)
RECONCILIATIONS = Counter(
    "mailbridge_operator_reconciliations_total",
    "Reconciliations of a MailBridge, by outcome (settled: ready and rolled out; waiting: "
    "pods not ready yet; invalid: the spec was refused; failed: the API refused a change).",
    ["outcome"],
    registry=REGISTRY,
)
RECONCILE_DURATION = Histogram(
    "mailbridge_operator_reconcile_duration_seconds",
    "Time one reconciliation took (API calls included).",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
CHANGES = Counter(
    "mailbridge_operator_child_changes_total",
    "Children the operator created, updated (drift or new spec) or deleted, by kind.",
    ["kind", "action"],
    registry=REGISTRY,
)
for _outcome in OUTCOMES:
    RECONCILIATIONS.labels(_outcome)
for _kind in KINDS:
    for _action in ACTIONS:
        CHANGES.labels(_kind, _action)


def observe(outcome: str, seconds: float, changes: tuple[tuple[str, str], ...]) -> None:
    """Record one reconciliation: its outcome, duration and the (kind, action) it made."""
    RECONCILIATIONS.labels(outcome).inc()
    RECONCILE_DURATION.observe(seconds)
    for kind, action in changes:
        if kind in KINDS and action in ACTIONS:
            CHANGES.labels(kind, action).inc()


async def _metrics(_: web.Request) -> web.Response:
    return web.Response(
        body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


async def serve(host: str, port: int) -> web.AppRunner:
    """Serve ``/metrics``; the caller keeps the runner and calls ``cleanup()`` to stop."""
    app = web.Application()
    app.router.add_get("/metrics", _metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
