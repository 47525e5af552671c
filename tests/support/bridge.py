"""Run the real bridge (``mailbridge.app.run``) in a thread for blocking tests.

    with BridgeThread(routes=[...], smtp={"max_recipients": 3}) as bridge:
        smtplib.SMTP("127.0.0.1", bridge.smtp_port)

Ports are ephemeral; settings are built with ``config.from_mapping`` so the
environment of the test process (MAILBRIDGE_*, .env) is not read.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from mailbridge import app, config


def route(name: str, recipients: list[str], url: str, **webhook: Any) -> dict[str, Any]:
    return {"name": name, "recipients": recipients, "webhook": {"url": url, **webhook}}


class BridgeThread:
    def __init__(self, **settings: Any) -> None:
        data: dict[str, Any] = {"log": {"level": "WARNING"}}
        data.update(settings)
        data["smtp"] = {
            "host": "127.0.0.1",
            "port": 0,
            "hostname": "mx.test",
            **data.get("smtp", {}),
        }
        data["http"] = {"host": "127.0.0.1", "port": 0, **data.get("http", {})}
        self.settings = config.from_mapping(data)
        self.running: app.Running | None = None
        self.exit_code: int | None = None
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._main, name="bridge", daemon=True)

    def _main(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self.exit_code = self._loop.run_until_complete(
                app.run(self.settings, started=self._on_start, install_signal_handlers=False)
            )
        finally:
            self._started.set()
            self._loop.close()

    def _on_start(self, running: app.Running) -> None:
        self.running = running
        self._started.set()

    def __enter__(self) -> BridgeThread:
        self._thread.start()
        if not self._started.wait(20) or self.running is None:
            raise RuntimeError("the bridge did not start")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self, timeout: float = 30) -> None:
        if self.running is not None and self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self.running.stop)
        self._thread.join(timeout)

    @property
    def smtp_port(self) -> int:
        assert self.running is not None
        return self.running.smtp_port

    @property
    def http_port(self) -> int:
        assert self.running is not None
        return self.running.http_port

    def metric(self, name: str, **labels: str) -> float:
        assert self.running is not None
        value = self.running.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value
