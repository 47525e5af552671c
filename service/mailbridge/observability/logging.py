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
from json.encoder import encode_basestring
from typing import Any

from mailbridge.config import LogSettings

try:
    from opentelemetry import trace as _trace
except ImportError:  # pragma: no cover - a declared dependency
    _trace = None  # type: ignore[assignment]

#: Attributes every LogRecord has; anything else came from ``extra=``.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


def _trace_ids() -> dict[str, str]:
    if _trace is None:  # pragma: no cover - a declared dependency
        return {}
    context = _trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


#: Field names the formatter itself writes: an ``extra=`` of one of them takes the slow path.
_OWN_FIELDS = frozenset({"time", "level", "logger", "event", "trace_id", "span_id"})
#: Encodes one field value exactly as ``json.dumps(document, default=str,
#: ensure_ascii=False)`` encodes it inside the document (made once, not per line).
_VALUE = json.JSONEncoder(default=str, ensure_ascii=False)


def _encode_value(value: Any) -> str:
    """``_VALUE.encode(value)``, with the common cases (a string, a list of strings) direct."""
    kind = type(value)
    if kind is str:
        return encode_basestring(value)
    if kind is list:
        items = []
        for item in value:
            if type(item) is not str:
                return _VALUE.encode(value)
            items.append(encode_basestring(item))
        return "[" + ", ".join(items) + "]"
    return _VALUE.encode(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per record; the bytes of ``json.dumps`` of the document, made cheaper.

    The per-message audit line is on the hot path: the constant parts (the level
    and logger fields, the time up to the second) are encoded once, each field
    value on its own, and the line is joined without building the document.
    Records with an exception, or an ``extra=`` field named like one of the
    formatter's own, take the plain ``json.dumps`` path.
    """

    def __init__(self) -> None:
        super().__init__()
        #: ``(levelname, logger) -> '", "level": ..., "event": '``.
        self._middles: dict[tuple[str, str], str] = {}
        #: The last whole second seen and its ISO text without the fraction.
        self._second = -1
        self._second_text = ""

    def format(self, record: logging.LogRecord) -> str:
        extras = _extras(record)
        if (record.exc_info and record.exc_info[0] is not None) or not _OWN_FIELDS.isdisjoint(
            extras
        ):
            return self._format_document(record, extras)
        key = (record.levelname, record.name)
        middle = self._middles.get(key)
        if middle is None:
            if len(self._middles) >= _MAX_MIDDLES:
                self._middles.clear()
            middle = self._middles[key] = (
                f', "level": {encode_basestring(record.levelname.lower())}'
                f', "logger": {_VALUE.encode(record.name)}, "event": '
            )
        parts = ['{"time": "', self._time_text(record.created), '"', middle]
        parts.append(_VALUE.encode(record.getMessage()))
        for name, value in extras.items():
            parts.append(", ")
            parts.append(encode_basestring(name))
            parts.append(": ")
            parts.append(_encode_value(value))
        ids = _trace_ids()
        if ids:
            parts.append(f', "trace_id": "{ids["trace_id"]}", "span_id": "{ids["span_id"]}"')
        parts.append("}")
        return "".join(parts)

    def _time_text(self, created: float) -> str:
        """``datetime.fromtimestamp(created, UTC).isoformat()``, the date part made once a second.

        The microseconds are rounded half to even, as ``fromtimestamp`` does.
        """
        if created < 0:  # before 1970: not worth a fast path
            return datetime.datetime.fromtimestamp(created, datetime.UTC).isoformat()
        second = int(created)
        micro = round((created - second) * 1e6)
        if micro >= 1_000_000:
            second, micro = second + 1, micro - 1_000_000
        if second != self._second:
            when = datetime.datetime.fromtimestamp(second, datetime.UTC)
            self._second, self._second_text = second, when.isoformat()[:-6]
        if micro == 0:  # isoformat leaves the fraction out
            return f"{self._second_text}+00:00"
        return f"{self._second_text}.{micro:06d}+00:00"

    def _format_document(self, record: logging.LogRecord, extras: dict[str, Any]) -> str:
        document: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
            **extras,
            **_trace_ids(),
        }
        if record.exc_info and record.exc_info[0] is not None:
            document["error"] = record.exc_info[0].__name__
            document["traceback"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str, ensure_ascii=False)


#: Bound on the (level, logger) pairs whose constant text is kept.
_MAX_MIDDLES = 256


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
