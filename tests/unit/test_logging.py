"""Logs: one JSON object per line with the caller's fields; readable lines for the demo."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from fuzz import targets
from mailbridge.config import LogSettings
from mailbridge.observability import logging as logs


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_level_event_and_extra_fields() -> None:
    stream = io.StringIO()
    logs.configure(LogSettings(format="json"), stream=stream)
    logging.getLogger("mailbridge.test").info("delivered", extra={"route": "billing"})
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("mailbridge.test").exception("failed")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines() if line[:1] == "{")
    assert ("info", "delivered", "billing") == (first["level"], first["event"], first["route"])
    assert ("error", "ValueError") == (second["level"], second["error"])


def test_auto_format_is_readable_in_the_demo_and_json_otherwise() -> None:
    stream = io.StringIO()
    logs.configure(LogSettings(format="auto"), stream=stream, demo=True)
    logging.getLogger("mailbridge.test").warning("hello", extra={"route": "demo"})
    assert "WARNING hello  route=demo" in stream.getvalue()
    stream = io.StringIO()
    logs.configure(LogSettings(format="auto"), stream=stream)
    logging.getLogger("mailbridge.test").warning("hello")
    assert "hello" == json.loads(stream.getvalue())["event"]


def test_smtp_command_lines_and_addresses_are_not_logged_at_info() -> None:
    """At INFO, a whole SMTP session (PROXY-less, EHLO to QUIT) logs no command line
    and no address: aiosmtpd, our former SMTP layer, logged every command line."""
    stream = io.StringIO()
    logs.configure(LogSettings(level="INFO", format="json"), stream=stream)
    replies = targets.smtp_session(
        [
            b"EHLO client.test\r\nMAIL FROM:<secret.sender@sender.test>\r\n",
            b"RCPT TO:<billing@example.com>\r\nDATA\r\n",
            b"Subject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n",
        ]
    )
    assert replies[-1].startswith("221")
    text = stream.getvalue()
    assert "secret.sender" not in text
    assert "billing@example.com" not in text
    assert "EHLO" not in text
