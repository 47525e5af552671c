"""What ``mailbridge spool`` does: look at a spool and hand messages to its bridge.

Safe against a running bridge by the protocol in :mod:`mailbridge.spool`: this
module never writes into a spool file. Listing reads headers and state records
(no checksum: a file being appended to may show its previous state). ``retry``
and ``purge`` are single renames or unlinks of files outside active/; when no
bridge holds the lock, the command holds it for the operation and active/
counts as queued.

Reads only the spool directory (``spool.directory`` or ``--directory``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mailbridge.spool import record
from mailbridge.spool.store import ACTIVE, DEAD, INCOMING, LOCK, QUEUE

#: Directories listed, in the order shown.
LISTED = (ACTIVE, INCOMING, QUEUE, DEAD)
STATES = ("inflight", "retrying", "queued", "deferred", "dead")
#: How much of a file is read to find its header (the rest is seeked over).
HEAD_BYTES = 64 * 1024


class AdminError(Exception):
    """The operation cannot be done; the message says why."""


@dataclass(frozen=True)
class Item:
    where: str
    header: record.Header
    state: record.State
    file_bytes: int
    #: Set when the file could not be read whole (being written, or damaged).
    problem: str = ""

    @property
    def queue_id(self) -> str:
        return self.header.queue_id

    def state_name(self, now: float) -> str:
        if self.where == ACTIVE:
            return "inflight"
        if self.where == INCOMING:
            return "retrying"
        if self.where == DEAD:
            return "dead"
        due = self.state.next_attempt_at
        return "deferred" if due is not None and due > now else "queued"


class Admin:
    """Operations on one spool directory."""

    def __init__(self, directory: Path) -> None:
        self.root = directory
        if not (directory / QUEUE).is_dir():
            raise AdminError(f"{directory} is not a mailbridge spool (no {QUEUE}/ in it)")

    # --- reading ----------------------------------------------------------------

    def items(self) -> Iterator[Item]:
        for where in LISTED:
            with contextlib.suppress(FileNotFoundError), os.scandir(self.root / where) as scan:
                names = sorted(e.name for e in scan if not e.name.startswith("."))
            for name in names:
                item = self._read(where, name)
                if item is not None:
                    yield item

    def _read(self, where: str, name: str) -> Item | None:
        try:
            with (self.root / where / name).open("rb") as file:
                size = os.fstat(file.fileno()).st_size
                head = file.read(HEAD_BYTES)
                header, raw_offset = record.split_head(head)
                end = raw_offset + header.size_bytes
                file.seek(end)
                tail = file.read()
        except FileNotFoundError:
            return None  # moved meanwhile: the bridge is working
        except (OSError, record.Damaged):
            return None
        marker = len(record.END) + record.DIGEST_HEX_CHARS + 1
        if not tail.startswith(record.END) or len(tail) < marker:
            return None
        state, _ = record.decode_states(tail[marker:], header)
        return Item(where, header, state, size)

    def find(self, wanted: str) -> Item:
        """By queue id, webhook id (``msg_...``) or a unique queue id prefix."""
        matches = [
            item
            for item in self.items()
            if wanted in (item.queue_id, item.header.webhook_id) or item.queue_id.startswith(wanted)
        ]
        exact = [item for item in matches if item.queue_id == wanted]
        if exact:
            return exact[0]
        if not matches:
            raise AdminError(f"{wanted}: no such message in the spool")
        if len(matches) > 1:
            ids = ", ".join(item.queue_id for item in matches[:10])
            raise AdminError(f"{wanted}: matches {len(matches)} messages ({ids}); be precise")
        return matches[0]

    def raw(self, item: Item) -> bytes:
        data = (self.root / item.where / item.queue_id).read_bytes()
        parsed = record.decode(data)
        return data[parsed.raw_offset : parsed.raw_offset + parsed.header.size_bytes]

    # --- changing -----------------------------------------------------------------

    @contextlib.contextmanager
    def _bridge_state(self) -> Iterator[bool]:
        """Yields whether a bridge holds the spool; if not, holds the lock meanwhile."""
        fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield True
            else:
                yield False
        finally:
            os.close(fd)

    def retry(self, item: Item) -> str:
        """Hand ``item`` to the bridge as a manual retry (due now, age restarted)."""
        with self._bridge_state() as running:
            if item.where == ACTIVE and running:
                raise AdminError(f"{item.queue_id}: being delivered right now; nothing to do")
            if item.where == INCOMING:
                return f"{item.queue_id}: already waiting for the bridge to retry it"
            try:
                (self.root / item.where / item.queue_id).rename(
                    self.root / INCOMING / item.queue_id
                )
            except FileNotFoundError:
                raise AdminError(
                    f"{item.queue_id}: moved by the bridge meanwhile; look again"
                ) from None
        when = "within a second" if running else "when the bridge starts"
        return f"{item.queue_id}: will be retried {when}"

    def retry_dead(self, route: str | None = None) -> list[str]:
        """Retry every dead letter (of ``route``, when given)."""
        done = []
        for item in self.items():
            if item.where == DEAD and (route is None or route in item.state.dead):
                with contextlib.suppress(AdminError):
                    self.retry(item)
                    done.append(item.queue_id)
        return done

    def purge(self, item: Item, *, force: bool) -> str:
        """Delete ``item``: a dead letter, or with ``force`` a message still waiting."""
        if item.where != DEAD and not force:
            raise AdminError(
                f"{item.queue_id}: not a dead letter (it is still being delivered); "
                "use --force to delete it anyway"
            )
        with self._bridge_state() as running:
            if item.where == ACTIVE and running:
                raise AdminError(f"{item.queue_id}: being delivered right now; try again")
            try:
                (self.root / item.where / item.queue_id).unlink()
            except FileNotFoundError:
                raise AdminError(
                    f"{item.queue_id}: moved by the bridge meanwhile; look again"
                ) from None
        return f"{item.queue_id}: purged ({item.header.webhook_id})"


def age(seconds: float) -> str:
    """``42s``, ``5m``, ``3h``, ``2d``."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def describe(item: Item, now: float | None = None) -> dict[str, object]:
    """Everything about ``item`` as plain data (``show`` and ``list --json``)."""
    now = time.time() if now is None else now
    state, header = item.state, item.header
    return {
        "queue_id": item.queue_id,
        "webhook_id": header.webhook_id,
        "state": item.state_name(now),
        "received_at": header.received_at,
        "age_seconds": round(now - header.received_at, 3),
        "size_bytes": header.size_bytes,
        "mail_from": header.envelope.mail_from,
        "rcpt_to": list(header.envelope.rcpt_to),
        "client_ip": header.envelope.client_ip,
        "routes": {
            name: {
                "status": route.status,
                "attempts": route.attempts,
                "next_attempt_at": route.next_attempt_at if route.status == "pending" else None,
                "last_error": route.last_error,
                "recipients": list(header.routes[name]),
            }
            for name, route in state.routes.items()
        },
        "circuit_deferrals": state.deferrals,
        "age_counted_from": state.age_from,
    }
