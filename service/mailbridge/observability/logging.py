"""Logs: one JSON object per line, or a readable line on a terminal.

Fields: ``time``, ``level``, ``logger``, ``event`` (the message) and whatever the
caller passed in ``extra=`` (``route``, ``message_id``, ``outcome``, ...), plus
``trace_id``/``span_id`` when a span is active. Callers never pass bodies,
secrets or full addresses. Reads the ``log`` settings.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any

from mailbridge.config import LogSettings

#: Attributes every LogRecord has; anything else came from ``extra=``.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


def _trace_ids() -> dict[str, str]:
    try:
        from opentelemetry import trace
    except ImportError:  # pragma: no cover - a declared dependency
        return {}
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
            **_extras(record),
            **_trace_ids(),
        }
        if record.exc_info and record.exc_info[0] is not None:
            document["error"] = record.exc_info[0].__name__
            document["traceback"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str, ensure_ascii=False)


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        time = datetime.datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        fields = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = f"{time} {record.levelname:<7} {record.getMessage()}" + (
            f"  {fields}" if fields else ""
        )
        if record.exc_info and record.exc_info[0] is not None:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure(settings: LogSettings, *, stream: Any = None, demo: bool = False) -> None:
    """Install one handler on the root logger (replacing earlier ones).

    ``auto`` means readable lines on a terminal and in the local demo, JSON otherwise.
    """
    stream = stream if stream is not None else sys.stderr
    use_console = settings.format == "console" or (
        settings.format == "auto" and (demo or (hasattr(stream, "isatty") and stream.isatty()))
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(ConsoleFormatter() if use_console else JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.level)
