"""The spool: file format, damage detection, recovery, group commit and limits, on a real disk."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from mailbridge.config import SpoolSettings
from mailbridge.observability.metrics import Metrics
from mailbridge.payload import Envelope, TlsInfo
from mailbridge.spool import record
from mailbridge.spool.commit import WriteFailed
from mailbridge.spool.queue import Full, Spool
from mailbridge.spool.store import (
    ACTIVE,
    CORRUPT,
    DEAD,
    INCOMING,
    QUEUE,
    TMP,
    SpoolBusy,
    Store,
    new_queue_id,
)

ENVELOPE = Envelope(
    mail_from="a@x.test",
    rcpt_to=("b@y.test", "c@z.test"),
    helo="client.test",
    client_ip="127.0.0.1",
    tls=TlsInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256"),
)
RAW = b"Subject: hi\r\n\r\nbody\r\n"


def header(queue_id: str = "q1", raw: bytes = RAW, received_at: float = 1000.0) -> record.Header:
    return record.Header(
        queue_id=queue_id,
        webhook_id="msg_abc",
        received_at=received_at,
        envelope=ENVELOPE,
        routes={"a": ("b@y.test",), "b": ("c@z.test",)},
        carrier={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        size_bytes=len(raw),
    )


def file_bytes(head: record.Header, raw: bytes = RAW) -> bytes:
    return b"".join(record.encode(head, raw))


# --- format ------------------------------------------------------------------


def test_a_file_round_trips_header_raw_and_initial_state() -> None:
    parsed = record.decode(file_bytes(header()))
    assert header() == parsed.header
    data = file_bytes(header())
    assert RAW == data[parsed.raw_offset : parsed.raw_offset + len(RAW)]
    assert ["a", "b"] == parsed.state.pending
    assert 1000.0 == parsed.state.next_attempt_at


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda d: d[:-1], "end marker"),  # the final newline missing
        (lambda d: d[: d.index(b"\nEND") - 3], "end marker"),  # cut in the message
        (lambda d: d[:5], "magic"),
        (lambda d: d.replace(b"body", b"bodY"), "checksum"),
        (lambda d: d.replace(b'"size_bytes":21', b'"size_bytes":20'), "end marker"),
        (lambda d: b"garbage" + d, "magic"),
        (lambda d: d.replace(b"queue_id", b"queue_iX"), "header"),
    ],
)
def test_an_incomplete_or_altered_file_is_damaged_never_mail(damage, why: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(record.Damaged, match=why):
        record.decode(damage(file_bytes(header())))


def test_the_last_intact_state_record_wins_and_a_torn_tail_is_ignored() -> None:
    head = header()
    first = record.State.initial(head)
    second = record.State(
        routes={
            "a": record.RouteState("done", 1),
            "b": record.RouteState("pending", 2, 99.0, "HTTP 503"),
        },
        age_from=1000.0,
        updated_at=1010.0,
    )
    data = file_bytes(head) + record.encode_state(first) + record.encode_state(second)
    assert second == record.decode(data).state
    torn = record.encode_state(record.State.initial(head))[:-7]
    assert second == record.decode(data + torn).state
    flipped = data[:-3] + b"0" + data[-2:]  # the last record's CRC no longer matches
    assert first == record.decode(flipped).state


def test_a_manual_retry_revives_dead_routes_keeps_done_ones_and_restarts_the_age() -> None:
    state = record.State(
        routes={
            "a": record.RouteState("done", 1),
            "b": record.RouteState("dead", 7, 5.0, "HTTP 410"),
        },
        age_from=1000.0,
        updated_at=1010.0,
    )
    retried = state.retried(5000.0)
    assert ("done", "pending", 0, 5000.0) == (
        retried.routes["a"].status,
        retried.routes["b"].status,
        retried.routes["b"].attempts,
        retried.age_from,
    )


def test_queue_ids_sort_by_acceptance_time() -> None:
    ids = [new_queue_id(t) for t in (1.0, 1.5, 100.0, 1e9)]
    assert ids == sorted(ids)
    assert len(set(new_queue_id(1.0) for _ in range(100))) == 100


# --- store -------------------------------------------------------------------


def names(directory: Path) -> set[str]:
    return {path.name for path in directory.iterdir()}


def write(root: Path, where: str, data: bytes, name: str) -> None:
    (root / where / name).write_bytes(data)


def test_recovery_clears_tmp_requeues_active_and_moves_damage_aside(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.lock()
    write(tmp_path, TMP, b"half a message", "q0")
    write(tmp_path, ACTIVE, file_bytes(header("q1")), "q1")
    write(tmp_path, QUEUE, file_bytes(header("q2")), "q2")
    write(tmp_path, QUEUE, file_bytes(header("q3"))[:-10], "q3")  # no end marker
    write(tmp_path, DEAD, file_bytes(header("q4")), "q4")
    write(tmp_path, INCOMING, file_bytes(header("q5")), "q5")
    write(tmp_path, QUEUE, file_bytes(header("q1")), "other-name")  # name and id differ
    found = store.recover()
    assert set() == names(tmp_path / TMP)
    assert {"q1", "q2", "q5"} == names(tmp_path / QUEUE)
    assert {"q4"} == names(tmp_path / DEAD)
    assert {"queue-q3", "queue-other-name"} == names(tmp_path / CORRUPT)
    assert ({"q1", "q2", "q4", "q5"}, 1, 1) == (
        {e.queue_id for e in found.entries},
        found.returned_from_active,
        found.retried,
    )
    store.unlock()


def test_a_second_process_cannot_take_a_locked_spool(tmp_path: Path) -> None:
    first = Store(tmp_path)
    first.lock()
    with pytest.raises(SpoolBusy, match=f"pid {os.getpid()}"):
        Store(tmp_path).lock(wait_seconds=0.2)
    first.unlock()
    Store(tmp_path).lock(wait_seconds=0.2)


def test_state_records_are_compacted_when_they_grow(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.lock()
    write(tmp_path, ACTIVE, file_bytes(header("q1")), "q1")
    entry = store.load(ACTIVE, "q1")
    assert entry is not None
    for n in range(600):
        entry.state = record.State(
            routes={"a": record.RouteState("pending", n), "b": record.RouteState("done", 1)},
            age_from=1000.0,
            updated_at=1000.0 + n,
        )
        store.append_state(entry)
    size = (tmp_path / ACTIVE / "q1").stat().st_size
    assert size < len(file_bytes(header("q1"))) + 64 * 1024
    reloaded = store.load(ACTIVE, "q1")
    assert reloaded is not None and 599 == reloaded.state.routes["a"].attempts
    assert RAW == store.read_raw(reloaded)


# --- the running spool ----------------------------------------------------------


def make_spool(tmp_path: Path, **settings: object) -> Spool:
    return Spool(
        SpoolSettings.model_validate({"directory": tmp_path, **settings}),
        Metrics(CollectorRegistry()),
        environ={},
    )


async def accept(spool: Spool, raw: bytes = RAW) -> object:
    return await spool.accept(
        envelope=ENVELOPE,
        raw=raw,
        routes={"a": ("b@y.test",)},
        webhook_id="msg_x",
        received_at=1000.0,
        carrier={},
    )


async def test_concurrent_acceptances_share_sync_rounds(tmp_path: Path) -> None:
    """Group commit: 200 sessions at once need far fewer than 200 sync rounds."""
    spool = make_spool(tmp_path)
    await spool.open()
    await asyncio.gather(*(accept(spool) for _ in range(200)))
    assert spool.committer is not None
    assert 200 == spool.committer.committed == len(names(tmp_path / QUEUE))
    assert spool.committer.batches <= 20
    assert set() == names(tmp_path / TMP)
    await spool.close()


async def test_limits_count_messages_and_bytes_and_refuse_when_full(tmp_path: Path) -> None:
    spool = make_spool(tmp_path, max_messages=2)
    await spool.open()
    await accept(spool)
    assert spool.has_room()
    await accept(spool)
    assert not spool.has_room()
    with pytest.raises(Full):
        await accept(spool)
    assert 2 == spool.metrics.registry.get_sample_value(
        "mailbridge_spool_messages", {"state": "queued"}
    )
    await spool.close()
    big = make_spool(tmp_path / "b", max_bytes=1024 * 1024)
    await big.open()
    with pytest.raises(Full):
        await accept(big, b"x" * 1024 * 1024)
    await big.close()


async def test_a_disk_error_fails_the_write_and_marks_the_spool_unwritable(
    tmp_path: Path,
) -> None:
    spool = make_spool(tmp_path)
    await spool.open()
    (tmp_path / TMP).rmdir()
    (tmp_path / TMP).write_text("not a directory any more")
    with pytest.raises(WriteFailed):
        await accept(spool)
    assert not spool.writable
    assert set() == names(tmp_path / QUEUE)
    assert not await spool.probe()
    (tmp_path / TMP).unlink()
    (tmp_path / TMP).mkdir()
    assert await spool.probe()
    await accept(spool)
    await spool.close()


async def test_a_first_attempt_runs_from_queue_and_a_purged_retry_is_forgotten(
    tmp_path: Path,
) -> None:
    spool = make_spool(tmp_path)
    await spool.open()
    entry = await accept(spool)
    assert spool.pop_due(2000.0) is entry
    assert await spool.claim(entry)  # type: ignore[arg-type]  # fresh: no rename
    assert {entry.queue_id} == names(tmp_path / QUEUE)  # type: ignore[attr-defined]
    await spool.defer(entry, entry.state)  # type: ignore[arg-type, attr-defined]
    assert spool.pop_due(1e12) is entry
    assert await spool.claim(entry)  # type: ignore[arg-type]  # a retry: queue/ -> active/
    assert {entry.queue_id} == names(tmp_path / ACTIVE)  # type: ignore[attr-defined]
    await spool.defer(entry, entry.state)  # type: ignore[arg-type, attr-defined]
    assert spool.pop_due(1e12) is entry
    (tmp_path / QUEUE / entry.queue_id).unlink()  # type: ignore[attr-defined]
    assert not await spool.claim(entry)  # type: ignore[arg-type]
    assert {} == spool.entries
    assert 0 == spool.used_bytes
    await spool.close()


async def test_the_schedule_hands_out_due_entries_in_time_order(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    await spool.open()
    first, second = await accept(spool), await accept(spool)
    spool.schedule(first, 50.0)  # type: ignore[arg-type]
    spool.schedule(second, 10.0)  # type: ignore[arg-type]
    spool.schedule(first, 30.0)  # type: ignore[arg-type]  # replaces the plan for 50
    assert spool.pop_due(5.0) is None
    assert 10.0 == spool.next_due_at()
    assert [second, first, None] == [spool.pop_due(60.0) for _ in range(3)]
    await spool.close()


async def test_a_delivered_message_file_is_removed_by_the_committer_and_at_close(
    tmp_path: Path,
) -> None:
    """finish() forgets the entry at once; its file goes in the committer's next round,
    or at close when no round came."""
    spool = make_spool(tmp_path)
    await spool.open()
    first = await accept(spool)
    spool.finish(first)
    assert first.queue_id not in spool.entries
    for _ in range(200):  # the committer's thread removes it without a new commit
        if first.queue_id not in names(tmp_path / QUEUE):
            break
        await asyncio.sleep(0.01)
    assert first.queue_id not in names(tmp_path / QUEUE)
    second = await accept(spool)
    await spool.close()  # the committer is gone: close removes what is left
    spool.finish(second)
    assert {second.queue_id} == names(tmp_path / QUEUE)
    spool2 = make_spool(tmp_path)
    await spool2.open()
    spool2.finish(spool2.entries[second.queue_id])
    await spool2.close()
    assert set() == names(tmp_path / QUEUE)


async def test_a_delivered_messages_file_is_reused_for_the_next_one(tmp_path: Path) -> None:
    """Removed files go to a pool in tmp/ (same inode and blocks, no unlink, no create);
    the next message overwrites one there, cut to its length, and is intact in queue/."""
    spool = make_spool(tmp_path)
    await spool.open()
    assert spool.committer is not None
    first = await accept(spool, b"Subject: first\r\n\r\n" + b"x" * 3000)
    inode = (tmp_path / QUEUE / first.queue_id).stat().st_ino  # type: ignore[attr-defined]
    spool.committer.remove(spool.store.file(QUEUE, first.queue_id), 4000)  # type: ignore[attr-defined]
    for _ in range(100):
        if names(tmp_path / TMP):
            break
        await asyncio.sleep(0.01)
    assert 1 == len(names(tmp_path / TMP))
    second = await accept(spool, b"Subject: second\r\n\r\nshort")
    path = tmp_path / QUEUE / second.queue_id  # type: ignore[attr-defined]
    assert (inode, set(), {second.queue_id}) == (  # type: ignore[attr-defined]
        path.stat().st_ino,
        names(tmp_path / TMP),
        names(tmp_path / QUEUE),
    )
    parsed = record.decode(path.read_bytes())  # checksum and length: nothing left over
    assert second.queue_id == parsed.header.queue_id  # type: ignore[attr-defined]
    # Pool files left at close are removed (and recovery empties tmp/ after a crash).
    spool.committer.remove(str(path))
    await spool.close()
    assert (set(), set()) == (names(tmp_path / TMP), names(tmp_path / QUEUE))
