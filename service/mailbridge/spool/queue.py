"""The running bridge's view of its spool: index, limits, schedule, upkeep, metrics.

:class:`Spool` is what the rest of the bridge talks to. Ingress calls
:meth:`Spool.has_room` (at MAIL) and :meth:`Spool.accept` (at the end of DATA:
returns only once the message is durable). The delivery worker takes due
entries (:meth:`Spool.pop_due`) and reports their fate with :meth:`Spool.claim`,
:meth:`Spool.defer`, :meth:`Spool.bury`, :meth:`Spool.finish`.

It keeps, in memory, every message in queue/, active/ and dead/ (no payloads,
except the raw bytes of fresh messages while they fit in :data:`RAW_CACHE_BYTES`)
and a heap of due times. Upkeep (:meth:`Spool.maintain`, a task): every second
it takes manual retries from incoming/; every :data:`RECONCILE_SECONDS` it
drops entries whose files a ``mailbridge spool purge`` removed; every
:data:`PROBE_SECONDS` it proves the directory writable (a write + sync + unlink)
for ``/readyz``.

Limits: ``spool.max_messages`` and ``spool.max_bytes`` count every message in
the spool, dead letters included, plus the messages being written now.

Emits ``mailbridge_spool_messages{state}``, ``mailbridge_spool_size_bytes``,
``mailbridge_spool_oldest_message_age_seconds`` (computed at scrape time),
``mailbridge_spool_corrupt_files_total`` and the spool limit gauges.
Reads the ``spool`` settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from mailbridge.config import SpoolSettings
from mailbridge.observability.metrics import Metrics
from mailbridge.payload import Envelope
from mailbridge.spool import record
from mailbridge.spool.commit import Committer, WriteFailed
from mailbridge.spool.store import (
    ACTIVE,
    DEAD,
    INCOMING,
    QUEUE,
    Entry,
    Store,
    is_disk_full,
    new_queue_id,
)

log = logging.getLogger("mailbridge.spool")

#: Raw bytes of fresh messages kept in memory for their first delivery.
RAW_CACHE_BYTES = 64 * 1024 * 1024
#: How often manual retries (incoming/) are picked up.
INCOMING_SECONDS = 1.0
#: How often the index is checked against the directories (purged files).
RECONCILE_SECONDS = 10.0
#: How often the directory is proven writable.
PROBE_SECONDS = 5.0
#: How long one count of the spool's states serves the metrics.
CENSUS_SECONDS = 1.0
#: Rough bytes of a spool file beyond the raw message (header, end marker).
OVERHEAD_BYTES = 1024


class Full(Exception):
    """No room: the spool is at ``max_messages`` or ``max_bytes`` (or the disk is full)."""


class Spool:
    """The spool of the running bridge; build, then :meth:`open` inside the event loop."""

    def __init__(
        self,
        settings: SpoolSettings,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.store = Store(
            Path(settings.directory), clock=clock, on_corrupt=metrics.spool_corrupt.inc
        )
        self._environ = environ
        self.committer: Committer | None = None
        self.entries: dict[str, Entry] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._due_seq: dict[str, int] = {}
        self._seq = itertools.count()
        self._bytes = 0
        self._reserved_messages = 0
        self._reserved_bytes = 0
        self._cached_raw_bytes = 0
        #: Set whenever something became due earlier than before (the worker waits on it).
        self.changed = asyncio.Event()
        #: False after a failed write until a write succeeds again (``/readyz``).
        self.writable = True
        self._tasks: list[asyncio.Task[None]] = []
        #: Files of delivered messages to remove once no committer can (closed, not open).
        self._removals: list[str | Path] = []
        self._census_cache: tuple[float, dict[str, float]] | None = None

    # --- lifecycle --------------------------------------------------------------

    async def open(self) -> None:
        """Lock the directory, recover what a previous run left, start the committer."""
        await asyncio.to_thread(self.store.lock)
        found = await asyncio.to_thread(self.store.recover)
        for entry in found.entries:
            self._add(entry)
        self.committer = Committer(self.store, fsync=self.settings.fsync, environ=self._environ)
        self._tasks = [asyncio.create_task(self.committer.run(), name="spool-commit")]
        self._publish()
        log.info(
            "spool opened",
            extra={
                "directory": str(self.store.root),
                "messages": len(self.entries),
                "dead": sum(1 for e in self.entries.values() if e.where == DEAD),
                "returned_from_active": found.returned_from_active,
                "retried": found.retried,
                "corrupt": len(found.corrupt),
                "fsync": self.settings.fsync,
            },
        )

    async def close(self) -> None:
        """Finish commits in progress, stop the committer, release the lock."""
        if self.committer is not None:
            await self.committer.close()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.committer is not None:
            await asyncio.to_thread(self.committer.shutdown)
            self._removals += self.committer.take_removals()
        await asyncio.to_thread(_unlink_all, self._removals)
        self._removals = []
        self.store.unlock()

    def _publish(self) -> None:
        m = self.metrics
        m.limit_spool_size.set(self.settings.max_bytes)
        m.limit_spool_messages.set(self.settings.max_messages)
        for state in ("queued", "deferred", "inflight", "dead"):
            m.spool_messages.labels(state).set_function(lambda s=state: self.count(s))
        m.spool_size.set_function(lambda: float(self._bytes))
        m.spool_oldest_age.set_function(self.oldest_age)

    # --- what is in it ------------------------------------------------------------

    def count(self, state: str) -> float:
        """Messages in ``state`` (queued, deferred, inflight, dead) now."""
        return float(self._census()[state])

    def oldest_age(self) -> float:
        """Seconds the oldest message not yet dead has waited (0 when none)."""
        return self._census()["oldest_age"]

    def _census(self) -> dict[str, float]:
        """One pass over the index, reused for :data:`CENSUS_SECONDS` (a scrape reads
        five gauges; a spool can hold 100,000 entries)."""
        now = self.clock()
        if self._census_cache is not None and now - self._census_cache[0] < CENSUS_SECONDS:
            return self._census_cache[1]
        counts = {"queued": 0.0, "deferred": 0.0, "inflight": 0.0, "dead": 0.0}
        oldest = now
        for entry in self.entries.values():
            if entry.where == DEAD:
                counts["dead"] += 1
                continue
            oldest = min(oldest, entry.header.received_at)
            if entry.where == ACTIVE or entry.busy:
                counts["inflight"] += 1
            elif entry.due_at <= now:
                counts["queued"] += 1
            else:
                counts["deferred"] += 1
        census = {**counts, "oldest_age": max(0.0, now - oldest)}
        self._census_cache = (now, census)
        return census

    @property
    def used_bytes(self) -> int:
        return self._bytes

    def has_room(self, size_bytes: int = 0) -> bool:
        messages = len(self.entries) + self._reserved_messages + 1
        size = self._bytes + self._reserved_bytes + size_bytes + OVERHEAD_BYTES
        return messages <= self.settings.max_messages and size <= self.settings.max_bytes

    # --- ingress --------------------------------------------------------------------

    async def accept(
        self,
        *,
        envelope: Envelope,
        raw: bytes,
        routes: Mapping[str, tuple[str, ...]],
        webhook_id: str,
        received_at: float,
        carrier: Mapping[str, str],
    ) -> Entry:
        """Make the message durable and queue it. :class:`Full` or :class:`WriteFailed`."""
        assert self.committer is not None, "spool not open"
        if not self.has_room(len(raw)):
            raise Full("spool full")
        header = record.Header(
            queue_id=new_queue_id(received_at),
            webhook_id=webhook_id,
            received_at=received_at,
            envelope=envelope,
            routes=dict(routes),
            carrier=dict(carrier),
            size_bytes=len(raw),
        )
        self._reserved_messages += 1
        self._reserved_bytes += len(raw) + OVERHEAD_BYTES
        try:
            size = await self.committer.commit(header, raw)
        except WriteFailed as failed:
            self.writable = False
            log.error("spool write failed", extra={"error": str(failed)})
            if is_disk_full(failed.error):
                raise Full(str(failed)) from None
            raise
        finally:
            self._reserved_messages -= 1
            self._reserved_bytes -= len(raw) + OVERHEAD_BYTES
        self.writable = True
        entry = Entry(header, record.State.initial(header), QUEUE, size)
        if self._cached_raw_bytes + len(raw) <= RAW_CACHE_BYTES:
            entry.raw = raw
            self._cached_raw_bytes += len(raw)
        self._add(entry)
        return entry

    # --- schedule -----------------------------------------------------------------------

    def _add(self, entry: Entry) -> None:
        old = self.entries.get(entry.queue_id)
        if old is not None:
            self._bytes -= old.file_bytes
            self._drop_raw(old)
        self.entries[entry.queue_id] = entry
        self._bytes += entry.file_bytes
        if entry.where == QUEUE:
            self.schedule(entry, entry.state.next_attempt_at or self.clock())

    def schedule(self, entry: Entry, due_at: float) -> None:
        """(Re)schedule ``entry`` for ``due_at``; earlier plans for it are void."""
        seq = next(self._seq)
        entry.due_at = due_at
        entry.busy = False
        self._due_seq[entry.queue_id] = seq
        heapq.heappush(self._heap, (due_at, seq, entry.queue_id))
        self.changed.set()

    def next_due_at(self) -> float | None:
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> Entry | None:
        """The next entry due at ``now`` (still in queue/), or ``None``."""
        while True:
            self._drop_stale()
            if not self._heap or self._heap[0][0] > now:
                return None
            _, _, queue_id = heapq.heappop(self._heap)
            del self._due_seq[queue_id]
            entry = self.entries.get(queue_id)
            if entry is not None and entry.where == QUEUE:
                entry.busy = True  # in the worker's hands until rescheduled or gone
                return entry

    def _drop_stale(self) -> None:
        heap = self._heap
        while heap and self._due_seq.get(heap[0][2]) != heap[0][1]:
            heapq.heappop(heap)

    # --- the worker's moves ------------------------------------------------------------------

    async def claim(self, entry: Entry) -> bool:
        """Take ``entry`` for delivery; False if its file vanished (purged from outside).

        A fresh message (accepted by this process, bytes still in memory) makes its
        first attempt from queue/: no rename on the hot path. Any later attempt moves
        the file queue/ → active/ first (in a thread: with syncs in flight a rename
        can wait on the file system's journal).
        """
        if entry.raw is not None and entry.where == QUEUE and entry.state.attempts == 0:
            return True
        if await asyncio.to_thread(self.store.claim, entry):
            return True
        self._forget(entry)
        return False

    def read_raw(self, entry: Entry) -> bytes:
        return self.store.read_raw(entry)

    async def defer(self, entry: Entry, state: record.State) -> None:
        """Record ``state`` and put the entry back in queue/, due at its next attempt."""
        if await self._record(entry, state, QUEUE):
            self.schedule(entry, state.next_attempt_at or self.clock())

    def release(self, entry: Entry) -> None:
        """Back to queue/ unchanged (shutdown cut the delivery short): due now."""
        with contextlib.suppress(OSError):
            self.store.move(entry, QUEUE)
            self.schedule(entry, self.clock())

    async def bury(self, entry: Entry, state: record.State) -> None:
        """Record ``state`` and move the entry to dead/ (kept until retried or purged)."""
        if await self._record(entry, state, DEAD):
            entry.busy = False

    async def _record(self, entry: Entry, state: record.State, where: str) -> bool:
        self._drop_raw(entry)
        try:
            self._bytes += await asyncio.to_thread(self._record_and_move, entry, state, where)
        except FileNotFoundError:
            # Moved from the command line during a first attempt (see claim): its
            # new owner (incoming/ → a manual retry, or a purge) decides.
            self._forget(entry)
            return False
        return True

    def finish(self, entry: Entry) -> None:
        """Every route delivered: forget it now, remove its file soon (the committer's
        thread does it after its next sync round, in a batch).

        A crash before the removal only delivers it again, with the same id.
        """
        self._forget(entry)
        path = self.store.file(entry.where, entry.queue_id)
        if self.committer is not None:
            self.committer.remove(path, entry.file_bytes)
        else:
            self._removals.append(path)

    def _record_and_move(self, entry: Entry, state: record.State, where: str) -> int:
        """In a thread: append ``state``, move the file; returns the change in bytes."""
        before = entry.file_bytes
        entry.state = state
        self.store.append_state(entry)
        if entry.where != where:
            self.store.move(entry, where)
        return entry.file_bytes - before

    def _forget(self, entry: Entry) -> None:
        if self.entries.get(entry.queue_id) is entry:
            del self.entries[entry.queue_id]
            self._bytes -= entry.file_bytes
            self._due_seq.pop(entry.queue_id, None)
        self._drop_raw(entry)

    def _drop_raw(self, entry: Entry) -> None:
        if entry.raw is not None:
            self._cached_raw_bytes -= len(entry.raw)
            entry.raw = None

    # --- upkeep --------------------------------------------------------------------------------

    async def maintain(self) -> None:
        """Run forever (cancel to stop): manual retries, reconciling, the writability probe."""
        last_reconcile = last_probe = time.monotonic()
        while True:
            await asyncio.sleep(INCOMING_SECONDS)
            try:
                await self._take_incoming()
                now = time.monotonic()
                if now - last_reconcile >= RECONCILE_SECONDS:
                    last_reconcile = now
                    await self._reconcile()
                if now - last_probe >= PROBE_SECONDS:
                    last_probe = now
                    await self.probe()
            except Exception:
                log.exception("spool upkeep failed")

    async def probe(self) -> bool:
        try:
            await asyncio.to_thread(self.store.probe, fsync=self.settings.fsync)
        except OSError as error:
            if self.writable:
                log.error("spool not writable", extra={"error": error.strerror or str(error)})
            self.writable = False
        else:
            if not self.writable:
                log.info("spool writable again")
            self.writable = True
        return self.writable

    async def _take_incoming(self) -> None:
        names = self.store.names(INCOMING)
        for queue_id in sorted(names):
            entry = await asyncio.to_thread(self.store.load, INCOMING, queue_id)
            if entry is None:
                continue  # damaged (set aside and counted) or purged meanwhile
            old = self.entries.get(queue_id)
            if old is not None and old.where == ACTIVE:
                continue  # cannot happen (the CLI never touches active/); be safe
            try:
                self.store.take_incoming(entry)
            except FileNotFoundError:
                continue  # purged from the command line meanwhile
            self._add(entry)
            log.info("manual retry queued", extra={"queue_id": queue_id})

    async def _reconcile(self) -> None:
        present = {
            where: await asyncio.to_thread(self.store.names, where) for where in (QUEUE, DEAD)
        }
        for entry in list(self.entries.values()):
            # The listing may predate a move; only the disk now can tell.
            if (
                not entry.busy
                and entry.where in present
                and entry.queue_id not in present[entry.where]
                and not self.store.path(entry.where, entry.queue_id).exists()
            ):
                log.info("spool entry removed from outside", extra={"queue_id": entry.queue_id})
                self._forget(entry)


def _unlink_all(paths: list[str | Path]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # noqa: PTH108
