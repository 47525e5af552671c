"""Sync mode: deliver one message to all its routes before the DATA reply.

:meth:`SyncDelivery.deliver` posts each route's body concurrently, retrying each
route a few times (full-jitter backoff, or the receiver's ``Retry-After`` when
it asks for longer), all inside one time budget, and folds the routes' fates
into one :class:`Result` for the SMTP layer:

- any route not delivered for now → ``temporary`` (``451 4.3.0``): the sending
  MTA retries the whole message with the same id; routes that already got it
  receive it again and de-duplicate on ``webhook-id``;
- else any route refused for good → ``permanent`` (``554 5.6.0``);
- else ``delivered`` (``250``).

A route stops retrying early, reporting ``temporary``, when its circuit is open
(the destination is paused: no request is made) or when the next wait would not
fit in what is left of the budget. Nothing is stored: in sync mode the MTA's
queue is the only queue.

Emits ``mailbridge_delivery_latency_seconds{route}`` (end of DATA → 2xx), plus
what :class:`~mailbridge.delivery.webhook.WebhookClient` emits per attempt.
Settings read (by the caller, passed in): ``delivery.sync_attempts``,
``delivery.sync_budget_seconds``, ``delivery.retry_initial_seconds``,
``delivery.retry_max_seconds``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from mailbridge import payload
from mailbridge.delivery import retry
from mailbridge.delivery.webhook import Attempt, Target, WebhookClient
from mailbridge.observability.metrics import Metrics

log = logging.getLogger(__name__)

#: Longest ``Result.detail``: it goes into an SMTP reply line (512 octets in all).
MAX_DETAIL_CHARS = 200

Outcome = Literal["delivered", "temporary", "permanent"]


@dataclass(frozen=True)
class Result:
    """The message's fate across all its routes."""

    outcome: Outcome
    #: Safe for an SMTP reply text, e.g. ``route billing: HTTP 503`` (no URL, no secret).
    detail: str


@dataclass
class _RouteFate:
    outcome: Outcome | None = None
    #: What the last finished attempt came to ("" before the first one ends).
    detail: str = ""
    attempts: int = 0


class SyncDelivery:
    """Delivers one message to its routes' webhooks within a time budget."""

    def __init__(
        self,
        client: WebhookClient,
        targets: Mapping[str, Target],
        *,
        attempts: int,
        budget_seconds: float,
        retry_initial_seconds: float,
        retry_max_seconds: float,
        metrics: Metrics,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts}")
        if budget_seconds <= 0:
            raise ValueError(f"budget_seconds must be positive, got {budget_seconds}")
        self._client = client
        self._targets = dict(targets)
        self._attempts = attempts
        self._budget = budget_seconds
        self._initial = retry_initial_seconds
        self._max = retry_max_seconds
        self._metrics = metrics
        self._sleep = sleep
        self._monotonic = monotonic
        self._rand = rand

    async def deliver(
        self,
        webhook_id: str,
        bodies: Mapping[str, bytes | payload.Document],
        *,
        accepted_monotonic: float,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Result:
        """POST ``bodies[route]`` to each route's webhook; never longer than the budget.

        ``webhook_id`` is the message's id; each route's request carries
        ``payload.delivery_id(webhook_id, route)``, the id inside its body.
        """
        if not bodies:
            return Result("delivered", "no routes")
        deadline = self._monotonic() + self._budget
        fates = {route: _RouteFate() for route in bodies}
        try:
            async with asyncio.timeout(self._budget):
                await asyncio.gather(
                    *(
                        self._deliver_route(
                            route,
                            webhook_id,
                            body,
                            fates[route],
                            deadline=deadline,
                            accepted_monotonic=accepted_monotonic,
                            extra_headers=extra_headers,
                        )
                        for route, body in bodies.items()
                    )
                )
        except TimeoutError:
            for fate in fates.values():
                if fate.outcome is None:
                    fate.outcome = "temporary"
                    fate.detail = (
                        f"{fate.detail}; then out of the {self._budget:g}s budget"
                        if fate.detail
                        else f"no answer within the {self._budget:g}s budget"
                    )
        result = _fold(fates)
        if result.outcome != "delivered":
            log.info(
                "sync delivery %s: %s",
                result.outcome,
                result.detail,
                extra={"webhook_id": webhook_id},
            )
        return result

    async def _deliver_route(
        self,
        route: str,
        webhook_id: str,
        body: bytes | payload.Document,
        fate: _RouteFate,
        *,
        deadline: float,
        accepted_monotonic: float,
        extra_headers: Mapping[str, str] | None,
    ) -> None:
        target = self._targets.get(route)
        if target is None:  # a wiring bug; never turn it into a bounce
            log.error("no webhook target for route %s", route)
            fate.outcome, fate.detail = "temporary", "route not configured"
            return
        for number in range(1, self._attempts + 1):
            fate.attempts = number
            attempt = await self._client.post(
                target, payload.delivery_id(webhook_id, route), body, extra_headers=extra_headers
            )
            fate.detail = _describe(attempt, number)
            if attempt.outcome == "delivered":
                latency = max(0.0, self._monotonic() - accepted_monotonic)
                self._metrics.observe_delivery_latency(route, latency)
                fate.outcome = "delivered"
                return
            if attempt.outcome == "permanent":
                fate.outcome = "permanent"
                return
            if attempt.outcome == "circuit_open" or number == self._attempts:
                fate.outcome = "temporary"
                return
            delay = retry.backoff(
                number,
                initial_seconds=self._initial,
                max_seconds=self._max,
                rand=self._rand(),
            )
            if attempt.retry_after_seconds is not None:
                delay = max(delay, attempt.retry_after_seconds)
            if delay >= deadline - self._monotonic():
                fate.outcome = "temporary"
                fate.detail += f"; next try in {delay:.1f}s is past the budget"
                return
            await self._sleep(delay)


def _describe(attempt: Attempt, number: int) -> str:
    text = attempt.describe()
    if attempt.outcome == "retry" and attempt.retry_after_seconds is not None:
        text += f", retry after {attempt.retry_after_seconds:g}s"
    return text if number == 1 else f"{text} (attempt {number})"


def _fold(fates: Mapping[str, _RouteFate]) -> Result:
    order: tuple[Outcome, ...] = ("temporary", "permanent")
    for outcome in order:
        failed = [(route, fate) for route, fate in fates.items() if fate.outcome == outcome]
        if failed:
            detail = "; ".join(f"route {route}: {fate.detail}" for route, fate in failed)
            return Result(outcome, _clip(detail))
    return Result("delivered", _clip("delivered to " + ", ".join(fates)))


def _clip(text: str) -> str:
    text = " ".join(text.split())  # one line, whatever a detail held
    return text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 3] + "..."
