"""Spool mode delivery: take due messages from the spool and POST them, route by route.

One dispatcher task pops due entries off the spool's schedule and hands them to
``spool.delivery_workers`` worker tasks (bounded concurrency). A worker claims
the entry (queue/ → active/), builds the bodies of the routes that are due
(the spooled raw message, parsed again: the id and ``received_at`` come from
the spool, so the payload is the same on every attempt; each route's
``webhook-id`` is ``payload.delivery_id(message id, route)``), posts them
concurrently, and folds the answers into the entry's new state with
:func:`plan` (pure, clock passed in):

- 2xx → the route is done (it is never posted again);
- a permanent status (``delivery.permanent_statuses``) or a route no longer
  configured → the route is dead (a dead letter, counted, kept);
- anything else → attempt ``n`` failed: next try after full-jitter backoff
  (``delivery.retry_*``), or the receiver's ``Retry-After`` when longer. Once
  ``spool.max_age_seconds`` have passed since acceptance (or a manual retry),
  a failed real attempt makes the route dead: mail never expires unattempted;
- an open circuit → the route waits for the circuit's trial time, costing no
  attempt. When every due route's circuit is open, the dispatcher reschedules
  the entry in memory without touching the disk.

Then: nothing pending → the file is removed (all done) or moved to dead/ (some
route dead); else the state is appended and the entry goes back to queue/.

Shutdown (:meth:`Worker.stop`): no new deliveries; attempts in flight get
``spool.shutdown_grace_seconds``, then are cancelled and their entries go back
to queue/ unchanged (delivered again after the restart, same ``webhook-id``).

Emits ``mailbridge_dead_letters_total{route}`` and
``mailbridge_delivery_latency_seconds{route}`` (acceptance → 2xx, across
restarts), plus what :class:`~mailbridge.delivery.webhook.WebhookClient` emits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from mailbridge import payload
from mailbridge.delivery import retry
from mailbridge.delivery.webhook import Attempt, Target, WebhookClient
from mailbridge.observability.metrics import Metrics
from mailbridge.spool import record
from mailbridge.spool.queue import Spool
from mailbridge.spool.store import Entry

log = logging.getLogger("mailbridge.delivery")

#: Longest the dispatcher sleeps without looking at the schedule again.
IDLE_SECONDS = 1.0
#: A half-open circuit's trial is taken by another message: look again this much later.
TRIAL_BUSY_SECONDS = 1.0
#: Jitter added to circuit wake-ups, so paused messages do not all wake at once.
CIRCUIT_JITTER_SECONDS = 1.0
#: After an unexpected error (a bug) in delivering a message, look at it again this much later.
UNEXPECTED_RETRY_SECONDS = 60.0
#: A route's last error is kept this short (it is shown by ``mailbridge spool list``).
MAX_ERROR_CHARS = 300

Kind = Literal["delivered", "permanent", "temporary", "paused", "unrouted"]
#: Builds one payload per route name from a spooled message (encoded, or a
#: :class:`~mailbridge.payload.Document` the webhook client streams; a big message's
#: build runs in a thread).
BuildBodies = Callable[
    [record.Header, bytes, Sequence[str]], Mapping[str, bytes] | Mapping[str, payload.Document]
]


@dataclass(frozen=True)
class RouteResult:
    """What one route's attempt came to, as :func:`plan` needs it."""

    kind: Kind
    error: str = ""
    retry_after_seconds: float | None = None
    #: For ``paused``: when the circuit lets a trial through (Unix time).
    paused_until: float | None = None

    @classmethod
    def from_attempt(cls, attempt: Attempt, paused_until: float | None) -> RouteResult:
        if attempt.outcome == "delivered":
            return cls("delivered")
        if attempt.outcome == "permanent":
            return cls("permanent", attempt.describe())
        if attempt.outcome == "circuit_open":
            return cls("paused", attempt.describe(), paused_until=paused_until)
        return cls("temporary", attempt.describe(), attempt.retry_after_seconds)


