"""The SMTP listener: one asyncio server whose connections are :class:`Session`\\ s.

Runs in the application's event loop (no thread), so sessions, delivery and the
HTTP server share one loop. :meth:`Listener.drain`
implements graceful shutdown: stop accepting, let open sessions finish within a
bound, then say ``421 4.7.0`` to the rest and close them. The listener owns the
limits its sessions share: session caps and the DATA memory budget.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time

from mailbridge.config import SmtpSettings
from mailbridge.observability.metrics import Metrics
from mailbridge.smtp import limits
from mailbridge.smtp.handler import Handler
from mailbridge.smtp.limits import SessionLimits
from mailbridge.smtp.session import Session

log = logging.getLogger("mailbridge.smtp")


class Listener:
    def __init__(
        self,
        settings: SmtpSettings,
        handler: Handler,
        metrics: Metrics,
        tls_context: ssl.SSLContext | None,
    ) -> None:
        self.settings = settings
        self.handler = handler
        self.metrics = metrics
        self.tls_context = tls_context
        self.limits = SessionLimits(
            max_sessions=settings.max_sessions, max_sessions_per_ip=settings.max_sessions_per_ip
        )
        #: Shared by all sessions: the DATA bytes held in memory at once.
        self.data_budget = limits.DataBudget(settings.max_data_in_flight_bytes)
        self.sessions: set[Session] = set()
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _new_session(self) -> Session:
        session = Session(
            self.handler,
            settings=self.settings,
            limits=self.limits,
            metrics=self.metrics,
            tls_context=self.tls_context,
            budget=self.data_budget,
            loop=self._loop,
            on_lost=self.sessions.discard,
        )
        self.sessions.add(session)
        return session

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._new_session, host=self.settings.host, port=self.settings.port, reuse_address=True
        )

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def listening(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def drain(self, grace_seconds: float) -> None:
        """Stop accepting; wait up to ``grace_seconds`` for sessions; then close the rest."""
        self.limits.draining = True
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + grace_seconds
        while self.sessions and time.monotonic() < deadline:
            # Sessions between transactions have nothing to lose: close them now.
            for session in list(self.sessions):
                if not session.in_transaction:
                    session.push("421 4.7.0 Shutting down; try again later")
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            session.push("421 4.7.0 Shutting down; try again later")
        if self.sessions:
            log.info("closed %d sessions at shutdown", len(self.sessions))
        await asyncio.sleep(0)
