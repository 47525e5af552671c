"""The spool directory: its layout, its lock, recovery at start, and moves between states.

See :mod:`mailbridge.spool` for the layout and the protocol. Everything here is
blocking file-system work; the async callers run the slow parts (recovery,
reading a large file, the periodic probe) in a thread. Renames and appends of
small records are metadata operations and run inline.

Emits nothing itself; :class:`Recovered` tells the caller what was found.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mailbridge.spool import record

log = logging.getLogger("mailbridge.spool")

TMP, QUEUE, ACTIVE, INCOMING = "tmp", "queue", "active", "incoming"
DEAD, CORRUPT = "dead", "corrupt"
#: Directories that hold mail (an accepted message is in exactly one of them).
MAIL_DIRS = (QUEUE, ACTIVE, INCOMING, DEAD)
ALL_DIRS = (TMP, *MAIL_DIRS, CORRUPT)
LOCK = "lock"
#: How long a starting bridge waits for the spool lock (a previous process exiting).
LOCK_WAIT_SECONDS = 2.0
#: State records beyond this many bytes are compacted by rewriting the file.
COMPACT_STATE_BYTES = 64 * 1024


class SpoolError(Exception):
    """The spool cannot be used (the message says why and which directory)."""


class SpoolBusy(SpoolError):
    """Another process holds the spool's lock."""


def new_queue_id(now: float) -> str:
    """Unique, and sorting by name sorts by acceptance time (microseconds, then random).

    Not a secret, so not ``secrets`` (one ``getrandom`` syscall per message).
    """
    return f"{int(now * 1_000_000):014x}{random.getrandbits(32):08x}"


@dataclass
class Entry:
    """A message the running bridge knows about (the worker's index holds these)."""

    header: record.Header
    state: record.State
    #: Directory it is in now: QUEUE, ACTIVE or DEAD.
    where: str
    #: Bytes on disk (counted against ``spool.max_bytes``).
    file_bytes: int
    #: Bytes of state records appended so far (compaction trigger).
    state_bytes: int = 0
    #: When the worker will next look at it (may be earlier than the state says: a paused
    #: circuit reschedules in memory only).
    due_at: float = 0.0
    #: Handed to the worker (popped from the schedule, not yet settled).
    busy: bool = False
    #: The raw message, kept in memory from acceptance to first delivery when it fits.
    raw: bytes | None = field(default=None, repr=False)

    @property
    def queue_id(self) -> str:
        return self.header.queue_id


