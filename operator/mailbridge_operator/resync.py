"""The periodic resync: one task per operator that reconciles every MailBridge now and then.

Watchers reconcile a MailBridge when it or a watched child changes; the resync
catches what they cannot see: ServiceMonitors (not watched, their CRD may be
absent), a status that only time changes (a stuck rollout), a pass that failed
with no event left to retry it. A MailBridge is *due* when no pass — from a
handler, a watcher or this loop — has ended for it for ``interval_seconds``.

Why not ``@kopf.timer``: kopf keeps its finalizer on every object a timer or
daemon serves (it must see the deletion to stop them), so no MailBridge could be
deleted while no operator runs. This loop belongs to the operator, not to the
objects: the handlers start it on startup and cancel it on cleanup, and kopf
adds no finalizer for it (nor supervises it: a kopf probe, ``resync``, makes
``/healthz`` fail if it stops).

:class:`Schedule` is pure (the caller passes ``now``, a monotonic clock);
:func:`run` is the loop, with the clock, the sleep and the reconciliation passed
in. Known limit: kopf's peering (``--peering``) pauses kopf's watchers, not this
loop, so a paused replica still resyncs (idempotent: a pass writes nothing when
nothing drifted).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

Key = tuple[str, str]  # (namespace, name)

DEFAULT_INTERVAL_SECONDS = 60.0  # mailbridge-operator --resync-interval
MIN_WAIT_SECONDS = 0.05  # never spin, even when a pass is due again at once


class Schedule:
    """When each MailBridge last had a pass, and which are due for another."""

    def __init__(self, interval_seconds: float) -> None:
        if interval_seconds <= 0:
            raise ValueError("the resync interval must be positive")
        self.interval_seconds = interval_seconds
        self._last: dict[Key, float] = {}

    def __len__(self) -> int:
        """How many MailBridges it tracks."""
        return len(self._last)

    def passed(self, key: Key, now: float) -> None:
        """A pass for ``key`` ended at ``now`` (whoever ran it, whatever its outcome)."""
        self._last[key] = now

    def due(self, keys: Iterable[Key], now: float) -> tuple[list[Key], float]:
        """The keys without a pass for an interval (sorted), and seconds until the next is due.

        ``keys`` are the MailBridges that exist now: a key seen for the first time
        counts as passed now (kopf's create or resume handler reconciles it), a
        key no longer given is forgotten.
        """
        present = set(keys)
        for gone in self._last.keys() - present:
            del self._last[gone]
        for new in present - self._last.keys():
            self._last[new] = now
        due = sorted(key for key in present if now - self._last[key] >= self.interval_seconds)
        waits = [self._last[key] + self.interval_seconds - now for key in present if key not in due]
        return due, min(waits, default=self.interval_seconds)


async def run(
    schedule: Schedule,
    keys: Callable[[], Iterable[Key]],
    reconcile: Callable[[Key], Awaitable[object]],
    *,
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    concurrency: int = 8,
) -> None:
    """Reconcile the due MailBridges, ``concurrency`` at a time, until cancelled.

    A failed pass is logged and counts as a pass: it is tried again an interval
    later (or sooner, when an event reconciles it), never in a tight loop.
    """
    limit = asyncio.Semaphore(concurrency)

    async def one(key: Key) -> None:
        async with limit:
            try:
                await reconcile(key)
            except Exception:
                logger.exception(
                    f"Resync of MailBridge {key[0]}/{key[1]} failed; "
                    f"next try in {schedule.interval_seconds:g} s."
                )
            finally:
                schedule.passed(key, clock())

    while True:
        due, wait = schedule.due(keys(), clock())
        if due:
            await asyncio.gather(*(one(key) for key in due))
            continue
        await sleep(max(wait, MIN_WAIT_SECONDS))