def plan(
    state: record.State,
    results: Mapping[str, RouteResult],
    *,
    now: float,
    retry_initial_seconds: float,
    retry_max_seconds: float,
    max_age_seconds: float,
    rand: Callable[[], float],
) -> record.State:
    """The state after ``results`` (routes not in ``results`` are unchanged)."""
    routes = dict(state.routes)
    deferrals = state.deferrals
    for name, result in results.items():
        route = routes[name]
        error = result.error[:MAX_ERROR_CHARS]
        if result.kind == "delivered":
            routes[name] = replace(route, status="done", attempts=route.attempts + 1)
        elif result.kind == "permanent":
            routes[name] = replace(
                route, status="dead", attempts=route.attempts + 1, last_error=error
            )
        elif result.kind == "unrouted":
            routes[name] = replace(route, status="dead", last_error="route no longer configured")
        elif result.kind == "paused":
            deferrals += 1
            until = result.paused_until if result.paused_until is not None else now
            routes[name] = replace(route, next_attempt_at=max(until, now), last_error=error)
        else:
            attempts = route.attempts + 1
            if now - state.age_from >= max_age_seconds:
                expired = f"expired after {attempts} attempts: {error}"[:MAX_ERROR_CHARS]
                routes[name] = replace(route, status="dead", attempts=attempts, last_error=expired)
                continue
            delay = retry.backoff(
                attempts,
                initial_seconds=retry_initial_seconds,
                max_seconds=retry_max_seconds,
                rand=rand(),
            )
            if result.retry_after_seconds is not None:
                delay = max(delay, result.retry_after_seconds)
            routes[name] = replace(
                route, attempts=attempts, next_attempt_at=now + delay, last_error=error
            )
    return replace(state, routes=routes, updated_at=now, deferrals=deferrals)


def _all_done(state: record.State, results: Mapping[str, RouteResult]) -> bool:
    """True when ``results`` deliver every route still pending (what :func:`plan` would
    turn into a state with nothing pending and nothing dead)."""
    for name, route in state.routes.items():
        result = results.get(name)
        if result is None:
            if route.status != "done":
                return False
        elif result.kind != "delivered" or route.status != "pending":
            return False
    return True


