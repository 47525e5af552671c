"""One webhook HTTP attempt: sign, POST, classify, count, and tell the breaker.

:class:`Target` is a route's webhook ready to use (URL, decoded signing keys,
timeout, extra headers). :class:`WebhookClient.post` makes exactly one attempt
over a shared pooled ``aiohttp`` session and returns an :class:`Attempt`; it
never raises for anything the network or the receiver does (timeouts, refused
connections, TLS failures, garbage responses), only for cancellation. Retrying
is the caller's business (``sync.py`` now, the spool worker later).

Each request carries ``content-type: application/json``, ``user-agent:
mailbridge/<version>``, the Standard Webhooks headers (``webhook-id`` stable
across retries, ``webhook-timestamp`` fresh per attempt, ``webhook-signature``
with one ``v1,`` signature per key, omitted without keys), the route's extra
headers, and the caller's (``traceparent``). Redirects are not followed. At most
:data:`MAX_RESPONSE_BYTES` of the response body are read, then discarded.

The circuit breaker of the destination (``scheme://host:port``) is asked first:
when it refuses, no request is made and the attempt is ``circuit_open`` (a
temporary failure: nothing is dropped). A 2xx or a permanent 4xx is a breaker
success (the destination is up); every other outcome a failure.

Emits ``mailbridge_webhook_attempts_total{route,outcome,status_class}``,
``mailbridge_webhook_request_duration_seconds{route}`` and
``mailbridge_webhook_circuit_state{route,state}``. Error texts are short and
never contain the URL, its query string, headers or secrets.

Settings read: ``routes[].webhook`` (via :meth:`Target.from_settings`),
``delivery.permanent_statuses``, ``delivery.max_connections`` (via
:func:`make_session`); the breakers are built by the caller from
``delivery.breaker_*``.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import aiohttp
from opentelemetry import trace
from opentelemetry.semconv.attributes import (
    error_attributes,
    http_attributes,
    server_attributes,
    url_attributes,
)
from yarl import URL

from mailbridge import __version__, payload
from mailbridge.config import ConfigError, RouteSettings
from mailbridge.delivery import retry, signing
from mailbridge.delivery.breaker import Breakers
from mailbridge.observability import tracing
from mailbridge.observability.metrics import Metrics, status_class

log = logging.getLogger(__name__)

#: The most of a response body we read (then discard); the rest closes the connection.
MAX_RESPONSE_BYTES = 64 * 1024
USER_AGENT = f"mailbridge/{__version__}"
#: Headers the bridge owns: extra headers may not set them.
RESERVED_HEADERS = frozenset(
    {
        "content-type",
        "content-length",
        "content-encoding",
        "transfer-encoding",
        "host",
        "connection",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
    }
)

Outcome = Literal["delivered", "retry", "permanent", "timeout", "connection_error", "circuit_open"]


@dataclass(frozen=True)
class Target:
    """One route's webhook, ready to use. ``repr`` shows no URL, key or header value."""

    route: str
    url: str = field(repr=False)
    keys: tuple[bytes, ...] = field(default=(), repr=False)
    timeout_seconds: float = 10.0
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), repr=False)

    def __hash__(self) -> int:  # headers is a mapping: hash its items
        headers = frozenset(self.headers.items())
        return hash((self.route, self.url, self.keys, self.timeout_seconds, headers))

    @property
    def destination(self) -> str:
        """``scheme://host:port``: the circuit breaker's key (no path, query or userinfo)."""
        url = URL(self.url)
        host = (url.host or "").lower()
        if ":" in host:
            host = f"[{host}]"
        return f"{url.scheme}://{host}:{url.port}"

    @classmethod
    def from_settings(cls, route: RouteSettings) -> Target:
        """Build from a route's settings; read and decode its secrets and secret files.

        A secret file holds one secret, or several separated by whitespace (for
        rotation within one Kubernetes Secret key). Raises
        :class:`~mailbridge.config.ConfigError` naming the route and the file,
        never the secret.
        """
        webhook = route.webhook
        keys: list[bytes] = []
        for secret in webhook.secrets:
            try:
                keys.append(signing.decode_secret(secret.get_secret_value()))
            except ValueError as error:  # already validated by the settings; be sure
                raise ConfigError(f"route {route.name}: webhook secret: {error}") from None
        for path in webhook.secret_files:
            keys.extend(_read_secret_file(route.name, path))
        for name in webhook.headers:
            if name.lower() in RESERVED_HEADERS:
                raise ConfigError(
                    f"route {route.name}: webhook header {name!r} is set by the bridge itself"
                )
        return cls(
            route=route.name,
            url=str(webhook.url),
            keys=tuple(keys),
            timeout_seconds=webhook.timeout_seconds,
            headers=MappingProxyType(dict(webhook.headers)),
        )


