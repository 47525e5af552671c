"""An idle SMTP session costs little memory: no task, no stream, no per-session tables.

Counts what ``tracemalloc`` sees allocated per session while many sessions sit idle
after EHLO on in-memory transports (the socket transport itself is asyncio's and not
counted). The bench (``bench/run --memory-only``) measures the whole process.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc

from fuzz import targets
from mailbridge.smtp.handler import Handler
from mailbridge.smtp.limits import DataBudget, SessionLimits
from mailbridge.smtp.session import Session

SESSIONS = 300
#: The session's own share; the whole connection's target is 8 KiB.
MAX_BYTES_PER_SESSION = 3 * 1024


async def _idle_sessions(count: int) -> tuple[list[Session], list[targets._Transport]]:
    loop = asyncio.get_running_loop()
    handler = Handler(targets.SMTP, targets.ROUTES, targets._Dispatch(), targets._metrics())
    limits = SessionLimits(max_sessions=count, max_sessions_per_ip=count)
    budget = DataBudget(1024 * 1024)
    sessions, transports = [], []
    for _ in range(count):
        transport = targets._Transport(loop)
        session = targets.connect(handler, transport, limits=limits, budget=budget)
        session.data_received(b"EHLO client.test\r\n")
        transport.out.clear()
        sessions.append(session)
        transports.append(transport)
    await asyncio.sleep(0)
    return sessions, transports


def test_an_idle_session_after_ehlo_holds_a_few_kib_and_no_task() -> None:
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(_idle_sessions(10))  # warm caches and interned objects
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        sessions, transports = loop.run_until_complete(_idle_sessions(SESSIONS))
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        tasks = asyncio.all_tasks(loop)
        grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
        for transport in transports:
            transport.close()
        loop.run_until_complete(asyncio.sleep(0))
    finally:
        loop.close()
    assert set() == tasks, "an idle session must not keep a task"
    per_session = grown / SESSIONS
    assert per_session <= MAX_BYTES_PER_SESSION, f"{per_session:.0f} bytes per idle session"
    assert all(session.idle for session in sessions)
