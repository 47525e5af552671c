"""resync: which MailBridges are due for a periodic pass, the loop that runs them, and the
liveness probe that reports on it.

On a fake clock: the loop's sleep advances it, so no test waits for real time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import kopf
import pytest

from mailbridge_operator import handlers, resync

A, B, C = ("mail", "a"), ("mail", "b"), ("other", "c")

pytestmark = pytest.mark.timeout(10)


def test_a_new_mailbridge_is_due_one_interval_after_it_was_first_seen() -> None:
    schedule = resync.Schedule(60)
    assert ([], 60) == schedule.due([A], now=100)
    assert ([], 1) == schedule.due([A], now=159)
    assert ([A], 60) == schedule.due([A], now=160)


def test_a_pass_from_any_handler_postpones_the_next_resync() -> None:
    schedule = resync.Schedule(60)
    schedule.due([A, B], now=0)
    schedule.passed(A, now=50)  # a watcher reconciled A
    assert ([B], 50) == schedule.due([A, B], now=60)
    schedule.passed(B, now=61)
    assert ([], 49) == schedule.due([A, B], now=61)
    assert ([A], 11) == schedule.due([A, B], now=110)


def test_a_deleted_mailbridge_is_forgotten() -> None:
    schedule = resync.Schedule(60)
    schedule.due([A, B], now=0)
    assert ([B], 60) == schedule.due([B], now=60)
    # Recreated under the same name: a new object, due an interval after it reappears.
    assert ([], 60) == schedule.due([A], now=61)


def test_the_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        resync.Schedule(0)


class FakeTime:
    """A monotonic clock that only the loop's sleep moves; stops the loop after ``limit``."""

    def __init__(self, limit: float) -> None:
        self.now = 1000.0
        self.limit = limit
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.now + seconds > self.limit:
            raise asyncio.CancelledError  # how the operator's cleanup ends the loop
        self.now += seconds


async def test_the_loop_reconciles_each_mailbridge_once_per_interval() -> None:
    time = FakeTime(limit=1000 + 3 * 60 + 30)
    passes: list[tuple[float, resync.Key]] = []

    async def reconcile(key: resync.Key) -> None:
        passes.append((time.now, key))

    with pytest.raises(asyncio.CancelledError):
        await resync.run(
            resync.Schedule(60),
            lambda: [A, C],
            reconcile,
            logger=logging.getLogger("test"),
            clock=time.clock,
            sleep=time.sleep,
        )
    assert [(1060, A), (1060, C), (1120, A), (1120, C), (1180, A), (1180, C)] == passes
    assert [60, 60, 60, 60] == time.sleeps


async def test_a_failing_pass_is_logged_and_retried_an_interval_later(
    caplog: pytest.LogCaptureFixture,
) -> None:
    time = FakeTime(limit=1000 + 2 * 60 + 30)
    passes: list[tuple[float, resync.Key]] = []

    async def reconcile(key: resync.Key) -> None:
        passes.append((time.now, key))
        if key == A:
            raise RuntimeError("the API is unreachable")

    with caplog.at_level(logging.ERROR), pytest.raises(asyncio.CancelledError):
        await resync.run(
            resync.Schedule(60),
            lambda: [A, B],
            reconcile,
            logger=logging.getLogger("test"),
            clock=time.clock,
            sleep=time.sleep,
        )
    assert [(1060, A), (1060, B), (1120, A), (1120, B)] == passes
    failures = [r for r in caplog.records if "Resync of MailBridge mail/a failed" in r.message]
    assert 2 == len(failures)
    assert "the API is unreachable" in (failures[0].exc_text or "")


async def test_passes_run_concurrently_up_to_the_limit() -> None:
    time = FakeTime(limit=1000 + 60 + 30)
    running, most = 0, 0
    keys = [("mail", str(n)) for n in range(10)]

    async def reconcile(key: resync.Key) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0)
        running -= 1

    with pytest.raises(asyncio.CancelledError):
        await resync.run(
            resync.Schedule(60),
            lambda: keys,
            reconcile,
            concurrency=3,
            logger=logging.getLogger("test"),
            clock=time.clock,
            sleep=time.sleep,
        )
    assert 3 == most


async def test_the_liveness_probe_fails_once_the_resync_has_stopped() -> None:
    """kopf supervises its timers; this task it does not, so /healthz reports on it."""
    memo = kopf.Memo(schedule=resync.Schedule(60))
    memo.schedule.due([A, B], now=0)
    memo.resync_task = asyncio.create_task(asyncio.sleep(3600))
    assert 2 == handlers.resync_running(memo=memo)
    memo.resync_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await memo.resync_task
    with pytest.raises(kopf.PermanentError, match="resync is not running"):
        handlers.resync_running(memo=memo)
