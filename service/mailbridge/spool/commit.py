"""Group commit: many sessions' messages made durable with shared syncs.

A session calls :meth:`Committer.commit` and waits. One committer task takes
everything pending as a batch and hands it to the committer's one thread, which
writes each message to ``tmp/<queue id>``, starts the write-back of all of them,
``fdatasync``\\ s them one after the other (the first sync's journal commit
carries the others' metadata, so the later ones are short), renames each into
``queue/`` and ``fsync``\\ s ``queue/`` once for the whole batch. Only then are
the sessions' waits answered, and only then do they reply ``250``. While one
batch syncs the next one gathers, so under load the cost of a sync round is
shared by every message that arrived meanwhile.

The same thread then removes the files of delivered messages
(:meth:`Committer.remove`), after the answers are posted: one thread and one
hand-over per round for all the spool's hot-path file work, so the event loop
does not fight a pool of threads for the GIL.

Removing a file renames it into tmp/ (``pool-<n>``, up to :data:`POOL_FILES`
files of at most :data:`POOL_FILE_BYTES`), and the next message is written over
one of those instead of into a new file: no inode to allocate, no blocks to free
(and, on a volume mounted with ``discard``, none to discard in the next journal
commit), no blocks to allocate when the new message fits. The write still
happens in tmp/ and is synced before the rename into queue/, so the protocol and
recovery are unchanged: tmp/ is never mail.

A message whose write fails gets :class:`WriteFailed` (with the ``OSError``);
the others in the batch are unaffected, except when the final directory sync
fails: then the whole batch fails (its files are removed again, best effort).

Test-only fault hook: ``MAILBRIDGE_TEST_SPOOL_CRASH=<point>:<n>`` makes the
process ``os._exit(137)`` (as if killed) the ``n``-th time it reaches ``point``:
``written`` (before fsync), ``synced`` (before rename), ``renamed`` (before the
directory fsync) or ``committed`` (before anyone is answered). Read when the
committer is built; never set it in production.

Emits nothing; :mod:`mailbridge.spool.queue` counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mailbridge.spool import record
from mailbridge.spool.store import QUEUE, TMP, Store, create_file, write_chunks

log = logging.getLogger("mailbridge.spool")

CRASH_ENV = "MAILBRIDGE_TEST_SPOOL_CRASH"
CRASH_POINTS = ("written", "synced", "renamed", "committed")
#: Most messages in one sync round.
MAX_BATCH = 128
#: Files of delivered messages kept in tmp/ for reuse (their inodes and blocks): at most
#: this many, each at most :data:`POOL_FILE_BYTES` (so at most 16 MiB the limits do not see).
POOL_FILES = 64
POOL_FILE_BYTES = 256 * 1024
POOL_PREFIX = "pool-"


class WriteFailed(Exception):
    """The message could not be made durable; ``error`` is the cause."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error.strerror or str(error))
        self.error = error


@dataclass
class _Pending:
    header: record.Header
    raw: bytes
    future: asyncio.Future[int]
    error: OSError | None = None
    size: int = 0
    #: Its file's name in tmp/ while it is written (its queue id, or a reused pool file).
    tmp_name: str = ""


class _CrashHook:
    def __init__(self, spec: str | None) -> None:
        self.point, self.left = "", 0
        if spec:
            point, _, count = spec.partition(":")
            if point not in CRASH_POINTS:
                raise ValueError(f"{CRASH_ENV}: point must be one of {', '.join(CRASH_POINTS)}")
            self.point, self.left = point, int(count or "1")

    def reached(self, point: str) -> None:
        if point != self.point:
            return
        self.left -= 1
        if self.left <= 0:
            os._exit(137)