@dataclass
class Recovered:
    entries: list[Entry] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    returned_from_active: int = 0
    retried: int = 0
    removed_tmp: int = 0


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    """One spool directory, used by one bridge at a time (:meth:`lock`)."""

    def __init__(
        self,
        directory: Path,
        *,
        clock: Callable[[], float] = time.time,
        on_corrupt: Callable[[], object] | None = None,
    ) -> None:
        self.root = directory
        #: "<root>/<where>/" as text, for the hot path (a Path join costs microseconds).
        self._prefix = {where: f"{directory / where}/" for where in ALL_DIRS}
        self.clock = clock
        self._on_corrupt = on_corrupt
        self._lock_fd: int | None = None

    def path(self, where: str, queue_id: str = "") -> Path:
        return self.root / where / queue_id if queue_id else self.root / where

    def file(self, where: str, queue_id: str) -> str:
        """:meth:`path` of a message's file, as text (cheaper: the commit's hot path)."""
        return self._prefix[where] + queue_id

    # --- the lock -----------------------------------------------------------

    def lock(self, wait_seconds: float = LOCK_WAIT_SECONDS) -> None:
        """Make the directories and hold the spool's lock until :meth:`unlock` (or exit)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for name in ALL_DIRS:
                self.path(name).mkdir(exist_ok=True)
            fsync_dir(self.root)
            fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise SpoolError(f"spool directory {self.root}: {error.strerror or error}") from None
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _read_pid(fd)
                    os.close(fd)
                    raise SpoolBusy(
                        f"spool directory {self.root} is in use by another process{holder}"
                    ) from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    # --- recovery -----------------------------------------------------------

    def recover(self) -> Recovered:
        """Run once at start, holding the lock: make the directories consistent and index them.

        tmp/ holds writes never acknowledged: removed. active/ holds deliveries cut
        short: back to queue/. incoming/ holds manual retries: reset and queued.
        Every file is read and checked; damaged ones go to corrupt/.
        """
        found = Recovered()
        for name in _names(self.path(TMP)):
            with contextlib.suppress(FileNotFoundError):
                (self.path(TMP) / name).unlink()
                found.removed_tmp += 1
        for where in (ACTIVE, INCOMING, QUEUE, DEAD):
            for queue_id in sorted(_names(self.path(where))):
                entry = self.load(where, queue_id)
                if entry is None:
                    if self.path(CORRUPT, f"{where}-{queue_id}").exists():
                        found.corrupt.append(queue_id)
                    continue
                if where == ACTIVE:
                    self.move(entry, QUEUE)
                    found.returned_from_active += 1
                elif where == INCOMING:
                    self.take_incoming(entry)
                    found.retried += 1
                elif where == QUEUE and not entry.state.pending:
                    # Finished but not yet moved when the bridge stopped.
                    if entry.state.dead:
                        self.move(entry, DEAD)
                    else:
                        self.remove(entry)
                        continue
                found.entries.append(entry)
        fsync_dir(self.path(QUEUE))
        return found

    def load(self, where: str, queue_id: str) -> Entry | None:
        """Read and check one file; ``None`` if gone, or damaged (then moved to corrupt/)."""
        path = self.path(where, queue_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            parsed = record.decode(data)
            if parsed.header.queue_id != queue_id:
                raise record.Damaged("file name and queue id differ")
        except record.Damaged as damage:
            self.set_aside(where, queue_id, str(damage))
            return None
        return Entry(parsed.header, parsed.state, where, len(data), parsed.state_bytes)

    def set_aside(self, where: str, queue_id: str, why: str) -> None:
        log.error(
            "damaged spool file moved aside", extra={"file": f"{where}/{queue_id}", "why": why}
        )
        with contextlib.suppress(FileNotFoundError):
            self.path(where, queue_id).replace(self.path(CORRUPT, f"{where}-{queue_id}"))
            if self._on_corrupt is not None:
                self._on_corrupt()

    def take_incoming(self, entry: Entry) -> None:
        """A manual retry handed over by ``mailbridge spool retry``: reset, then queue it."""
        entry.state = entry.state.retried(self.clock())
        self.append_state(entry)
        self.move(entry, QUEUE)

    # --- moves ----------------------------------------------------------------

    def claim(self, entry: Entry) -> bool:
        """queue/ → active/: the worker owns it now. False if the file is gone (CLI moved it)."""
        try:
            self.path(entry.where, entry.queue_id).rename(self.path(ACTIVE, entry.queue_id))
        except FileNotFoundError:
            return False
        entry.where = ACTIVE
        return True

    def move(self, entry: Entry, where: str) -> None:
        self.path(entry.where, entry.queue_id).rename(self.path(where, entry.queue_id))
        entry.where = where

    def remove(self, entry: Entry) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(entry.where, entry.queue_id).unlink()

    def append_state(self, entry: Entry) -> None:
        """Append ``entry.state`` (no fsync: losing it only repeats a delivery, same id)."""
        line = record.encode_state(entry.state)
        if entry.state_bytes + len(line) > COMPACT_STATE_BYTES:
            self._compact(entry)
            return
        # No O_CREAT: if the file was purged meanwhile, fail instead of making a stub.
        fd = os.open(self.path(entry.where, entry.queue_id), os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        entry.state_bytes += len(line)
        entry.file_bytes += len(line)

    def _compact(self, entry: Entry) -> None:
        """Rewrite the file with only the current state (tmp, fsync, rename over it)."""
        raw = self.read_raw(entry)
        chunks = [*record.encode(entry.header, raw), record.encode_state(entry.state)]
        tmp = self.path(TMP, f"{entry.queue_id}.compact")
        write_file(tmp, chunks, fsync=True)
        tmp.replace(self.path(entry.where, entry.queue_id))
        entry.state_bytes = len(chunks[-1])
        entry.file_bytes = sum(len(chunk) for chunk in chunks)

    def read_raw(self, entry: Entry) -> bytes:
        """The raw message, from memory when cached, else from disk (checked)."""
        if entry.raw is not None:
            return entry.raw
        data = self.path(entry.where, entry.queue_id).read_bytes()
        parsed = record.decode(data)
        return data[parsed.raw_offset : parsed.raw_offset + parsed.header.size_bytes]

    def names(self, where: str) -> set[str]:
        return set(_names(self.path(where)))

    # --- writability ----------------------------------------------------------

    def probe(self, *, fsync: bool) -> None:
        """Write, sync and remove a small file in tmp/: raises OSError when the disk refuses."""
        path = self.path(TMP, f".probe-{os.getpid()}")
        write_file(path, [b"probe\n"], fsync=fsync)
        path.unlink()


def write_chunks(fd: int, chunks: list[bytes]) -> int:
    """Write ``chunks`` from the start of the file open as ``fd``; returns the bytes."""
    total = sum(len(chunk) for chunk in chunks)
    written = os.pwritev(fd, chunks, 0)
    if written != total:  # a short write (large chunks, signals): finish it
        data = b"".join(chunks)[written:]
        while data:
            data = data[os.pwrite(fd, data, total - len(data)) :]
    return total


def create_file(path: str | Path, chunks: list[bytes]) -> tuple[int, int]:
    """Create ``path`` with ``chunks``, not synced; returns (open descriptor, bytes)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        total = write_chunks(fd, chunks)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            Path(path).unlink()
        raise
    return fd, total


def write_file(
    path: Path,
    chunks: list[bytes],
    *,
    fsync: bool,
    before_sync: Callable[[], None] | None = None,
) -> int:
    """Create ``path`` with ``chunks``; fdatasync it when asked. Returns the bytes written."""
    fd, total = create_file(path, chunks)
    try:
        if before_sync is not None:
            before_sync()
        if fsync:
            os.fdatasync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    os.close(fd)
    return total


def _names(directory: Path) -> Iterator[str]:
    try:
        with os.scandir(directory) as scan:
            for item in scan:
                if not item.name.startswith(".") and item.is_file(follow_symlinks=False):
                    yield item.name
    except FileNotFoundError:
        return


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (pid {text})" if text.isdigit() else ""


def is_disk_full(error: OSError) -> bool:
    return error.errno in (errno.ENOSPC, errno.EDQUOT)