def _read_secret_file(route: str, file: Path) -> list[bytes]:
    where = f"route {route}: webhook secret file {file}"
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{where}: cannot read: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not UTF-8 text") from None
    secrets = text.split()
    if not secrets:
        raise ConfigError(f"{where}: is empty")
    keys = []
    for secret in secrets:
        try:
            keys.append(signing.decode_secret(secret))
        except ValueError as error:
            raise ConfigError(f"{where}: {error}") from None
    return keys


@dataclass(frozen=True)
class Attempt:
    """What one webhook attempt came to."""

    outcome: Outcome
    #: The HTTP status, when a response arrived.
    status: int | None
    #: What the receiver's ``Retry-After`` asked for (seconds, capped), if anything.
    retry_after_seconds: float | None
    #: Short and human; no URL, query string, header or secret.
    error: str | None
    duration_seconds: float

    @property
    def temporary(self) -> bool:
        """Worth trying again later: neither delivered nor permanently refused."""
        return self.outcome not in ("delivered", "permanent")

    def describe(self) -> str:
        """One phrase for a log line or an SMTP reply text: ``HTTP 503``, ``timed out ...``."""
        if self.error:
            return self.error
        return f"HTTP {self.status}" if self.status is not None else self.outcome


def make_session(max_connections: int) -> aiohttp.ClientSession:
    """The one pooled HTTP session for all webhooks (call inside the running loop)."""
    connector = aiohttp.TCPConnector(limit=max_connections)
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        auto_decompress=False,
    )


