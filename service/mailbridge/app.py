"""Wiring and lifecycle: build each stage from its settings, run, shut down gracefully.

Start order: metrics → TLS → HTTP (health, metrics, demo inbox) → webhook
client → (spool mode: lock and recover the spool, start the committer, the
upkeep task and the delivery workers) → pipeline → SMTP listener.

On SIGTERM/SIGINT: stop accepting, mark not ready; at the same time let SMTP
sessions finish within ``smtp.shutdown_grace_seconds`` (closing the rest with
``421 4.7.0``) and, in spool mode, stop taking spooled messages and give webhook
attempts in flight ``spool.shutdown_grace_seconds``. Then the last commits
finish, the spool lock is released, the HTTP client closes; exit 0. Whatever
was not delivered stays in the spool for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from mailbridge import demo, http, routing
from mailbridge.config import Settings
from mailbridge.delivery import breaker, signing, webhook
from mailbridge.delivery.sync import SyncDelivery
from mailbridge.delivery.worker import Worker
from mailbridge.observability import tracing
from mailbridge.observability.metrics import Metrics
from mailbridge.pipeline import SpoolHandler, SpoolPipeline, SyncPipeline, spooled_bodies
from mailbridge.smtp import tls
from mailbridge.smtp.handler import Handler
from mailbridge.smtp.server import Listener
from mailbridge.spool.queue import Spool
from mailbridge.spool.store import SpoolError

log = logging.getLogger("mailbridge")


@dataclass
class Running:
    """What a started bridge exposes to its caller (the CLI, the tests)."""

    smtp_port: int
    http_port: int
    metrics: Metrics
    stop: Callable[[], None]
    #: The spool, in spool mode.
    spool: Spool | None = None


async def run(
    settings: Settings,
    *,
    out: TextIO = sys.stdout,
    started: Callable[[Running], None] | None = None,
    install_signal_handlers: bool = True,
) -> int:
    """Run the bridge until stopped; return the process exit code."""
    stopping = asyncio.Event()
    tracer_provider = tracing.configure()
    metrics = Metrics()
    _publish_limits(metrics, settings)
    tls_context = tls.server_context(settings.tls, settings.smtp.hostname)

    listener: Listener | None = None
    spool: Spool | None = None
    readiness = {
        "smtp_listening": lambda: listener is not None and listener.listening,
        "not_draining": lambda: listener is not None and not listener.limits.draining,
        "spool_writable": lambda: spool is None or spool.writable,
    }
    app = http.make_app(metrics, readiness)
    route_settings = list(settings.routes)
    demo_secret = signing.new_secret() if settings.demo_mode else ""
    if settings.demo_mode:
        demo.add_inbox(app, demo_secret, settings.demo.inbox_dir, out=out)
    http_runner, http_port = await http.start(app, settings.http)
    if settings.demo_mode:
        route_settings = [demo.route(http_port, demo_secret)]

    targets = {route.name: webhook.Target.from_settings(route) for route in route_settings}
    routes = routing.compile_routes({route.name: route.recipients for route in route_settings})
    metrics.add_routes(targets)
    delivery = settings.delivery
    session = webhook.make_session(delivery.max_connections)
    client = webhook.WebhookClient(
        session,
        breakers=breaker.Breakers(
            delivery.breaker_failure_threshold, delivery.breaker_open_seconds
        ),
        permanent_statuses=delivery.permanent_statuses,
        metrics=metrics,
    )
    sync = SyncDelivery(
        client,
        targets,
        attempts=delivery.sync_attempts,
        budget_seconds=delivery.sync_budget_seconds,
        retry_initial_seconds=delivery.retry_initial_seconds,
        retry_max_seconds=delivery.retry_max_seconds,
        metrics=metrics,
    )
    worker: Worker | None = None
    background: list[asyncio.Task[None]] = []
    handler: Handler
    if delivery.mode == "spool":
        spool = Spool(settings.spool, metrics)
        try:
            await spool.open()
        except SpoolError as error:
            await session.close()
            await http_runner.cleanup()
            log.error("cannot open the spool", extra={"error": str(error)})
            print(f"mailbridge: {error}", file=sys.stderr)
            return 1
        worker = Worker(
            spool,
            client,
            targets,
            lambda header, raw, names: spooled_bodies(settings.parsing, header, raw, names),
            workers=settings.spool.delivery_workers,
            retry_initial_seconds=delivery.retry_initial_seconds,
            retry_max_seconds=delivery.retry_max_seconds,
            max_age_seconds=settings.spool.max_age_seconds,
            metrics=metrics,
        )
        worker.start()
        background.append(asyncio.create_task(spool.maintain(), name="spool-upkeep"))
        handler = SpoolHandler(
            settings.smtp, routes, SpoolPipeline(routes, spool), metrics, spool=spool
        )
    else:
        handler = Handler(
            settings.smtp, routes, SyncPipeline(routes, settings.parsing, sync), metrics
        )
    listener = Listener(settings.smtp, handler, metrics, tls_context)
    try:
        await listener.start()
    except OSError as error:
        await _stop_spool(worker, spool, background, 0)
        await session.close()
        await http_runner.cleanup()
        log.error("cannot listen for SMTP", extra={"error": str(error)})
        print(
            f"mailbridge: cannot listen on {settings.smtp.host}:{settings.smtp.port}: "
            f"{error.strerror}",
            file=sys.stderr,
        )
        return 1

    loop = asyncio.get_running_loop()
    if install_signal_handlers:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopping.set)
    log.info(
        "listening",
        extra={
            "smtp": f"{settings.smtp.host}:{listener.port}",
            "http": f"{settings.http.host}:{http_port}",
            "routes": sorted(targets),
            "mode": settings.delivery.mode,
            "demo": settings.demo_mode,
            "starttls": tls_context is not None,
        },
    )
    if settings.demo_mode:
        out.write(
            demo.banner(settings.smtp.host, listener.port, http_port, settings.demo.inbox_dir)
        )
        out.flush()
    if started is not None:
        started(Running(listener.port, http_port, metrics, stopping.set, spool))

    await stopping.wait()
    log.info(
        "shutting down",
        extra={
            "grace_seconds": settings.smtp.shutdown_grace_seconds,
            "delivery_grace_seconds": settings.spool.shutdown_grace_seconds if spool else 0,
        },
    )
    # Sessions finish while deliveries in flight finish; new mail still reaches the spool.
    await asyncio.gather(
        listener.drain(settings.smtp.shutdown_grace_seconds),
        worker.stop(settings.spool.shutdown_grace_seconds) if worker else asyncio.sleep(0),
    )
    await _stop_spool(None, spool, background, 0)
    await session.close()
    await http_runner.cleanup()
    if tracer_provider is not None:
        tracer_provider.shutdown()  # flush the last spans
    if install_signal_handlers:
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)
    log.info("stopped")
    return 0


async def _stop_spool(
    worker: Worker | None,
    spool: Spool | None,
    background: list[asyncio.Task[None]],
    grace_seconds: float,
) -> None:
    if worker is not None:
        await worker.stop(grace_seconds)
    for task in background:
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    if spool is not None:
        await spool.close()


def _publish_limits(metrics: Metrics, settings: Settings) -> None:
    smtp = settings.smtp
    metrics.limit_sessions.set(smtp.max_sessions)
    metrics.limit_sessions_per_ip.set(smtp.max_sessions_per_ip)
    metrics.limit_message_size.set(smtp.max_message_size_bytes)
    metrics.limit_recipients.set(smtp.max_recipients)
    spooling = settings.delivery.mode == "spool"
    metrics.limit_spool_size.set(settings.spool.max_bytes if spooling else 0)
    metrics.limit_spool_messages.set(settings.spool.max_messages if spooling else 0)
