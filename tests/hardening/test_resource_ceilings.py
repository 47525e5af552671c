"""Ceilings per process: sessions in all, sessions per IP, and memory under many big uploads."""

from __future__ import annotations

import time
from pathlib import Path

from tests.hardening import memory_load
from tests.hardening.smtp_client import Raw, still_serves
from tests.support.bridge import BridgeThread, route
from tests.support.receiver import ReceiverThread

MiB = 1024 * 1024


def _wait_until_refused_count(bridge: BridgeThread, reason: str, count: int) -> None:
    deadline = time.monotonic() + 10
    while bridge.metric("mailbridge_smtp_connections_refused_total", reason=reason) < count:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_sessions_over_the_total_cap_get_421_and_a_freed_slot_is_reused(
    receiver: ReceiverThread,
) -> None:
    with BridgeThread(
        routes=[route("r", ["*"], receiver.url)],
        smtp={"max_sessions": 3, "max_sessions_per_ip": 100},
    ) as bridge:
        held = [Raw(bridge.smtp_port) for _ in range(3)]
        try:
            assert all(raw.greeting.startswith("220 ") for raw in held)
            for _ in range(5):
                with Raw(bridge.smtp_port) as extra:
                    assert extra.greeting.startswith("421 4.7.0")
                    assert extra.closed()
            _wait_until_refused_count(bridge, "max_sessions", 5)
            assert held[0].command("QUIT").startswith("221")
            held[0].close()
            deadline = time.monotonic() + 10
            while True:  # the slot is freed once the server saw the close
                with Raw(bridge.smtp_port) as again:
                    if again.greeting.startswith("220 "):
                        assert again.command("NOOP").startswith("250")
                        break
                assert time.monotonic() < deadline
                time.sleep(0.05)
        finally:
            for raw in held:
                raw.close()
        time.sleep(0.2)
        still_serves(bridge.smtp_port)


def test_many_concurrent_sessions_from_one_ip_are_capped_and_others_unaffected(
    receiver: ReceiverThread,
) -> None:
    with BridgeThread(
        routes=[route("r", ["*"], receiver.url)], smtp={"max_sessions_per_ip": 5}
    ) as bridge:
        opened = [Raw(bridge.smtp_port, greet=False) for _ in range(40)]
        try:
            greetings = [raw.reply()[:9] for raw in opened]
            assert 5 == greetings.count("220 mx.te")
            assert 35 == greetings.count("421 4.7.0")
        finally:
            for raw in opened:
                raw.close()
        time.sleep(0.3)
        # The cap is per IP: once they are gone, that IP is served again.
        still_serves(bridge.smtp_port)


def test_memory_stays_bounded_under_many_concurrent_large_uploads(tmp_path: Path) -> None:
    """60 clients x 2 MiB at once against an 8 MiB DATA budget, in a real child process.

    Without the budget the child grows by about 3x the bytes in flight (~340 MiB
    here: see SECURITY.md for the measurements); with it, growth stays near a
    small multiple of the budget and the excess is refused with 452 4.3.1.
    """
    result = memory_load.measure(
        clients=60, message_bytes=2 * MiB, budget_bytes=8 * MiB, folder=tmp_path
    )
    assert 60 == sum(result.replies.values()), result.replies
    # 451: accepted and parsed, then the (closed) webhook port refused it.
    assert set(result.replies) <= {"451 4.3.0", "452 4.3.1"}, result.replies
    assert result.replies["452 4.3.1"] > 0
    assert result.growth_bytes < 160 * MiB, result
