"""The process-wide DATA budget: memory for messages in flight is capped, refusals are 452."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from mailbridge.smtp import data, limits
from tests.hardening.smtp_client import Raw, still_serves
from tests.support.bridge import BridgeThread, route
from tests.support.receiver import ReceiverThread

KiB = 1024


def test_a_reservation_grows_within_the_budget_and_gives_everything_back() -> None:
    budget = limits.DataBudget(100)
    first, second = budget.reservation(), budget.reservation()
    assert first.ensure(60)
    assert first.ensure(40)  # already held: no change
    assert not second.ensure(41)
    assert 60 == first.held and 0 == second.held
    assert second.ensure(40)
    assert 0 == budget.available
    first.release()
    first.release()  # idempotent
    assert 60 == budget.available
    second.release()
    assert 0 == budget.in_flight


def _reader(chunks: list[bytes]) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=data.DISCARD_CHUNK)
    for chunk in chunks:
        reader.feed_data(chunk)
    return reader


async def test_a_message_larger_than_the_budget_allows_is_discarded_and_busy() -> None:
    budget = limits.DataBudget(256 * KiB)
    reservation = budget.reservation()
    body = b"x" * 70 + b"\r\n"
    message = body * (400 * KiB // len(body))
    reader = _reader([message, b".\r\nQUIT\r\n"])
    received = await data.read(
        reader, max_bytes=1024 * KiB, max_line_bytes=1000, reservation=reservation
    )
    assert data.Verdict.BUSY == received.verdict
    assert b"" == received.content
    assert 0 == budget.in_flight  # given back as soon as the message was refused
    assert b"QUIT\r\n" == await reader.readexactly(6)  # what follows is untouched


async def test_a_message_within_the_budget_is_read_whole_and_stays_reserved() -> None:
    budget = limits.DataBudget(1024 * KiB)
    reservation = budget.reservation()
    message = b"line\r\n..dot\r\n" * (30 * KiB)
    reader = _reader([message[:1000], message[1000:], b".\r\n"])
    received = await data.read(
        reader, max_bytes=1024 * KiB, max_line_bytes=1000, reservation=reservation
    )
    assert data.Verdict.OK == received.verdict
    assert message.replace(b"\r\n..", b"\r\n.") == received.content
    # The session releases after its reply: parsing and delivery still use the bytes.
    assert len(message) <= reservation.held <= 2 * len(message) + data.FIRST_STEP
    reservation.release()
    assert 0 == budget.in_flight


class _RecordingBudget(limits.DataBudget):
    made: list[limits.DataBudget] = []

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes)
        self.made.append(self)


#: The DATA budget of the bridges started with ``small_budget``.
SMALL_BUDGET = 512 * KiB


@pytest.fixture
def small_budget(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[limits.DataBudget]]:
    made: list[limits.DataBudget] = []
    monkeypatch.setattr(_RecordingBudget, "made", made)
    monkeypatch.setattr(limits, "DataBudget", _RecordingBudget)
    yield made


def _wait(predicate: object, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_when_the_budget_is_spent_data_gets_452_and_a_retry_later_succeeds(
    small_budget: list[limits.DataBudget], receiver: ReceiverThread
) -> None:
    with BridgeThread(
        routes=[route("r", ["*"], receiver.url)],
        smtp={"max_message_size_bytes": 2048 * KiB, "max_data_in_flight_bytes": SMALL_BUDGET},
    ) as bridge:
        (budget,) = small_budget
        line = b"y" * 98 + b"\r\n"
        hog, late = Raw(bridge.smtp_port), Raw(bridge.smtp_port)
        try:
            for raw in (hog, late):
                raw.command("EHLO client.test")
                raw.command("MAIL FROM:<a@sender.test>")
                raw.command("RCPT TO:<user@example.com>")
            assert hog.command("DATA").startswith("354")
            hog.send(b"Subject: hog\r\n\r\n" + line * (300 * KiB // len(line)))
            _wait(lambda: budget.available < data.FIRST_STEP)
            # Nothing left for another message: refused before any content is sent.
            assert late.command("DATA").startswith("452 4.3.1")
            hog.send(b".\r\n")
            assert hog.reply().startswith("250 2.0.0")
            _wait(lambda: budget.in_flight == 0)
            assert late.command("DATA").startswith("354")
            late.send(b"Subject: late\r\n\r\nhi\r\n.\r\n")
            assert late.reply().startswith("250 2.0.0")
            # Bigger than the whole budget: refused after the client has sent it all.
            late.command("MAIL FROM:<a@sender.test>")
            late.command("RCPT TO:<user@example.com>")
            assert late.command("DATA").startswith("354")
            late.send(b"Subject: huge\r\n\r\n" + line * (1024 * KiB // len(line)) + b".\r\n")
            assert late.reply().startswith("452 4.3.1")
            assert late.command("NOOP").startswith("250")
        finally:
            hog.close()
            late.close()
        still_serves(bridge.smtp_port)
        assert ["hog", "late", "still serving"] == [d.json["subject"] for d in receiver.wait_for(3)]
        _wait(lambda: budget.in_flight == 0)


def test_a_client_vanishing_mid_data_gives_its_reservation_back(
    small_budget: list[limits.DataBudget], receiver: ReceiverThread
) -> None:
    with BridgeThread(
        routes=[route("r", ["*"], receiver.url)], smtp={"max_data_in_flight_bytes": SMALL_BUDGET}
    ) as bridge:
        (budget,) = small_budget
        for _ in range(5):
            raw = Raw(bridge.smtp_port)
            raw.command("EHLO client.test")
            raw.command("MAIL FROM:<a@sender.test>")
            raw.command("RCPT TO:<user@example.com>")
            assert raw.command("DATA").startswith("354")
            raw.send(b"Subject: gone\r\n\r\n" + b"z" * (200 * KiB))
            _wait(lambda: budget.in_flight > 0)
            raw.close()
            _wait(lambda: budget.in_flight == 0)
        still_serves(bridge.smtp_port)
    assert ["still serving"] == [d.json["subject"] for d in receiver.deliveries]


def test_many_concurrent_uploads_are_refused_not_buffered(
    small_budget: list[limits.DataBudget], receiver: ReceiverThread
) -> None:
    """30 clients x 400 KiB against a 512 KiB budget: every one gets 250 or 452, none hangs."""
    clients, size = 30, 400 * KiB
    with BridgeThread(
        routes=[route("r", ["*"], receiver.url)],
        smtp={
            "max_message_size_bytes": 1024 * KiB,
            "max_sessions_per_ip": clients + 5,
            "max_data_in_flight_bytes": SMALL_BUDGET,
        },
    ) as bridge:
        (budget,) = small_budget
        peak = [0]
        replies: list[str] = []
        lock = threading.Lock()
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(0.002):
                peak[0] = max(peak[0], budget.in_flight)

        def upload(number: int) -> None:
            with Raw(bridge.smtp_port) as raw:
                raw.command("EHLO client.test")
                raw.command("MAIL FROM:<a@sender.test>")
                raw.command("RCPT TO:<user@example.com>")
                reply = raw.command("DATA")
                if reply.startswith("354"):
                    line = (b"%02d" % number) * 49 + b"\r\n"
                    body = line * (size // len(line))
                    raw.send(b"Subject: upload\r\n\r\n" + body + b"\r\n.\r\n")
                    reply = raw.reply()
            with lock:
                replies.append(reply[:9])

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        threads = [threading.Thread(target=upload, args=(n,)) for n in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        stop.set()
        watcher.join(5)
        assert clients == len(replies)
        assert set(replies) <= {"250 2.0.0", "452 4.3.1"}, replies
        assert "452 4.3.1" in replies
        assert peak[0] <= budget.max_bytes
        still_serves(bridge.smtp_port)
        _wait(lambda: budget.in_flight == 0)


def test_a_budget_smaller_than_the_first_step_still_takes_messages_that_fit(
    monkeypatch: pytest.MonkeyPatch, receiver: ReceiverThread
) -> None:
    """Found by the fuzz harness: DATA reserved 64 KiB even when the size limit is 4 KiB."""
    with (
        BridgeThread(
            routes=[route("r", ["*"], receiver.url)],
            smtp={
                "max_message_size_bytes": 4096,
                "max_data_in_flight_bytes": 2 * data.wire_cap(4096),
            },
        ) as bridge,
        Raw(bridge.smtp_port) as raw,
    ):
        raw.command("EHLO client.test")
        raw.command("MAIL FROM:<a@sender.test>")
        raw.command("RCPT TO:<user@example.com>")
        assert raw.command("DATA").startswith("354")
        raw.send(b"Subject: small\r\n\r\nhi\r\n.\r\n")
        assert raw.reply().startswith("250 2.0.0")
    assert ["small"] == [d.json["subject"] for d in receiver.wait_for(1)]
