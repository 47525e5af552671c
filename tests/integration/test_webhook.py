"""One webhook attempt against a real receiver that verifies with ``standardwebhooks``."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from mailbridge import payload
from mailbridge.config import ConfigError, RouteSettings
from mailbridge.delivery import signing, webhook
from mailbridge.delivery.breaker import Breakers
from mailbridge.delivery.webhook import (
    MAX_RESPONSE_BYTES,
    USER_AGENT,
    Attempt,
    Target,
    WebhookClient,
    make_session,
)
from mailbridge.observability.metrics import Metrics
from tests.support.receiver import ReceiverThread, Reply, WebhookReceiver, unused_port

PERMANENT = (400, 410, 413, 415, 422)
BODY = json.dumps({"id": "msg_1", "subject": "Grüße"}, ensure_ascii=False).encode()
OLD, NEW = signing.new_secret(), signing.new_secret()


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with make_session(10) as session:
        yield session


@pytest.fixture
async def rx() -> AsyncIterator[WebhookReceiver]:
    async with WebhookReceiver(secrets=[OLD]) as receiver:
        yield receiver


MakeClient = Callable[..., WebhookClient]


@pytest.fixture
def make_client(session: aiohttp.ClientSession, metrics: Metrics) -> MakeClient:
    def make(
        *, threshold: int = 5, open_seconds: float = 30, **clocks: Callable[[], float]
    ) -> WebhookClient:
        return WebhookClient(
            session,
            breakers=Breakers(threshold, open_seconds),
            permanent_statuses=PERMANENT,
            metrics=metrics,
            **clocks,
        )

    return make


def target_for(
    url: str,
    *,
    secrets: tuple[str, ...] = (OLD, NEW),
    route: str = "billing",
    timeout_seconds: float = 5,
    headers: Mapping[str, str] | None = None,
) -> Target:
    keys = tuple(signing.decode_secret(secret) for secret in secrets)
    return Target(route, url, keys, timeout_seconds, headers or {})


def attempts(metrics: Metrics, route: str, outcome: str, status_class: str) -> float:
    value = metrics.registry.get_sample_value(
        "mailbridge_webhook_attempts_total",
        {"route": route, "outcome": outcome, "status_class": status_class},
    )
    return value or 0.0


def circuit(metrics: Metrics, route: str, state: str) -> float | None:
    return metrics.registry.get_sample_value(
        "mailbridge_webhook_circuit_state", {"route": route, "state": state}
    )


# --- headers and signatures ------------------------------------------------------------------


async def test_sends_standard_webhooks_headers_that_standardwebhooks_verifies(
    rx: WebhookReceiver, make_client: MakeClient
) -> None:
    target = target_for(rx.url, headers={"Authorization": "Bearer t0ken", "X-Team": "billing"})
    before = int(time.time())

    attempt = await make_client().post(
        target,
        "msg_1",
        BODY,
        extra_headers={"x-request-id": "req-aaaa"},
    )

    assert attempt.outcome == "delivered"
    (delivery,) = await rx.wait_for(1)
    assert delivery.verified, delivery.verify_error
    assert delivery.method == "POST"
    assert delivery.path == "/hook"
    assert delivery.body == BODY
    assert delivery.json == {"id": "msg_1", "subject": "Grüße"}
    headers = delivery.headers
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == USER_AGENT
    assert headers["webhook-id"] == "msg_1"
    assert before <= int(headers["webhook-timestamp"]) <= int(time.time())
    assert len(delivery.signatures) == 2
    assert all(sig.startswith("v1,") for sig in delivery.signatures)
    assert headers["authorization"] == "Bearer t0ken"
    assert headers["x-team"] == "billing"
    assert headers["x-request-id"] == "req-aaaa"


@pytest.mark.parametrize("receiver_secrets", [[OLD], [NEW], [OLD, NEW]])
async def test_rotated_secrets_each_verify_on_their_own(
    receiver_secrets: list[str], make_client: MakeClient
) -> None:
    async with WebhookReceiver(secrets=receiver_secrets) as rx:
        await make_client().post(target_for(rx.url, secrets=(OLD, NEW)), "msg_rot", BODY)
        (delivery,) = await rx.wait_for(1)
    assert delivery.verified, delivery.verify_error


async def test_a_receiver_with_another_secret_does_not_verify(make_client: MakeClient) -> None:
    async with WebhookReceiver(secrets=[signing.new_secret()], reject_unverified=True) as rx:
        attempt = await make_client().post(target_for(rx.url), "msg_x", BODY)
        (delivery,) = await rx.wait_for(1)
    assert not delivery.verified
    assert attempt.outcome == "retry"
    assert attempt.status == 401


async def test_without_keys_no_signature_header_is_sent(
    rx: WebhookReceiver, make_client: MakeClient
) -> None:
    attempt = await make_client().post(target_for(rx.url, secrets=()), "msg_2", BODY)

    assert attempt.outcome == "delivered"
    (delivery,) = await rx.wait_for(1)
    assert "webhook-signature" not in delivery.headers
    assert delivery.headers["webhook-id"] == "msg_2"
    assert not delivery.verified


async def test_extra_headers_cannot_override_the_signed_ones(
    rx: WebhookReceiver, make_client: MakeClient
) -> None:
    target = target_for(rx.url, headers={"Webhook-Id": "forged", "Content-Type": "text/plain"})

    await make_client().post(target, "msg_3", BODY, extra_headers={"webhook-timestamp": "1"})

    (delivery,) = await rx.wait_for(1)
    assert delivery.verified, delivery.verify_error
    assert delivery.headers["webhook-id"] == "msg_3"
    assert delivery.headers["content-type"] == "application/json"


async def test_webhook_id_is_stable_and_timestamp_fresh_across_attempts(
    rx: WebhookReceiver, make_client: MakeClient
) -> None:
    clock = FakeClock(time.time() - 60)
    client = make_client(clock=clock)
    target = target_for(rx.url)
    rx.respond_with(503, 200)

    first = await client.post(target, "msg_same", BODY)
    clock.now += 45
    second = await client.post(target, "msg_same", BODY)

    assert (first.outcome, second.outcome) == ("retry", "delivered")
    one, two = await rx.wait_for(2)
    assert one.webhook_id == two.webhook_id == "msg_same"
    assert one.timestamp is not None and two.timestamp is not None
    assert two.timestamp - one.timestamp == 45
    assert one.verified and two.verified
    assert one.signatures != two.signatures


# --- outcomes --------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 202, 204])
async def test_2xx_is_delivered(
    status: int, rx: WebhookReceiver, make_client: MakeClient, metrics: Metrics
) -> None:
    rx.respond_with(status)

    attempt = await make_client().post(target_for(rx.url), "msg_ok", BODY)

    assert attempt == Attempt("delivered", status, None, None, attempt.duration_seconds)
    assert not attempt.temporary
    assert attempt.duration_seconds >= 0
    assert attempts(metrics, "billing", "delivered", "2xx") == 1
    duration_count = metrics.registry.get_sample_value(
        "mailbridge_webhook_request_duration_seconds_count", {"route": "billing"}
    )
    assert duration_count == 1


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 401, 403, 404])
async def test_server_errors_and_other_4xx_are_retried(
    status: int, rx: WebhookReceiver, make_client: MakeClient, metrics: Metrics
) -> None:
    rx.respond_with(status)

    attempt = await make_client().post(target_for(rx.url), "msg_r", BODY)

    assert (attempt.outcome, attempt.status, attempt.error) == ("retry", status, f"HTTP {status}")
    assert attempt.temporary
    assert attempts(metrics, "billing", "retry", f"{status // 100}xx") == 1


async def test_503_then_200_is_delivered_on_the_second_attempt(
    rx: WebhookReceiver, make_client: MakeClient
) -> None:
    client, target = make_client(), target_for(rx.url)
    rx.respond_with(503, 200)

    outcomes = [(await client.post(target, "msg_4", BODY)).outcome for _ in range(2)]

    assert outcomes == ["retry", "delivered"]
    assert [d.webhook_id for d in await rx.wait_for(2)] == ["msg_4", "msg_4"]


@pytest.mark.parametrize(
    ("header", "expected"), [("7", 7.0), ("0", 0.0), ("soon", None), ("99999", 3600.0)]
)
async def test_429_reports_the_receivers_retry_after(
    header: str, expected: float | None, rx: WebhookReceiver, make_client: MakeClient
) -> None:
    rx.respond_with(Reply(429, headers={"Retry-After": header}))

    attempt = await make_client().post(target_for(rx.url), "msg_5", BODY)

    assert (attempt.outcome, attempt.status) == ("retry", 429)
    assert attempt.retry_after_seconds == expected


async def test_retry_after_as_an_http_date(rx: WebhookReceiver, make_client: MakeClient) -> None:
    clock = FakeClock(time.time())
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(int(clock.now) + 120))
    rx.respond_with(Reply(503, headers={"Retry-After": date}))

    attempt = await make_client(clock=clock).post(target_for(rx.url), "msg_6", BODY)

    assert attempt.retry_after_seconds is not None
    assert 119 <= attempt.retry_after_seconds <= 120


@pytest.mark.parametrize("status", [410, 400, 422])
async def test_listed_4xx_are_permanent_and_keep_the_circuit_closed(
    status: int, rx: WebhookReceiver, make_client: MakeClient, metrics: Metrics
) -> None:
    client, target = make_client(threshold=1), target_for(rx.url)
    rx.respond_with(status, status)

    first = await client.post(target, "msg_7", BODY)
    second = await client.post(target, "msg_7", BODY)

    assert (first.outcome, first.status, first.error) == ("permanent", status, f"HTTP {status}")
    assert not first.temporary
    assert second.outcome == "permanent"  # not circuit_open: the destination is up
    assert client.breakers.get(target.destination).state == "closed"
    assert attempts(metrics, "billing", "permanent", "4xx") == 2


async def test_a_redirect_is_not_followed(rx: WebhookReceiver, make_client: MakeClient) -> None:
    rx.respond_with(Reply(302, headers={"Location": rx.url_for("/elsewhere")}))

    attempt = await make_client().post(target_for(rx.url), "msg_8", BODY)

    assert (attempt.outcome, attempt.status) == ("retry", 302)
    assert attempt.error is not None and "redirect not followed" in attempt.error
    assert [d.path for d in rx.deliveries] == ["/hook"]


async def test_a_slow_receiver_times_out(
    rx: WebhookReceiver, make_client: MakeClient, metrics: Metrics
) -> None:
    rx.respond_with(Reply.slow(5))

    attempt = await make_client().post(target_for(rx.url, timeout_seconds=0.3), "msg_9", BODY)

    assert (attempt.outcome, attempt.status) == ("timeout", None)
    assert attempt.error == "timed out after 0.3s"
    assert attempt.temporary
    assert attempt.duration_seconds < 4  # gave up long before the reply; not a speed claim
    assert attempts(metrics, "billing", "timeout", "none") == 1


async def test_a_refused_connection_is_a_connection_error(
    make_client: MakeClient, metrics: Metrics
) -> None:
    url = f"http://127.0.0.1:{unused_port()}/hook?token=s3cr3t"

    attempt = await make_client().post(target_for(url), "msg_10", BODY)

    assert (attempt.outcome, attempt.status, attempt.error) == (
        "connection_error",
        None,
        "connection refused",
    )
    assert attempts(metrics, "billing", "connection_error", "none") == 1


async def test_a_dropped_connection_is_a_connection_error(
    rx: WebhookReceiver, make_client: MakeClient
) -> None:
    rx.respond_with(Reply.drop())

    attempt = await make_client().post(target_for(rx.url), "msg_11", BODY)

    assert attempt.outcome == "connection_error"
    assert attempt.error == "connection closed without a response"
    assert len(rx.deliveries) == 1


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"HELLO THERE\r\n\r\n", "invalid HTTP response"),
        (b"\x00" * 64, "invalid HTTP response"),
        (b"HTTP/1.1 200 OK\r\nX-Huge: " + b"a" * 70_000 + b"\r\n\r\n", "invalid HTTP response"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", "response body broken off"),
    ],
)
async def test_a_garbage_response_is_a_connection_error(
    answer: bytes, error: str, make_client: MakeClient
) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        attempt = await make_client().post(target_for(f"http://127.0.0.1:{port}/"), "msg_g", BODY)

    assert (attempt.outcome, attempt.status, attempt.error) == ("connection_error", None, error)


async def test_a_tls_failure_is_a_connection_error_without_the_url(
    rx: WebhookReceiver, make_client: MakeClient
) -> None:
    url = rx.url.replace("http://", "https://") + "?token=s3cr3t"

    attempt = await make_client().post(target_for(url), "msg_12", BODY)

    assert attempt.outcome == "connection_error"
    assert attempt.error is not None
    assert attempt.error.startswith("TLS")
    assert "s3cr3t" not in attempt.error and "127.0.0.1" not in attempt.error


async def test_a_huge_response_body_is_cut_off_and_the_client_keeps_working(
    rx: WebhookReceiver, make_client: MakeClient
) -> None:
    client, target = make_client(), target_for(rx.url)
    rx.respond_with(Reply(200, body=b"x" * (MAX_RESPONSE_BYTES * 16)), 200)

    first = await client.post(target, "msg_13", BODY)
    second = await client.post(target, "msg_14", BODY)

    assert (first.outcome, second.outcome) == ("delivered", "delivered")


# --- circuit breaker -------------------------------------------------------------------------


async def test_the_circuit_opens_pauses_without_requests_and_closes_after_a_success(
    rx: WebhookReceiver, make_client: MakeClient, metrics: Metrics
) -> None:
    monotonic = FakeClock(1000.0)
    client = make_client(threshold=2, open_seconds=30, monotonic=monotonic)
    target = target_for(rx.url)
    rx.respond_with(503, 503)

    assert (await client.post(target, "msg_b", BODY)).outcome == "retry"
    assert circuit(metrics, "billing", "closed") == 1
    assert (await client.post(target, "msg_b", BODY)).outcome == "retry"
    assert circuit(metrics, "billing", "open") == 1
    assert circuit(metrics, "billing", "closed") == 0

    monotonic.now += 29
    paused = await client.post(target, "msg_b", BODY)
    assert paused == Attempt("circuit_open", None, None, paused.error, 0.0)
    assert paused.temporary
    assert len(rx.deliveries) == 2  # no request while open
    assert attempts(metrics, "billing", "circuit_open", "none") == 1

    monotonic.now += 1
    trial = await client.post(target, "msg_b", BODY)  # the half-open trial; receiver says 200
    assert trial.outcome == "delivered"
    assert len(rx.deliveries) == 3
    assert circuit(metrics, "billing", "closed") == 1
    assert circuit(metrics, "billing", "open") == 0
    assert (await client.post(target, "msg_c", BODY)).outcome == "delivered"


async def test_a_failed_trial_reopens_the_circuit(
    rx: WebhookReceiver, make_client: MakeClient, metrics: Metrics
) -> None:
    monotonic = FakeClock(0.0)
    client = make_client(threshold=1, open_seconds=10, monotonic=monotonic)
    target = target_for(rx.url)
    rx.respond_with(500, 500)

    await client.post(target, "msg_d", BODY)
    monotonic.now += 10
    assert (await client.post(target, "msg_d", BODY)).outcome == "retry"
    assert (await client.post(target, "msg_d", BODY)).outcome == "circuit_open"
    assert circuit(metrics, "billing", "open") == 1
    assert len(rx.deliveries) == 2


async def test_routes_sharing_a_destination_share_its_circuit(
    rx: WebhookReceiver, make_client: MakeClient, metrics: Metrics
) -> None:
    client = make_client(threshold=1, monotonic=FakeClock(0.0))
    billing = target_for(rx.url, route="billing")
    support = target_for(rx.url_for("/support"), route="support")
    rx.respond_with(200, 503)

    await client.post(billing, "msg_e", BODY)
    await client.post(support, "msg_e", BODY)

    assert billing.destination == support.destination
    assert (await client.post(billing, "msg_f", BODY)).outcome == "circuit_open"
    assert circuit(metrics, "billing", "open") == 1
    assert circuit(metrics, "support", "open") == 1


# --- targets ---------------------------------------------------------------------------------


def route_settings(tmp_path: Path, **webhook: object) -> RouteSettings:
    return RouteSettings.model_validate(
        {
            "name": "billing",
            "recipients": ["billing@example.com"],
            "webhook": {"url": "https://hooks.example.com/in?token=abc", **webhook},
        }
    )


def test_target_from_settings_reads_secrets_and_secret_files(tmp_path: Path) -> None:
    single, pair = tmp_path / "single", tmp_path / "pair"
    single.write_text(f"  {NEW}\n")
    pair.write_text(f"{OLD}\n{NEW}\n")

    target = Target.from_settings(
        route_settings(
            tmp_path,
            secrets=[OLD],
            secret_files=[str(single), str(pair)],
            timeout_seconds=3,
            headers={"X-Team": "billing"},
        )
    )

    old, new = signing.decode_secret(OLD), signing.decode_secret(NEW)
    assert target.keys == (old, new, old, new)
    assert target.route == "billing"
    assert target.url == "https://hooks.example.com/in?token=abc"
    assert target.timeout_seconds == 3
    assert dict(target.headers) == {"X-Team": "billing"}
    assert target.destination == "https://hooks.example.com:443"
    assert "token" not in repr(target) and "hooks.example.com" not in repr(target)


def test_a_missing_secret_file_names_the_route_and_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(
        ConfigError, match=r"route billing: webhook secret file .*nope: cannot read"
    ):
        Target.from_settings(route_settings(tmp_path, secret_files=[str(missing)]))


@pytest.mark.parametrize("content", ["", "   \n", "whsec_not-base64!!", "whsec_c2hvcnQ="])
def test_a_bad_secret_file_is_refused_without_showing_its_content(
    tmp_path: Path, content: str
) -> None:
    bad = tmp_path / "bad"
    bad.write_text(content)
    with pytest.raises(ConfigError, match="route billing: webhook secret file") as caught:
        Target.from_settings(route_settings(tmp_path, secret_files=[str(bad)]))
    if content.strip():
        assert content.strip() not in str(caught.value)


def test_extra_headers_may_not_set_the_signed_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Webhook-Signature"):
        Target.from_settings(route_settings(tmp_path, headers={"Webhook-Signature": "v1,x"}))


@pytest.mark.parametrize(
    ("url", "destination"),
    [
        ("http://Example.COM/x?y=1", "http://example.com:80"),
        ("https://user:pw@example.com:8443/x", "https://example.com:8443"),
        ("http://[::1]:9000/", "http://[::1]:9000"),
    ],
)
def test_destination_is_scheme_host_and_port(url: str, destination: str) -> None:
    assert Target(route="r", url=url).destination == destination


# --- the test receiver's blocking variant (used by the SMTP tests) ---------------------------


def test_the_thread_receiver_serves_blocking_clients() -> None:
    """ReceiverThread records and verifies like WebhookReceiver, from plain blocking code."""
    timestamp = int(time.time())
    signature = signing.sign("msg_t", timestamp, BODY, [signing.decode_secret(OLD)])
    headers = {"webhook-id": "msg_t", "webhook-timestamp": str(timestamp)}
    with ReceiverThread(secrets=[OLD]) as rx:
        rx.respond_with(Reply(503, headers={"Retry-After": "3"}))
        codes = []
        for sig in (signature, "v1,Zm9yZ2Vk"):
            request = urllib.request.Request(
                rx.url, data=BODY, headers={**headers, "webhook-signature": sig}
            )
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    codes.append(response.status)
            except urllib.error.HTTPError as error:
                codes.append(error.code)
        first, second = rx.wait_for(2, timeout=5)
        with pytest.raises(TimeoutError, match="got 2 of 3"):
            rx.wait_for(3, timeout=0.05)
    assert codes == [503, 200]
    assert (first.verified, second.verified) == (True, False)
    assert first.reply.headers == {"Retry-After": "3"}
    assert first.json == {"id": "msg_1", "subject": "Grüße"}


@pytest.mark.parametrize(
    "sizes",
    [
        (30, 1, 5000, 1, 20),  # small: one write
        (300, 1, 1_200_000, 1, 40),  # big: the small parts around the body joined
        (10, 70_000, 3, 2_000_000, 5, 2_000_000, 7),  # big parts kept, small runs joined
    ],
)
async def test_a_document_in_pieces_arrives_whole_and_verified(
    rx: WebhookReceiver, make_client: MakeClient, sizes: tuple[int, ...]
) -> None:
    parts = tuple(bytes([ord("a") + n % 26]) * size for n, size in enumerate(sizes))
    head, tail = b'{"id": "msg_doc", "x": "', b'"}'
    text = head + b"".join(parts) + tail
    document = payload.Document((head, *parts, tail))
    attempt = await make_client().post(target_for(rx.url), "msg_doc", document)
    assert attempt.outcome == "delivered"
    (delivery,) = await rx.wait_for(1)
    assert delivery.verified, delivery.verify_error
    assert delivery.body == text
    chunks = webhook._coalesced(document.parts, len(document))
    assert b"".join(chunks) == text
    if len(text) <= webhook.JOIN_BYTES:
        assert len(chunks) == 1
    else:  # no whole copy: big parts as they are, the small ones between them joined
        small = [len(chunk) < webhook.SMALL_PART_BYTES for chunk in chunks]
        assert not any(a and b for a, b in itertools.pairwise(small))
        assert len(chunks) < len(document.parts)
