"""Sync mode: one message, all its routes, one verdict, against real receivers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from mailbridge.delivery import signing
from mailbridge.delivery.breaker import Breakers
from mailbridge.delivery.sync import Result, SyncDelivery
from mailbridge.delivery.webhook import Target, WebhookClient, make_session
from mailbridge.observability.metrics import Metrics
from tests.support.receiver import Delivery, Reply, WebhookReceiver, unused_port

SECRET = signing.new_secret()
KEYS = (signing.decode_secret(SECRET),)
PERMANENT = (400, 410, 413, 415, 422)
ACCEPTED = 500.0  # the fake monotonic time the SMTP layer accepted the message


def body(route: str) -> bytes:
    return json.dumps({"id": "msg_s", "route": route}).encode()


class FakeTime:
    """A monotonic clock that only moves when the code under test sleeps."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with make_session(10) as session:
        yield session


@pytest.fixture
async def rx() -> AsyncIterator[WebhookReceiver]:
    async with WebhookReceiver(secrets=[SECRET]) as receiver:
        yield receiver


@pytest.fixture
def fake() -> FakeTime:
    return FakeTime()


MakeDelivery = Callable[..., SyncDelivery]


@pytest.fixture
def make_delivery(
    session: aiohttp.ClientSession, metrics: Metrics, fake: FakeTime, rx: WebhookReceiver
) -> MakeDelivery:
    def make(
        *,
        urls: dict[str, str] | None = None,
        attempts: int = 3,
        budget_seconds: float = 60,
        threshold: int = 5,
        timeout_seconds: float = 5,
        real_time: bool = False,
        rand: float = 0.5,
        breakers: Breakers | None = None,
    ) -> SyncDelivery:
        urls = urls or {"billing": rx.url_for("/billing"), "support": rx.url_for("/support")}
        client = WebhookClient(
            session,
            breakers=breakers or Breakers(threshold, 30),
            permanent_statuses=PERMANENT,
            metrics=metrics,
        )
        targets = {
            route: Target(route, url, KEYS, timeout_seconds, {}) for route, url in urls.items()
        }
        clocks: dict[str, Any] = {} if real_time else {"sleep": fake.sleep, "monotonic": fake}
        return SyncDelivery(
            client,
            targets,
            attempts=attempts,
            budget_seconds=budget_seconds,
            retry_initial_seconds=0.5,
            retry_max_seconds=600,
            metrics=metrics,
            rand=lambda: rand,
            **clocks,
        )

    return make


def by_path(replies: dict[str, Reply | int]) -> Callable[[Delivery], Reply | int | None]:
    return lambda delivery: replies.get(delivery.path)


async def deliver(
    sync: SyncDelivery, *routes: str, extra_headers: dict[str, str] | None = None
) -> Result:
    bodies = {route: body(route) for route in routes}
    return await sync.deliver(
        "msg_s", bodies, accepted_monotonic=ACCEPTED, extra_headers=extra_headers
    )


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def attempts(metrics: Metrics, route: str, outcome: str, status_class: str) -> float:
    return sample(
        metrics,
        "mailbridge_webhook_attempts_total",
        route=route,
        outcome=outcome,
        status_class=status_class,
    )


async def test_every_route_2xx_is_delivered_and_latency_is_recorded(
    rx: WebhookReceiver, make_delivery: MakeDelivery, metrics: Metrics, fake: FakeTime
) -> None:
    result = await deliver(make_delivery(), "billing", "support")

    assert result == Result("delivered", "delivered to billing, support")
    deliveries = await rx.wait_for(2)
    assert sorted(d.path for d in deliveries) == ["/billing", "/support"]
    assert all(d.verified for d in deliveries)
    assert {d.path: d.json["route"] for d in deliveries} == {
        "/billing": "billing",
        "/support": "support",
    }
    for route in ("billing", "support"):
        count = "mailbridge_delivery_latency_seconds_count"
        total = "mailbridge_delivery_latency_seconds_sum"
        assert sample(metrics, count, route=route) == 1
        assert sample(metrics, total, route=route) == fake.now - ACCEPTED


