"""While the handler works on a message, reading stays on until the client sends.

Most clients wait for the DATA reply before sending more, so pausing and
resuming the transport around every dispatch would cost two epoll calls per
message for nothing: the session pauses reading only when bytes arrive before
its reply, and those bytes are answered, in order, after it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fuzz import targets
from mailbridge.config import SmtpSettings
from mailbridge.smtp.handler import Handler
from mailbridge.smtp.limits import DataBudget, SessionLimits
from mailbridge.smtp.session import Session


class _Transport(targets._Transport):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.calls: list[str] = []
        self.closed = asyncio.Event()

    def close(self) -> None:
        super().close()
        self.closed.set()

    def pause_reading(self) -> None:
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.calls.append("resume")


class _SlowDispatch:
    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.count = 0

    async def __call__(self, envelope: Any, raw: bytes, *, received_monotonic: float) -> str:
        self.count += 1
        await self.go.wait()
        return "250 2.0.0 Ok: delivered"


def _connect(
    handler: Handler, transport: _Transport, settings: SmtpSettings = targets.SMTP
) -> Session:
    return targets.connect(
        handler,
        transport,
        settings=settings,
        limits=SessionLimits(max_sessions=4, max_sessions_per_ip=4),
        budget=DataBudget(1024 * 1024),
    )


MESSAGE = b"MAIL FROM:<a@b.test>\r\nRCPT TO:<billing@example.com>\r\nDATA\r\n"
BODY = b"Subject: x\r\n\r\nhi\r\n.\r\n"


async def _run(send_early: bool) -> tuple[list[str], bytes, int]:
    loop = asyncio.get_running_loop()
    dispatch = _SlowDispatch()
    handler = Handler(targets.SMTP, targets.ROUTES, dispatch, targets._metrics())
    transport = _Transport(loop)
    session = _connect(handler, transport)
    session.data_received(b"EHLO client.test\r\n")
    session.data_received(MESSAGE)
    session.data_received(BODY)
    for _ in range(5):
        await asyncio.sleep(0)
    assert dispatch.count == 1
    if send_early:
        session.data_received(b"NOOP\r\n")
    calls = list(transport.calls)
    dispatch.go.set()
    for _ in range(20):
        await asyncio.sleep(0)
    transport.close()
    await asyncio.sleep(0)
    return calls, bytes(transport.out), transport.calls.count("resume")


async def test_reading_is_not_paused_while_a_quiet_client_waits_for_the_reply() -> None:
    calls, out, _ = await _run(send_early=False)
    assert "pause" not in calls
    assert out.endswith(b"250 2.0.0 Ok: delivered\r\n")


async def test_bytes_sent_before_the_reply_pause_reading_and_are_answered_after_it() -> None:
    calls, out, resumed = await _run(send_early=True)
    assert calls[-1] == "pause"
    assert resumed >= 1
    tail = out.split(b"354 End data with <CR><LF>.<CR><LF>\r\n", 1)[1]
    assert tail == b"250 2.0.0 Ok: delivered\r\n250 2.0.0 OK\r\n"


async def test_commands_move_the_timeout_without_a_new_timer_each() -> None:
    """The timer set at the first command stays; it fires, finds the timeout moved
    later, and sets itself again: the session times out at the last command's time
    plus the command timeout, as if the timer were re-armed at every command."""
    loop = asyncio.get_running_loop()
    settings = targets.SMTP.model_copy(update={"command_timeout_seconds": 0.3})
    handler = Handler(settings, targets.ROUTES, _SlowDispatch(), targets._metrics())
    transport = _Transport(loop)
    session = _connect(handler, transport, settings)
    session.data_received(b"EHLO client.test\r\n")
    first = session._timer
    session.data_received(b"NOOP\r\nNOOP\r\n")
    assert session._timer is first  # moved later: not re-armed
    for _ in range(5):  # 0.5 s of commands, each well within the timeout
        await asyncio.sleep(0.1)
        session.data_received(b"NOOP\r\n")
        assert not transport.is_closing()
    last = loop.time()
    await asyncio.wait_for(transport.closed.wait(), 2)
    assert last + 0.29 <= loop.time() <= last + 0.6
