"""A real webhook receiver for integration tests.

An aiohttp server on ``127.0.0.1`` (ephemeral port) that accepts any method on
any path, checks every request's Standard Webhooks signature with the
independent ``standardwebhooks`` package (when given secrets), records each
request as a :class:`Delivery`, and answers as scripted::

    async with WebhookReceiver(secrets=[secret]) as rx:
        rx.respond_with(503, Reply(429, headers={"Retry-After": "1"}), 200)
        ...  # POST to rx.url
        first, second, third = await rx.wait_for(3)
        assert first.verified and first.json["id"] == first.webhook_id

Replies come from, in order: the queue filled by :meth:`respond_with` (ints are
statuses), else the callable given to :meth:`respond` (``Delivery -> Reply |
None``), else ``default`` (``200``). A :class:`Reply` may delay, add headers
such as ``Retry-After``, or drop the connection without answering
(``Reply.drop()``). With ``reject_unverified=True`` a request whose signature
does not verify is answered ``401`` whatever the script says (it still counts).

Blocking tests (``smtplib``) use :class:`ReceiverThread`: the same receiver on
its own event loop in a daemon thread, with the same recording API and a
blocking ``wait_for``::

    with ReceiverThread(secrets=[secret]) as rx:
        smtp.sendmail(...)
        (delivery,) = rx.wait_for(1, timeout=10)

Recording is thread-safe. Times are ``time.monotonic()`` of this process, so a
test can compare them with its own clock readings.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from standardwebhooks.webhooks import Webhook

__all__ = ["Delivery", "ReceiverThread", "Reply", "WebhookReceiver", "unused_port"]


@dataclass(frozen=True)
class Reply:
    """How the receiver answers one request."""

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | str = b""
    delay_seconds: float = 0.0
    #: Drop the connection (after the delay) instead of answering.
    close: bool = False

    @classmethod
    def drop(cls, delay_seconds: float = 0.0) -> Reply:
        """Close the connection without sending a response."""
        return cls(close=True, delay_seconds=delay_seconds)

    @classmethod
    def slow(cls, delay_seconds: float, status: int = 200) -> Reply:
        """Answer ``status`` after ``delay_seconds`` (to provoke client timeouts)."""
        return cls(status=status, delay_seconds=delay_seconds)


@dataclass(frozen=True)
class Delivery:
    """One request as the receiver saw it."""

    method: str
    path: str
    query: str
    #: Header names lower-cased; repeated headers joined with ", ".
    headers: Mapping[str, str]
    body: bytes
    #: The body parsed as JSON, or ``None`` when it is not JSON.
    json: Any
    #: Whether one of the receiver's secrets verified the signature (False without secrets).
    verified: bool
    #: Why verification failed (``None`` when verified).
    verify_error: str | None
    received_monotonic: float
    received_time: float
    reply: Reply = field(default_factory=Reply)

    @property
    def webhook_id(self) -> str | None:
        return self.headers.get("webhook-id")

    @property
    def timestamp(self) -> int | None:
        value = self.headers.get("webhook-timestamp")
        return int(value) if value is not None and value.isdigit() else None

    @property
    def signatures(self) -> list[str]:
        return self.headers.get("webhook-signature", "").split()


Responder = Callable[[Delivery], "Reply | int | None"]


def unused_port() -> int:
    """A loopback TCP port nothing listens on (for connection-refused tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _as_reply(value: Reply | int) -> Reply:
    return Reply(status=value) if isinstance(value, int) else value


class WebhookReceiver:
    """The receiver on the running event loop; use as ``async with``."""

    def __init__(
        self,
        secrets: Sequence[str] = (),
        *,
        path: str = "/hook",
        default: Reply | int = 200,
        reject_unverified: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self._verifiers = [Webhook(secret) for secret in secrets]
        self.path = path
        self.default = _as_reply(default)
        self.reject_unverified = reject_unverified
        self._host = host
        self._port = port
        self._lock = threading.Condition()
        self._deliveries: list[Delivery] = []
        self._script: deque[Reply] = deque()
        self._responder: Responder | None = None
        self._arrived: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None

    # --- lifecycle ---

    async def start(self) -> None:
        self._arrived = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: a client that gives up (timeout) cancels a delayed reply.
        self._runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=0.5,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        self._port = self._runner.addresses[0][1]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> WebhookReceiver:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- addresses ---

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self._port}"

    @property
    def url(self) -> str:
        return self.base_url + self.path

    def url_for(self, path: str) -> str:
        return self.base_url + path

    # --- script ---

    def respond_with(self, *replies: Reply | int) -> None:
        """Queue replies for the next requests, in order of arrival."""
        with self._lock:
            self._script.extend(_as_reply(reply) for reply in replies)

    def respond(self, responder: Responder | None) -> None:
        """Answer with ``responder(delivery)`` once the queue is empty (``None``: default)."""
        with self._lock:
            self._responder = responder

    def clear(self) -> None:
        """Forget recorded deliveries and queued replies."""
        with self._lock:
            self._deliveries.clear()
            self._script.clear()

    # --- recording ---

    @property
    def deliveries(self) -> list[Delivery]:
        with self._lock:
            return list(self._deliveries)

    def __len__(self) -> int:
        with self._lock:
            return len(self._deliveries)

    # A timeout parameter (not asyncio.timeout around the call) lets the error say how many came.
    async def wait_for(
        self,
        count: int,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> list[Delivery]:
        """The first ``count`` deliveries, once they arrived; ``TimeoutError`` otherwise."""
        assert self._arrived is not None, "receiver not started"
        try:
            async with asyncio.timeout(timeout):
                while True:
                    self._arrived.clear()
                    with self._lock:
                        if len(self._deliveries) >= count:
                            return self._deliveries[:count]
                    await self._arrived.wait()
        except TimeoutError:
            raise TimeoutError(
                f"receiver got {len(self)} of {count} deliveries within {timeout}s"
            ) from None

    def wait_for_blocking(self, count: int, timeout: float = 10.0) -> list[Delivery]:
        """Like :meth:`wait_for`, for a thread other than the receiver's loop."""
        with self._lock:
            if not self._lock.wait_for(lambda: len(self._deliveries) >= count, timeout):
                raise TimeoutError(
                    f"receiver got {len(self._deliveries)} of {count} deliveries within {timeout}s"
                )
            return self._deliveries[:count]

    # --- the server side ---

    def _verify(self, body: bytes, headers: Mapping[str, str]) -> tuple[bool, str | None]:
        if not self._verifiers:
            return False, "receiver has no secrets"
        error = "no secret verified"
        for verifier in self._verifiers:
            try:
                verifier.verify(body, dict(headers), json_parse=False)
            except Exception as exc:  # WebhookVerificationError, bad base64, non-UTF-8 body
                error = f"{type(exc).__name__}: {exc}"
            else:
                return True, None
        return False, error

    def _choose(self, delivery: Delivery) -> Reply:
        with self._lock:
            if self._script:
                return self._script.popleft()
            responder = self._responder
        if responder is not None:
            chosen = responder(delivery)
            if chosen is not None:
                return _as_reply(chosen)
        return self.default

    def _record(self, delivery: Delivery) -> None:
        with self._lock:
            self._deliveries.append(delivery)
            self._lock.notify_all()
        if self._arrived is not None:
            self._arrived.set()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        received_monotonic, received_time = time.monotonic(), time.time()
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        verified, verify_error = self._verify(body, headers)
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        delivery = Delivery(
            method=request.method,
            path=request.path,
            query=request.query_string,
            headers=headers,
            body=body,
            json=parsed,
            verified=verified,
            verify_error=verify_error,
            received_monotonic=received_monotonic,
            received_time=received_time,
        )
        reply = self._choose(delivery)
        if self.reject_unverified and not verified:
            reply = Reply(401, body="signature not verified", delay_seconds=reply.delay_seconds)
        self._record(dataclasses.replace(delivery, reply=reply))
        if reply.delay_seconds > 0:
            await asyncio.sleep(reply.delay_seconds)
        if reply.close:
            if request.transport is not None:
                request.transport.close()
            return web.Response()
        body_bytes = reply.body.encode() if isinstance(reply.body, str) else reply.body
        return web.Response(status=reply.status, headers=dict(reply.headers), body=body_bytes)


class ReceiverThread:
    """A :class:`WebhookReceiver` on its own loop in a daemon thread, for blocking tests."""

    def __init__(self, secrets: Sequence[str] = (), **options: Any) -> None:
        self.receiver = WebhookReceiver(secrets, **options)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=loop.run_forever, name="webhook-receiver", daemon=True
        )
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.receiver.start(), loop).result(timeout=10)

    def close(self) -> None:
        if self._loop is None or self._thread is None:
            return
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.receiver.close(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()

    def __enter__(self) -> ReceiverThread:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def port(self) -> int:
        return self.receiver.port

    @property
    def base_url(self) -> str:
        return self.receiver.base_url

    @property
    def url(self) -> str:
        return self.receiver.url

    def url_for(self, path: str) -> str:
        return self.receiver.url_for(path)

    @property
    def deliveries(self) -> list[Delivery]:
        return self.receiver.deliveries

    def __len__(self) -> int:
        return len(self.receiver)

    def respond_with(self, *replies: Reply | int) -> None:
        self.receiver.respond_with(*replies)

    def respond(self, responder: Responder | None) -> None:
        self.receiver.respond(responder)

    def clear(self) -> None:
        self.receiver.clear()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Delivery]:
        """Block until ``count`` deliveries arrived; ``TimeoutError`` otherwise."""
        return self.receiver.wait_for_blocking(count, timeout)
