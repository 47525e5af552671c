"""Fixtures for the hardening suite: a real bridge and a real verifying receiver.

The default bridge has an exact route, a domain route and a catch-all route
(``*``), because the open-relay tests must hold even when every address is
wanted. Limits are small so the tests reach them quickly.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mailbridge.delivery import signing
from tests.support.bridge import BridgeThread, route
from tests.support.receiver import ReceiverThread

SECRET = signing.new_secret()
SMTP_LIMITS = {
    "max_recipients": 5,
    "max_unknown_recipients": 3,
    "max_message_size_bytes": 64 * 1024,
    "max_line_length_bytes": 2000,
    "max_sessions_per_ip": 8,
}


@pytest.fixture
def receiver() -> Iterator[ReceiverThread]:
    with ReceiverThread(secrets=[SECRET]) as rx:
        yield rx


def routes(receiver: ReceiverThread, *, catch_all: bool = True) -> list[dict[str, object]]:
    found = [
        route("billing", ["billing@example.com"], receiver.url_for("/billing"), secrets=[SECRET]),
        route("support", ["*@support.example.com"], receiver.url_for("/support"), secrets=[SECRET]),
    ]
    if catch_all:
        found.append(route("all", ["*"], receiver.url_for("/all"), secrets=[SECRET]))
    return found


@pytest.fixture
def bridge(receiver: ReceiverThread) -> Iterator[BridgeThread]:
    """A bridge with a catch-all route: every well-formed address is wanted."""
    with BridgeThread(
        routes=routes(receiver),
        smtp=SMTP_LIMITS,
        delivery={"sync_attempts": 1, "sync_budget_seconds": 10},
    ) as running:
        yield running


@pytest.fixture
def strict_bridge(receiver: ReceiverThread) -> Iterator[BridgeThread]:
    """A bridge without a catch-all: unknown recipients are refused."""
    with BridgeThread(
        routes=routes(receiver, catch_all=False),
        smtp=SMTP_LIMITS,
        delivery={"sync_attempts": 1, "sync_budget_seconds": 10},
    ) as running:
        yield running
