"""The spool worker: its decisions (pure, on a fake clock: per-route state, backoff, expiry)
and its refusal to drop a message when something unexpected breaks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from mailbridge.config import SpoolSettings
from mailbridge.delivery.breaker import Breakers
from mailbridge.delivery.webhook import Attempt, Target, WebhookClient
from mailbridge.delivery.worker import RouteResult, Worker, _all_done, plan
from mailbridge.observability.metrics import Metrics
from mailbridge.payload import Envelope
from mailbridge.spool import record
from mailbridge.spool.queue import Spool

NOW = 10_000.0
DAY = 86_400.0


def state(**routes: record.RouteState) -> record.State:
    return record.State(routes=routes, age_from=NOW - 60, updated_at=NOW - 60)


def run(before: record.State, results: dict[str, RouteResult], **overrides: float) -> record.State:
    options = {
        "now": NOW,
        "retry_initial_seconds": 1.0,
        "retry_max_seconds": 600.0,
        "max_age_seconds": 5 * DAY,
    } | overrides
    return plan(before, results, rand=lambda: 1.0, **options)  # type: ignore[arg-type]


def test_a_delivered_route_is_done_and_only_the_failed_one_is_retried() -> None:
    after = run(
        state(a=record.RouteState(), b=record.RouteState()),
        {"a": RouteResult("delivered"), "b": RouteResult("temporary", "HTTP 503")},
    )
    assert ["b"] == after.pending
    assert ("done", 1) == (after.routes["a"].status, after.routes["a"].attempts)
    assert (1, NOW + 1.0, "HTTP 503") == (
        after.routes["b"].attempts,
        after.routes["b"].next_attempt_at,
        after.routes["b"].last_error,
    )


def test_backoff_doubles_up_to_the_cap_with_full_jitter() -> None:
    delays = []
    route = record.RouteState()
    for _ in range(12):
        after = run(state(a=route), {"a": RouteResult("temporary", "timed out")})
        route = after.routes["a"]
        delays.append(route.next_attempt_at - NOW)
    assert [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 600, 600] == delays
    half = plan(
        state(a=record.RouteState()),
        {"a": RouteResult("temporary")},
        now=NOW,
        retry_initial_seconds=8.0,
        retry_max_seconds=600.0,
        max_age_seconds=DAY,
        rand=lambda: 0.25,
    )
    assert NOW + 2.0 == half.routes["a"].next_attempt_at


def test_retry_after_is_honoured_when_longer_than_the_backoff() -> None:
    after = run(state(a=record.RouteState()), {"a": RouteResult("temporary", "HTTP 429", 120.0)})
    assert NOW + 120.0 == after.routes["a"].next_attempt_at


def test_permanent_and_unrouted_routes_become_dead_letters() -> None:
    after = run(
        state(a=record.RouteState(), b=record.RouteState(), c=record.RouteState()),
        {"a": RouteResult("permanent", "HTTP 410"), "b": RouteResult("unrouted")},
    )
    assert ["a", "b"] == after.dead
    assert ["c"] == after.pending
    assert "HTTP 410" == after.routes["a"].last_error
    assert "route no longer configured" == after.routes["b"].last_error


def test_an_open_circuit_defers_without_costing_an_attempt_even_past_the_max_age() -> None:
    old = record.State(
        routes={"a": record.RouteState(attempts=3)}, age_from=NOW - 10 * DAY, updated_at=0
    )
    after = run(old, {"a": RouteResult("paused", "circuit open", paused_until=NOW + 30)})
    assert ("pending", 3, NOW + 30, 1) == (
        after.routes["a"].status,
        after.routes["a"].attempts,
        after.routes["a"].next_attempt_at,
        after.deferrals,
    )


def test_a_message_expires_only_when_a_real_attempt_fails_after_the_max_age() -> None:
    young = record.State(routes={"a": record.RouteState()}, age_from=NOW - DAY, updated_at=0)
    assert ["a"] == run(young, {"a": RouteResult("temporary", "HTTP 503")}).pending
    old = record.State(
        routes={"a": record.RouteState(attempts=40)}, age_from=NOW - 6 * DAY, updated_at=0
    )
    after = run(old, {"a": RouteResult("temporary", "HTTP 503")})
    assert ["a"] == after.dead
    assert "expired after 41 attempts: HTTP 503" == after.routes["a"].last_error
    assert "done" == run(old, {"a": RouteResult("delivered")}).routes["a"].status


@pytest.mark.parametrize(
    ("attempt", "kind"),
    [
        (Attempt("delivered", 204, None, None, 0.1), "delivered"),
        (Attempt("permanent", 410, None, "HTTP 410", 0.1), "permanent"),
        (Attempt("retry", 503, 5.0, "HTTP 503", 0.1), "temporary"),
        (Attempt("timeout", None, None, "timed out after 1s", 1.0), "temporary"),
        (Attempt("connection_error", None, None, "connection refused", 0.0), "temporary"),
        (Attempt("circuit_open", None, None, "circuit open", 0.0), "paused"),
    ],
)
def test_webhook_attempts_map_to_route_results(attempt: Attempt, kind: str) -> None:
    result = RouteResult.from_attempt(attempt, paused_until=NOW + 5)
    assert kind == result.kind
    if kind == "temporary" and attempt.status == 503:
        assert 5.0 == result.retry_after_seconds
    if kind == "paused":
        assert NOW + 5 == result.paused_until


async def test_a_bug_while_building_the_payload_keeps_the_message_for_later(
    tmp_path: Path,
) -> None:
    """An unexpected error is never a drop: the file stays, the entry is looked at again."""
    metrics = Metrics(CollectorRegistry())
    spool = Spool(SpoolSettings(directory=tmp_path), metrics, environ={})  # type: ignore[call-arg]
    await spool.open()
    envelope = Envelope("a@x.test", ("b@y.test",), None, None, None)
    entry = await spool.accept(
        envelope=envelope, raw=b"Subject: x\r\n\r\n", routes={"a": ("b@y.test",)},
        webhook_id="msg_x", received_at=time.time(), carrier={},
    )  # fmt: skip

    def broken(header: record.Header, raw: bytes, routes: Sequence[str]) -> dict[str, bytes]:
        raise RuntimeError("a parser bug")

    client = WebhookClient(
        None,  # type: ignore[arg-type]  # never reached: building fails first
        breakers=Breakers(5, 30),
        permanent_statuses=(),
        metrics=metrics,
    )
    worker = Worker(
        spool, client, {"a": Target("a", "http://127.0.0.1:9/x")}, broken, workers=1,
        retry_initial_seconds=1, retry_max_seconds=10, max_age_seconds=DAY, metrics=metrics,
    )  # fmt: skip
    worker.start()
    deadline = time.monotonic() + 5
    while entry.due_at < time.time() + 30:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    await worker.stop(0)
    assert {entry.queue_id} == {p.name for p in (tmp_path / "queue").iterdir()}
    assert entry is spool.entries[entry.queue_id]
    await spool.close()


ROUTE_KINDS = [
    ("delivered",),
    ("delivered", "delivered"),
    ("delivered", "temporary"),
    ("permanent",),
    ("unrouted", "delivered"),
    ("paused",),
    ("delivered", None),
    ("delivered", "done"),
]


@pytest.mark.parametrize("kinds", ROUTE_KINDS)
def test_the_all_delivered_shortcut_agrees_with_plan(kinds: tuple[str | None, ...]) -> None:
    """The worker skips plan() only when plan() would leave nothing pending and nothing dead
    (None: a pending route not attempted; "done": a route delivered earlier)."""
    routes = {
        f"r{n}": record.RouteState(status="done" if kind == "done" else "pending")
        for n, kind in enumerate(kinds)
    }
    results = {
        f"r{n}": RouteResult(kind)  # type: ignore[arg-type]
        for n, kind in enumerate(kinds)
        if kind not in (None, "done")
    }
    before = state(**routes)
    after = run(before, results)
    assert (not after.pending and not after.dead) == _all_done(before, results)
