"""The HTTP side door: ``/healthz`` (alive), ``/readyz`` (taking mail), ``/metrics``.

``/readyz`` answers 200 only while every check the caller passes holds (the app
passes: the SMTP listener is serving, the bridge is not draining, and in spool
mode the spool is writable); each failing check is named in the body. Extra routes (the
demo inbox) can be added before start. Reads the ``http`` settings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mailbridge.config import HttpSettings
from mailbridge.observability.metrics import Metrics

#: A named readiness check: True when fine.
Checks = Mapping[str, Callable[[], bool]]


def make_app(metrics: Metrics, readiness: Checks) -> web.Application:
    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        failing = [name for name, check in readiness.items() if not check()]
        if failing:
            return web.Response(status=503, text="not ready: " + ", ".join(failing) + "\n")
        return web.Response(text="ready\n")

    async def metrics_page(request: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    return app


async def start(app: web.Application, settings: HttpSettings) -> tuple[web.AppRunner, int]:
    """Serve ``app``; return the runner (for cleanup) and the bound port."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
    await site.start()
    server = site._server  # aiohttp exposes the bound socket only here
    assert server is not None and server.sockets  # type: ignore[attr-defined]
    return runner, int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