async def test_routes_are_posted_concurrently(
    rx: WebhookReceiver, make_delivery: MakeDelivery
) -> None:
    """The second route's request arrives while the first one's answer is still pending."""
    rx.respond_with(Reply.slow(1), Reply.slow(1))

    result = await deliver(make_delivery(real_time=True), "billing", "support")

    assert result.outcome == "delivered"
    first, second = await rx.wait_for(2)
    assert second.received_monotonic - first.received_monotonic < 1


async def test_503_then_200_is_delivered_on_attempt_two_with_the_same_id(
    rx: WebhookReceiver, make_delivery: MakeDelivery, metrics: Metrics, fake: FakeTime
) -> None:
    rx.respond_with(503, 200)

    result = await deliver(make_delivery(rand=0.5), "billing")

    assert result.outcome == "delivered"
    assert fake.sleeps == [0.25]  # full jitter: 0.5 (draw) x 0.5 s (first cap)
    first, second = await rx.wait_for(2)
    assert first.webhook_id == second.webhook_id == "msg_s.billing"
    assert first.body == second.body
    assert first.verified and second.verified
    assert attempts(metrics, "billing", "retry", "5xx") == 1
    assert attempts(metrics, "billing", "delivered", "2xx") == 1


async def test_backoff_grows_between_attempts(
    rx: WebhookReceiver, make_delivery: MakeDelivery, fake: FakeTime
) -> None:
    rx.respond_with(500, 500, 500, 500)

    result = await deliver(make_delivery(attempts=4, rand=0.999), "billing")

    assert result == Result("temporary", "route billing: HTTP 500 (attempt 4)")
    assert fake.sleeps == pytest.approx([0.4995, 0.999, 1.998])
    assert len(await rx.wait_for(4)) == 4


async def test_one_route_failing_makes_the_message_temporary(
    rx: WebhookReceiver, make_delivery: MakeDelivery
) -> None:
    rx.respond(by_path({"/support": 503}))

    result = await deliver(make_delivery(attempts=3), "billing", "support")

    assert result == Result("temporary", "route support: HTTP 503 (attempt 3)")
    paths = [d.path for d in await rx.wait_for(4)]
    assert sorted(paths) == ["/billing", "/support", "/support", "/support"]
    # Each route has its own id (a receiver behind both de-duplicates neither away),
    # and every retry of a route repeats its id.
    assert {d.path: d.webhook_id for d in rx.deliveries} == {
        "/billing": "msg_s.billing",
        "/support": "msg_s.support",
    }


async def test_retry_after_is_honoured_on_a_fake_clock(
    rx: WebhookReceiver, make_delivery: MakeDelivery, fake: FakeTime
) -> None:
    rx.respond_with(Reply(429, headers={"Retry-After": "7"}), 200)

    result = await deliver(make_delivery(rand=0.5), "billing")

    assert result.outcome == "delivered"
    assert fake.sleeps == [7.0]


async def test_retry_after_is_honoured_between_real_requests(
    rx: WebhookReceiver, make_delivery: MakeDelivery
) -> None:
    """Loosely measured with the receiver's own timestamps: the second try waits >= ~1 s."""
    rx.respond_with(Reply(429, headers={"Retry-After": "1"}), 200)

    result = await deliver(make_delivery(real_time=True, attempts=2, rand=0.0), "billing")

    assert result.outcome == "delivered"
    first, second = await rx.wait_for(2)
    assert second.received_monotonic - first.received_monotonic >= 0.9


async def test_a_retry_after_past_the_budget_stops_at_once(
    rx: WebhookReceiver, make_delivery: MakeDelivery, fake: FakeTime
) -> None:
    rx.respond_with(Reply(503, headers={"Retry-After": "120"}))

    result = await deliver(make_delivery(budget_seconds=60), "billing")

    assert result.outcome == "temporary"
    assert result.detail == (
        "route billing: HTTP 503, retry after 120s; next try in 120.0s is past the budget"
    )
    assert fake.sleeps == []
    assert len(rx.deliveries) == 1


@pytest.mark.parametrize("status", [410, 400])
async def test_a_listed_4xx_is_permanent_without_retries(
    status: int, rx: WebhookReceiver, make_delivery: MakeDelivery, fake: FakeTime
) -> None:
    rx.respond_with(status)

    result = await deliver(make_delivery(), "billing")

    assert result == Result("permanent", f"route billing: HTTP {status}")
    assert len(rx.deliveries) == 1
    assert fake.sleeps == []