class Committer:
    """Makes accepted messages durable in batches; run :meth:`run` as a task."""

    def __init__(
        self, store: Store, *, fsync: bool, environ: Mapping[str, str] | None = None
    ) -> None:
        self._store = store
        self._fsync = fsync
        self._pending: list[_Pending] = []
        self._removals: list[str | Path] = []
        #: Removals known to be small enough for the pool.
        self._poolable: set[str | Path] = set()
        self._wake = asyncio.Event()
        self._closing = False
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="spool-commit")
        #: queue/, open for the directory syncs (opened by the thread, closed at shutdown).
        self._queue_fd: int | None = None
        self._crash = _CrashHook((os.environ if environ is None else environ).get(CRASH_ENV))
        #: Names in tmp/ of delivered messages' files, free for reuse (the thread's own).
        self._pool: list[str] = []
        self._pool_seq = 0
        #: Sync rounds done and messages committed (the benchmark reads these).
        self.batches = 0
        self.committed = 0

    async def commit(self, header: record.Header, raw: bytes) -> int:
        """Write, sync and queue one message; returns its file size. :class:`WriteFailed`."""
        if self._closing:
            raise WriteFailed(OSError(0, "spool closing"))
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(header, raw, future))
        self._wake.set()
        return await future

    def remove(self, path: str | Path, size: int | None = None) -> None:
        """Remove ``path`` soon, in the committer's thread (a delivered message's file).

        With its ``size`` (bytes on disk, as the index knows it) a small file may go to
        the pool instead (no ``stat`` needed to tell).
        """
        self._removals.append(path)
        if size is not None and size <= POOL_FILE_BYTES:
            self._poolable.add(path)
        self._wake.set()

    def take_removals(self) -> list[str | Path]:
        """Removals not done yet (after :meth:`run` returned: the caller does them)."""
        removals, self._removals = self._removals, []
        self._poolable = set()
        return removals

    async def run(self) -> None:
        """Commit batches until :meth:`close`; every waiter gets an answer."""
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending or self._removals:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                removals, self._removals = self._removals, []
                poolable, self._poolable = self._poolable, set()
                job = loop.run_in_executor(self._thread, self._job, loop, batch, removals, poolable)
                with contextlib.suppress(Exception):  # _job answers its batch in any case
                    await asyncio.shield(job)
            if self._closing and not self._pending:
                return

    async def close(self) -> None:
        self._closing = True
        self._wake.set()

    def shutdown(self) -> None:
        self._thread.shutdown(wait=True)
        for name in self._pool:  # the thread is gone: the pool is ours now
            with contextlib.suppress(OSError):
                os.unlink(self._store.file(TMP, name))  # noqa: PTH108
        self._pool = []
        if self._queue_fd is not None:
            os.close(self._queue_fd)
            self._queue_fd = None

    def _answer(self, batch: list[_Pending], failure: OSError | None) -> None:
        """On the loop: wake the batch's sessions."""
        if batch:
            self.batches += 1
        for item in batch:
            if item.future.done():
                continue
            error = item.error or failure
            if error is not None:
                item.future.set_exception(WriteFailed(error))
            else:
                self.committed += 1
                item.future.set_result(item.size)

    # --- in the thread ----------------------------------------------------------

    def _job(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[_Pending],
        removals: list[str | Path],
        poolable: set[str | Path],
    ) -> None:
        """Commit ``batch``, post the answers to the loop, then remove ``removals``."""
        failure: OSError | None = None
        try:
            if batch:
                self._write_batch(batch)
        except Exception as error:  # never leave a session waiting
            log.exception("spool commit failed")
            failure = error if isinstance(error, OSError) else OSError(0, str(error))
        finally:
            loop.call_soon_threadsafe(self._answer, batch, failure)
        for path in removals:
            self._recycle(path, path in poolable)

    def _recycle(self, path: str | Path, small: bool) -> None:
        """A delivered message's file: into the pool (a rename) or, when full, unlinked.

        Unlinking frees the blocks (and, on a volume mounted with ``discard``, makes the
        next journal commit discard them) and the next message allocates an inode and
        blocks again; a rename into tmp/ keeps both for the next message. tmp/ is never
        mail: recovery empties it, so a crash loses nothing but the pool.
        """
        with contextlib.suppress(FileNotFoundError):
            if small and len(self._pool) < POOL_FILES:
                self._pool_seq += 1
                name = f"{POOL_PREFIX}{self._pool_seq}"
                os.rename(path, self._store.file(TMP, name))  # noqa: PTH104
                self._pool.append(name)
                return
            os.unlink(path)  # noqa: PTH108 (text paths: no Path object per file)

    def _write_one(self, item: _Pending) -> int | None:
        """Fill a file in tmp/ (a pool file, else a new ``tmp/<id>``); its descriptor or None.

        A pool file is overwritten in place and cut to the new length: no new inode, and
        blocks already allocated are reused. It is in tmp/ until synced, so a crash in
        the middle leaves at most garbage in tmp/, never a damaged file in queue/.
        """
        chunks = record.encode(item.header, item.raw)
        while self._pool:
            name = self._pool.pop()
            path = self._store.file(TMP, name)
            try:
                fd = os.open(path, os.O_WRONLY)
            except OSError:
                continue  # gone (the pool is a cache)
            try:
                item.size = write_chunks(fd, chunks)
                os.ftruncate(fd, item.size)
            except OSError:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(path)  # noqa: PTH108
                break  # e.g. disk full: a fresh file reports the error below
            item.tmp_name = name
            self._crash.reached("written")
            return fd
        item.tmp_name = item.header.queue_id
        try:
            fd, item.size = create_file(self._store.file(TMP, item.tmp_name), chunks)
        except OSError as error:
            item.error = error
            return None
        self._crash.reached("written")
        return fd

    def _write_batch(self, batch: list[_Pending]) -> None:
        work = [(item, fd) for item in batch if (fd := self._write_one(item)) is not None]
        try:
            if self._fsync:
                if len(work) > 1:
                    # Start every file's write-back first (DONTNEED starts it and does not
                    # wait), so the syncs below wait on one journal commit, not one each.
                    for _item, fd in work:
                        with contextlib.suppress(OSError):
                            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                for item, fd in work:
                    try:
                        os.fdatasync(fd)
                    except OSError as error:
                        item.error = error
        finally:
            for _item, fd in work:
                os.close(fd)
        for item, _fd in work:
            if item.error is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self._store.file(TMP, item.tmp_name))  # noqa: PTH108
        self._crash.reached("synced")
        renamed = []
        for item in batch:
            if item.error is not None:
                continue
            queue_id = item.header.queue_id
            try:
                os.rename(self._store.file(TMP, item.tmp_name), self._store.file(QUEUE, queue_id))  # noqa: PTH104
            except OSError as error:
                item.error = error
                continue
            renamed.append(item)
        self._crash.reached("renamed")
        if renamed and self._fsync:
            try:
                if self._queue_fd is None:
                    self._queue_fd = os.open(self._store.path(QUEUE), os.O_RDONLY | os.O_DIRECTORY)
                os.fsync(self._queue_fd)
            except OSError as error:
                for item in renamed:
                    item.error = error
                    with contextlib.suppress(OSError):
                        self._store.path(QUEUE, item.header.queue_id).unlink()
        if renamed:
            self._crash.reached("committed")