class WebhookClient:
    """Makes single webhook attempts; shared by every route and delivery task."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        breakers: Breakers,
        permanent_statuses: Collection[int],
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session
        self._breakers = breakers
        self._permanent = frozenset(permanent_statuses)
        self._metrics = metrics
        self._clock = clock
        self._monotonic = monotonic
        #: Routes seen per destination, so a circuit change shows on each of their gauges.
        self._routes: dict[str, set[str]] = {}
        #: What each target's requests share, made once (by ``id``; the entry holds the target).
        self._prepared: dict[int, _Prepared] = {}

    def _prepare(self, target: Target) -> _Prepared:
        prepared = self._prepared.get(id(target))
        if prepared is not None and prepared.target is target:
            return prepared
        if len(self._prepared) >= _MAX_PREPARED:
            self._prepared.clear()
        headers: dict[str, str] = {"user-agent": USER_AGENT}
        _add_headers(headers, target.headers)
        prepared = _Prepared(
            target=target,
            destination=target.destination,
            url=URL(target.url),
            timeout=aiohttp.ClientTimeout(total=target.timeout_seconds),
            headers=headers,
        )
        self._prepared[id(target)] = prepared
        return prepared

    @property
    def breakers(self) -> Breakers:
        return self._breakers

    async def post(
        self,
        target: Target,
        webhook_id: str,
        body: bytes | payload.Document,
        *,
        extra_headers: Mapping[str, str] | None = None,
        link_to: Mapping[str, str] | None = None,
    ) -> Attempt:
        """One attempt to deliver ``body`` to ``target``; never raises except on cancel.

        A :class:`~mailbridge.payload.Document` body is signed and sent piece by
        piece (with its ``content-length``), never joined into one copy.

        Each HTTP attempt is a ``POST`` client span: a child of the current span, linked
        to the span whose context ``link_to`` holds (the message, when delivered later
        from the spool). Its ``traceparent`` goes out with the request.
        """
        prepared = self._prepare(target)
        destination = prepared.destination
        breaker = self._breakers.get(destination)
        routes = self._routes.setdefault(destination, set())
        if target.route not in routes:
            routes.add(target.route)
            self._metrics.set_circuit(target.route, breaker.state)
        before = breaker.state
        if not breaker.allow(self._monotonic()):
            attempt = Attempt("circuit_open", None, None, "circuit open: destination paused", 0.0)
            self._count(target.route, attempt, timed=False)
            self._circuit_changed(destination, before, breaker.state)
            return attempt
        self._circuit_changed(destination, before, breaker.state)

        before = breaker.state
        started = self._monotonic()
        try:
            if tracing.active():
                with tracing.tracer().start_as_current_span(
                    "POST",
                    kind=trace.SpanKind.CLIENT,
                    links=tracing.links(link_to),
                    attributes=_span_attributes(target, webhook_id),
                ) as span:
                    attempt = await self._request(
                        prepared, webhook_id, body, _with_carrier(extra_headers), started
                    )
                    _record_on_span(span, attempt)
            else:  # the span would be a no-op: no attributes, no links to build
                attempt = await self._request(
                    prepared, webhook_id, body, _with_carrier(extra_headers), started
                )
        except BaseException:
            breaker.release(self._monotonic())  # cancelled: no verdict on the destination
            self._circuit_changed(destination, before, breaker.state)
            raise
        now = self._monotonic()
        if attempt.outcome in ("delivered", "permanent"):
            breaker.record_success(now)
        else:
            breaker.record_failure(now)
        self._count(target.route, attempt, timed=True)
        self._circuit_changed(destination, before, breaker.state)
        return attempt

    async def _request(
        self,
        prepared: _Prepared,
        webhook_id: str,
        body: bytes | payload.Document,
        extra_headers: Mapping[str, str] | None,
        started: float,
    ) -> Attempt:
        def done(
            outcome: Outcome,
            status: int | None = None,
            error: str | None = None,
            retry_after: float | None = None,
        ) -> Attempt:
            return Attempt(outcome, status, retry_after, error, self._monotonic() - started)

        target = prepared.target
        headers = self._headers(prepared, webhook_id, body, extra_headers)
        data = _DocumentPayload(body) if isinstance(body, payload.Document) else body
        try:
            async with self._session.post(
                prepared.url,
                data=data,
                headers=headers,
                timeout=prepared.timeout,
                allow_redirects=False,
            ) as response:
                await _drain(response)
                status = response.status
                retry_after_header = response.headers.get("Retry-After")
        except TimeoutError:  # aiohttp's own timeouts subclass it
            return done("timeout", error=f"timed out after {target.timeout_seconds:g}s")
        except aiohttp.ClientConnectorCertificateError:
            return done("connection_error", error="TLS certificate not accepted")
        except (aiohttp.ClientSSLError, ssl.SSLError):
            return done("connection_error", error="TLS handshake failed")
        except aiohttp.ClientConnectorError as error:
            return done("connection_error", error=_connect_error(error))
        except aiohttp.ServerDisconnectedError:
            return done("connection_error", error="connection closed without a response")
        except aiohttp.ClientPayloadError:
            return done("connection_error", error="response body broken off")
        except aiohttp.ClientResponseError:  # unparsable; its .status is aiohttp's, not theirs
            return done("connection_error", error="invalid HTTP response")
        except (aiohttp.ClientError, OSError) as error:
            return done("connection_error", error=_short_error(error))
        except Exception as error:  # e.g. a header value aiohttp refuses; never crash delivery
            log.warning(
                "webhook attempt failed unexpectedly",
                extra={"route": target.route, "error_type": type(error).__name__},
            )
            return done("connection_error", error=f"unexpected error ({type(error).__name__})")

        outcome = retry.classify(status, self._permanent)
        if outcome == "delivered":
            return done("delivered", status)
        retry_after = retry.parse_retry_after(retry_after_header, self._clock())
        if 300 <= status <= 399:
            return done(outcome, status, f"HTTP {status}: redirect not followed", retry_after)
        return done(outcome, status, f"HTTP {status}", retry_after)

    def _headers(
        self,
        prepared: _Prepared,
        webhook_id: str,
        body: bytes | payload.Document,
        extra_headers: Mapping[str, str] | None,
    ) -> dict[str, str]:
        target = prepared.target
        headers = dict(prepared.headers)  # user-agent and the route's extra headers
        if extra_headers:
            _add_headers(headers, extra_headers)
        timestamp = int(self._clock())
        headers["content-type"] = "application/json"
        headers["webhook-id"] = webhook_id
        headers["webhook-timestamp"] = str(timestamp)
        if target.keys:
            headers["webhook-signature"] = (
                signing.sign_parts(webhook_id, timestamp, body, target.keys)
                if isinstance(body, payload.Document)
                else signing.sign(webhook_id, timestamp, body, target.keys)
            )
        return headers

    def _count(self, route: str, attempt: Attempt, *, timed: bool) -> None:
        self._metrics.webhook_attempt(route, attempt.outcome, status_class(attempt.status))
        if timed:
            self._metrics.observe_webhook_duration(route, attempt.duration_seconds)

    def _circuit_changed(self, destination: str, before: str, after: str) -> None:
        if before == after:
            return
        log.info(
            "circuit %s", after, extra={"destination": destination, "from": before, "to": after}
        )
        for route in self._routes.get(destination, ()):
            self._metrics.set_circuit(route, after)


#: Targets whose request parts :class:`WebhookClient` keeps (routes are few; a bound anyway).
_MAX_PREPARED = 1024


@dataclass(frozen=True)
class _Prepared:
    """What every request to one target shares, built once."""

    target: Target
    destination: str
    url: URL
    timeout: aiohttp.ClientTimeout
    #: ``user-agent`` and the route's extra headers (lower-case names, reserved ones dropped).
    headers: Mapping[str, str]


def _add_headers(headers: dict[str, str], extra: Mapping[str, str]) -> None:
    for name, value in extra.items():
        lower = name.lower()
        if lower not in RESERVED_HEADERS:
            headers[lower] = value


class _DocumentPayload(aiohttp.payload.Payload):
    """A document's pieces as a request body: written one by one, length known."""

    _value: payload.Document

    def __init__(self, document: payload.Document) -> None:
        super().__init__(document, content_type="application/json")
        self._size = len(document)

    async def write(self, writer: aiohttp.abc.AbstractStreamWriter) -> None:
        for chunk in _coalesced(self._value.parts, self._size):
            await writer.write(chunk)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return bytes(self._value).decode(encoding, errors)