async def test_permanent_and_delivered_routes_make_a_permanent_message(
    rx: WebhookReceiver, make_delivery: MakeDelivery
) -> None:
    rx.respond(by_path({"/billing": 410}))

    result = await deliver(make_delivery(), "billing", "support")

    assert result == Result("permanent", "route billing: HTTP 410")


async def test_temporary_wins_over_permanent(
    rx: WebhookReceiver, make_delivery: MakeDelivery
) -> None:
    """The MTA must retry for the temporary route; the permanent one is refused again later."""
    rx.respond(by_path({"/billing": 410, "/support": 503}))

    result = await deliver(make_delivery(attempts=2), "billing", "support")

    assert result == Result("temporary", "route support: HTTP 503 (attempt 2)")


async def test_an_open_circuit_stops_a_routes_retries_without_requests(
    rx: WebhookReceiver, make_delivery: MakeDelivery, fake: FakeTime, metrics: Metrics
) -> None:
    rx.respond_with(503)

    result = await deliver(make_delivery(threshold=1, attempts=5), "billing")

    assert result == Result(
        "temporary", "route billing: circuit open: destination paused (attempt 2)"
    )
    assert len(rx.deliveries) == 1
    assert len(fake.sleeps) == 1
    assert attempts(metrics, "billing", "circuit_open", "none") == 1


async def test_the_budget_bounds_the_whole_call(
    rx: WebhookReceiver, make_delivery: MakeDelivery
) -> None:
    rx.respond_with(Reply.slow(5))
    breakers = Breakers(1, 30)
    sync = make_delivery(real_time=True, budget_seconds=0.3, timeout_seconds=10, breakers=breakers)

    result = await deliver(sync, "billing")

    assert result == Result("temporary", "route billing: no answer within the 0.3s budget")
    # The cancelled request is no verdict on the destination.
    breaker = breakers.get(Target("billing", rx.url).destination)
    assert breaker.state == "closed"
    assert breaker.consecutive_failures == 0


async def test_the_budget_reports_what_each_route_got(
    rx: WebhookReceiver, make_delivery: MakeDelivery
) -> None:
    rx.respond(by_path({"/billing": Reply.slow(5), "/support": 503}))
    sync = make_delivery(real_time=True, budget_seconds=0.5, attempts=10)

    result = await deliver(sync, "billing", "support")

    assert result.outcome == "temporary"
    assert result.detail.startswith("route billing: no answer within the 0.5s budget; ")
    assert "route support: HTTP 503" in result.detail


async def test_a_refused_connection_is_temporary(make_delivery: MakeDelivery) -> None:
    sync = make_delivery(urls={"billing": f"http://127.0.0.1:{unused_port()}/x?key=s3cr3t"})

    result = await deliver(sync, "billing")

    assert result == Result("temporary", "route billing: connection refused (attempt 3)")


async def test_trace_context_reaches_the_receiver(
    rx: WebhookReceiver, make_delivery: MakeDelivery
) -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    await deliver(make_delivery(), "billing", extra_headers={"traceparent": traceparent})

    (delivery,) = await rx.wait_for(1)
    assert delivery.headers["traceparent"] == traceparent


async def test_an_unconfigured_route_is_temporary_never_a_bounce(
    rx: WebhookReceiver, make_delivery: MakeDelivery
) -> None:
    result = await deliver(make_delivery(), "billing", "nosuch")

    assert result == Result("temporary", "route nosuch: route not configured")


async def test_no_routes_is_trivially_delivered(make_delivery: MakeDelivery) -> None:
    result = await make_delivery().deliver("msg_s", {}, accepted_monotonic=ACCEPTED)

    assert result.outcome == "delivered"


async def test_the_detail_fits_an_smtp_reply(
    rx: WebhookReceiver, make_delivery: MakeDelivery
) -> None:
    rx.respond(lambda delivery: 503)
    urls = {f"route-{n:02d}": rx.url_for(f"/{n}") for n in range(20)}

    result = await deliver(make_delivery(urls=urls, attempts=1), *urls)

    assert result.outcome == "temporary"
    assert len(result.detail) <= 200
    assert result.detail.endswith("...")
    assert "\n" not in result.detail
