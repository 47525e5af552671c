"""Logs: one JSON object per line with the caller's fields; readable lines for the demo."""

from __future__ import annotations

import datetime
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


def _reference_line(record: logging.LogRecord) -> str:
    """What the JSON formatter wrote before its fast path: ``json.dumps`` of the document."""
    document = {
        "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
        "level": record.levelname.lower(),
        "logger": record.name,
        "event": record.getMessage(),
        **logs._extras(record),
        **logs._trace_ids(),
    }
    return json.dumps(document, default=str, ensure_ascii=False)


@pytest.mark.parametrize(
    "created",
    [
        1_700_000_000.0,  # no fraction: isoformat leaves it out
        1_700_000_000.5,
        1_700_000_000.0000005,  # half a microsecond: rounded to even
        1_700_000_000.9999996,  # rounds up into the next second
        1_700_000_001.123456,
        -1.25,
    ],
)
@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"message_id": "abc", "routes": ["billing", "audit"], "outcome": "delivered"},
        {"route": 'é\u2028"\\\n', "count": 3, "ratio": 0.5, "none": None, "flag": True},
        {"routes": [], "mixed": ["a", 1], "nested": {"k": [1, None]}, "raw": b"x"},
        {"error": ValueError("boom"), "big": 10**30, "nan": float("nan")},
        {"time": "mine", "event": "theirs"},  # fields named like the formatter's own
        {"trace_id": "t"},
    ],
)
def test_json_lines_are_exactly_json_dumps_of_the_document(
    created: float, extra: dict[str, object]
) -> None:
    formatter = logs.JsonFormatter()
    for name, message in (("mailbridge.pipeline", "message delivered"), ("é", 'say "%s"')):
        record = logging.LogRecord(name, logging.INFO, __file__, 1, message, ("x",), None)
        if "%s" not in message:
            record.args = ()
        record.created = created
        record.__dict__.update(extra)
        for _ in range(2):  # the second time from what the formatter keeps
            assert formatter.format(record) == _reference_line(record)


def test_json_lines_carry_the_current_span_ids() -> None:
    from opentelemetry import trace

    context = trace.SpanContext(0xABC, 0xDEF, is_remote=False, trace_flags=trace.TraceFlags(1))
    record = logging.LogRecord("mailbridge.x", logging.INFO, __file__, 1, "hi", (), None)
    record.route = "billing"
    with trace.use_span(trace.NonRecordingSpan(context)):
        line = logs.JsonFormatter().format(record)
        assert line == _reference_line(record)
    fields = json.loads(line)
    assert (fields["trace_id"], fields["span_id"]) == (f"{0xABC:032x}", f"{0xDEF:016x}")