#: A document up to this size goes out in one write (one ``send()``, one short-lived copy).
JOIN_BYTES = 1024 * 1024
#: Above it, runs of parts smaller than this are joined: a piece each, not a syscall each.
SMALL_PART_BYTES = 64 * 1024


def _coalesced(parts: tuple[bytes, ...], size: int) -> tuple[bytes, ...] | list[bytes]:
    """The document's parts for the wire, in as few writes as is cheap.

    Each write of the request body is a ``send()`` of its own when the socket keeps
    up: a streamed body's quotes and JSON head and tail were one syscall each. A
    document of at most :data:`JOIN_BYTES` is joined; a bigger one keeps its big
    parts as they are (no whole copy) and joins the small ones between them.
    """
    if len(parts) <= 1:
        return parts
    if size <= JOIN_BYTES:
        return (b"".join(parts),)
    chunks: list[bytes] = []
    run: list[bytes] = []
    for part in parts:
        if len(part) < SMALL_PART_BYTES:
            run.append(part)
            continue
        if run:
            chunks.append(b"".join(run))
            run.clear()
        chunks.append(part)
    if run:
        chunks.append(b"".join(run))
    return chunks


def _with_carrier(extra_headers: Mapping[str, str] | None) -> dict[str, str]:
    """The caller's headers plus the current trace context (``traceparent``)."""
    carrier = tracing.carrier()
    if not extra_headers:
        return carrier
    return {**extra_headers, **carrier}


def _span_attributes(target: Target, webhook_id: str) -> dict[str, str | int]:
    url = URL(target.url)
    return {
        http_attributes.HTTP_REQUEST_METHOD: "POST",
        # No query string or credentials: they may carry tokens.
        url_attributes.URL_FULL: str(url.with_query(None).with_user(None).with_fragment(None)),
        server_attributes.SERVER_ADDRESS: url.host or "",
        server_attributes.SERVER_PORT: url.port or 0,
        tracing.ROUTE: target.route,
        tracing.WEBHOOK_ID: webhook_id,
    }


def _record_on_span(span: trace.Span, attempt: Attempt) -> None:
    span.set_attribute(tracing.OUTCOME, attempt.outcome)
    if attempt.status is not None:
        span.set_attribute(http_attributes.HTTP_RESPONSE_STATUS_CODE, attempt.status)
    if attempt.outcome != "delivered":
        error_type = str(attempt.status) if attempt.status is not None else attempt.outcome
        span.set_attribute(error_attributes.ERROR_TYPE, error_type)
        span.set_status(trace.StatusCode.ERROR, attempt.error or attempt.outcome)


async def _drain(response: aiohttp.ClientResponse) -> None:
    """Read and discard at most MAX_RESPONSE_BYTES; don't reuse a connection left mid-body."""
    remaining = MAX_RESPONSE_BYTES
    while remaining > 0:
        chunk = await response.content.read(remaining)
        if not chunk:
            return
        remaining -= len(chunk)
    if not response.content.at_eof():
        response.close()


def _connect_error(error: aiohttp.ClientConnectorError) -> str:
    if isinstance(error, aiohttp.ClientConnectorDNSError):
        return "host name not found"
    os_error = error.os_error
    if isinstance(os_error, ConnectionRefusedError):
        return "connection refused"
    reason = getattr(os_error, "strerror", None)
    return f"cannot connect: {reason}" if reason else "cannot connect"


def _short_error(error: BaseException) -> str:
    """A class-based description: aiohttp's messages often carry the URL."""
    if isinstance(error, aiohttp.InvalidURL):
        return "invalid URL"
    if isinstance(error, ConnectionResetError):
        return "connection reset"
    if isinstance(error, OSError) and error.strerror:
        return f"network error: {error.strerror}"
    return f"network error ({type(error).__name__})"