class Worker:
    """Delivers spooled messages until stopped."""

    def __init__(
        self,
        spool: Spool,
        client: WebhookClient,
        targets: Mapping[str, Target],
        build_bodies: BuildBodies,
        *,
        workers: int,
        retry_initial_seconds: float,
        retry_max_seconds: float,
        max_age_seconds: float,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._spool = spool
        self._client = client
        self._targets = dict(targets)
        self._build = build_bodies
        self._workers = workers
        self._initial = retry_initial_seconds
        self._max = retry_max_seconds
        self._max_age = max_age_seconds
        self._metrics = metrics
        self._clock = clock
        self._monotonic = monotonic
        self._rand = rand
        self._ready: asyncio.Queue[Entry] = asyncio.Queue(maxsize=1)
        self._tasks: list[asyncio.Task[None]] = []
        self._busy: set[asyncio.Task[None]] = set()
        self._dispatcher: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._dispatcher = asyncio.create_task(self._dispatch(), name="spool-dispatch")
        self._tasks = [
            asyncio.create_task(self._work(), name=f"spool-worker-{n}")
            for n in range(self._workers)
        ]

    @property
    def in_flight(self) -> int:
        return len(self._busy)

    async def stop(self, grace_seconds: float) -> None:
        """Stop taking messages; give deliveries in flight ``grace_seconds``; cancel the rest."""
        self._stopping = True
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        for task in self._tasks:
            if task not in self._busy:
                task.cancel()
        busy = set(self._busy)
        if busy:
            log.info("waiting for deliveries in flight", extra={"count": len(busy)})
            _done, late = await asyncio.wait(busy, timeout=grace_seconds)
            if late:
                log.info("cancelling deliveries in flight", extra={"count": len(late)})
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- scheduling ---------------------------------------------------------------

    async def _dispatch(self) -> None:
        spool = self._spool
        loop = asyncio.get_running_loop()
        # One wake-up timer at a time, kept while it is early enough: a fresh message
        # wakes the dispatcher through ``spool.changed`` without a timeout scope
        # (a timer scheduled and cancelled) per message.
        timer: asyncio.TimerHandle | None = None
        try:
            while True:
                spool.changed.clear()
                now = self._clock()
                entry = spool.pop_due(now)
                if entry is None:
                    next_due = spool.next_due_at()
                    timeout = (
                        IDLE_SECONDS if next_due is None else min(next_due - now, IDLE_SECONDS)
                    )
                    if timeout > 0:
                        wake_at = loop.time() + timeout
                        if timer is None or not loop.time() < timer.when() <= wake_at:
                            if timer is not None:
                                timer.cancel()
                            timer = loop.call_at(wake_at, spool.changed.set)
                        await spool.changed.wait()
                    continue
                await self._hand_over(entry, now)
        finally:
            if timer is not None:
                timer.cancel()

    async def _hand_over(self, entry: Entry, now: float) -> None:
        paused_until = self._paused_until(entry, now)
        if paused_until is not None:
            self._spool.schedule(entry, paused_until)  # in memory: the disk need not know
            return
        await self._ready.put(entry)

    def _due_routes(self, entry: Entry, now: float) -> list[str]:
        routes = entry.state.routes
        return [name for name in entry.state.pending if routes[name].next_attempt_at <= now]

    def _paused_until(self, entry: Entry, now: float) -> float | None:
        """When every due route's circuit is open: the earliest trial time; else ``None``."""
        mono: float | None = None
        wake: list[float] = []
        for name in self._due_routes(entry, now):
            target = self._targets.get(name)
            if target is None:
                return None
            breaker = self._client.breakers.get(target.destination)
            retry_at = breaker.retry_at()
            if retry_at is None:  # not open (the usual case: no clock read)
                return None
            mono = self._monotonic() if mono is None else mono
            if breaker.state_at(mono) != "open":
                return None
            wake.append(now + (retry_at - mono))
        if not wake:
            return None
        return min(wake) + self._rand() * CIRCUIT_JITTER_SECONDS

    # --- delivering ---------------------------------------------------------------------

    async def _work(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        while not self._stopping:
            entry = await self._ready.get()
            self._busy.add(task)
            try:
                await self._deliver(entry)
            except asyncio.CancelledError:
                if entry.where == "active":
                    self._spool.release(entry)
                raise
            except Exception:
                # A bug, not the receiver: keep the message and look again later.
                log.exception("delivery failed unexpectedly", extra={"queue_id": entry.queue_id})
                self._spool.release(entry)
                self._spool.schedule(entry, self._clock() + UNEXPECTED_RETRY_SECONDS)
            finally:
                self._busy.discard(task)

    async def _deliver(self, entry: Entry) -> None:
        spool = self._spool
        if not await spool.claim(entry):
            return  # purged or retried from the command line meanwhile
        header = entry.header
        due = self._due_routes(entry, self._clock())
        results: dict[str, RouteResult] = {}
        routed = [name for name in due if name in self._targets]
        for name in due:
            if name not in self._targets:
                results[name] = RouteResult("unrouted")
        if routed:
            try:
                raw = (
                    entry.raw
                    if entry.raw is not None
                    else await asyncio.to_thread(spool.read_raw, entry)
                )
                bodies = (
                    await asyncio.to_thread(self._build, header, raw, routed)
                    if len(raw) > 256 * 1024
                    else self._build(header, raw, routed)
                )
            except (record.Damaged, OSError) as error:
                log.error(
                    "spooled message unreadable",
                    extra={"queue_id": entry.queue_id, "error": str(error)},
                )
                spool.store.set_aside(entry.where, entry.queue_id, str(error))
                spool.finish(entry)
                return
            posts = [
                self._client.post(
                    self._targets[name],
                    payload.delivery_id(header.webhook_id, name),
                    bodies[name],
                    link_to=header.carrier or None,
                )
                for name in routed
            ]
            # One route (the common case): no task per post.
            attempts = [await posts[0]] if len(posts) == 1 else await asyncio.gather(*posts)
            for name, attempt in zip(routed, attempts, strict=True):
                results[name] = RouteResult.from_attempt(attempt, self._trial_time(name))
        await self._settle(entry, results)

    def _trial_time(self, route: str) -> float:
        breaker = self._client.breakers.get(self._targets[route].destination)
        retry_at = breaker.retry_at()
        now, mono = self._clock(), self._monotonic()
        if retry_at is None:  # half-open, its trial taken by another message
            return now + TRIAL_BUSY_SECONDS + self._rand() * CIRCUIT_JITTER_SECONDS
        return now + max(0.0, retry_at - mono) + self._rand() * CIRCUIT_JITTER_SECONDS

    async def _settle(self, entry: Entry, results: Mapping[str, RouteResult]) -> None:
        now = self._clock()
        before = entry.state
        if _all_done(before, results):  # the common case: no new state to compute or record
            header = entry.header
            for name in results:
                self._metrics.delivery_latency.labels(name).observe(
                    max(0.0, now - header.received_at)
                )
            self._spool.finish(entry)
            log.info(
                "message delivered",
                extra={"queue_id": header.queue_id, "message_id": header.webhook_id},
            )
            return
        state = plan(
            before,
            results,
            now=now,
            retry_initial_seconds=self._initial,
            retry_max_seconds=self._max,
            max_age_seconds=self._max_age,
            rand=self._rand,
        )
        header = entry.header
        for name, result in results.items():
            if result.kind == "delivered":
                self._metrics.delivery_latency.labels(name).observe(
                    max(0.0, now - header.received_at)
                )
            elif state.routes[name].status == "dead":
                self._metrics.dead_letters.labels(name).inc()
                log.warning(
                    "dead letter",
                    extra={
                        "queue_id": header.queue_id,
                        "message_id": header.webhook_id,
                        "route": name,
                        "error": state.routes[name].last_error,
                    },
                )
        if state.pending:
            await self._spool.defer(entry, state)
            log.info(
                "delivery deferred",
                extra={
                    "queue_id": header.queue_id,
                    "message_id": header.webhook_id,
                    "routes": state.pending,
                    "error": state.last_error,
                },
            )
        elif state.dead:
            await self._spool.bury(entry, state)
        else:
            self._spool.finish(entry)
            log.info(
                "message delivered",
                extra={"queue_id": header.queue_id, "message_id": header.webhook_id},
            )
