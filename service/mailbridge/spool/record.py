"""The spool file format: one file per accepted message. Pure; no I/O.

A spool file is written once at acceptance and only ever *appended to* after::

    MBSPOOL1\\n                              magic and format version
    {header JSON}\\n                         one line: ids, envelope, routes, trace carrier
    <raw message, header.size_bytes long>
    \\nEND <sha256 hex of all the above>\\n   the end marker: without it, it is not mail
    STATE {state JSON} <crc32 hex>\\n        zero or more; the last valid one is current

The header (:class:`Header`) never changes. The delivery state (:class:`State`:
per route pending/done/dead, attempts, next attempt, last error) starts as
"every route pending, nothing tried" and is appended as ``STATE`` records by
whoever owns the file (see :mod:`mailbridge.spool`). A file whose magic, header,
length or checksum is wrong is damaged (:class:`Damaged`), never mail. A torn or
garbled ``STATE`` record at the end (a crash mid-append) is ignored, and so is
everything after it: the previous state applies, which at worst repeats a
delivery with the same ``webhook-id``.

Times are Unix seconds (wall clock): they must survive restarts.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from mailbridge import payload
from mailbridge.payload import Envelope, TlsInfo

MAGIC = b"MBSPOOL1\n"
END = b"\nEND "
STATE = b"STATE "
DIGEST_HEX_CHARS = 64
#: A header line longer than this is damage, not a header (100 recipients fit easily).
MAX_HEADER_BYTES = 1024 * 1024

RouteStatus = Literal["pending", "done", "dead"]


class Damaged(ValueError):
    """The bytes are not a complete, intact spool file."""


@dataclass(frozen=True)
class Header:
    """What was accepted: fixed for the file's life."""

    queue_id: str  # the file's name: unique per acceptance
    webhook_id: str  # payload.stable_id: the same for the same envelope and bytes
    received_at: float
    envelope: Envelope
    #: Route name → the envelope recipients that route wants (fixed at acceptance).
    routes: Mapping[str, tuple[str, ...]]
    #: W3C trace context of the ``receive message`` span (links delivery spans to it).
    carrier: Mapping[str, str]
    size_bytes: int


@dataclass(frozen=True)
class RouteState:
    status: RouteStatus = "pending"
    attempts: int = 0
    next_attempt_at: float = 0.0
    last_error: str = ""


@dataclass(frozen=True)
class State:
    """Where delivery stands; the last ``STATE`` record, or the initial state."""

    routes: Mapping[str, RouteState]
    #: Age for ``spool.max_age_seconds`` counts from here: acceptance, or a manual retry.
    age_from: float
    updated_at: float
    #: Attempts refused by an open circuit (counted apart: they cost no attempt).
    deferrals: int = 0

    @classmethod
    def initial(cls, header: Header) -> State:
        routes = {name: RouteState(next_attempt_at=header.received_at) for name in header.routes}
        return cls(routes=routes, age_from=header.received_at, updated_at=header.received_at)

    @property
    def pending(self) -> list[str]:
        return [name for name, route in self.routes.items() if route.status == "pending"]

    @property
    def dead(self) -> list[str]:
        return [name for name, route in self.routes.items() if route.status == "dead"]

    @property
    def next_attempt_at(self) -> float | None:
        """When the earliest pending route is due; ``None`` when nothing is pending."""
        times = [r.next_attempt_at for r in self.routes.values() if r.status == "pending"]
        return min(times) if times else None

    @property
    def attempts(self) -> int:
        return sum(route.attempts for route in self.routes.values())

    @property
    def last_error(self) -> str:
        errors = [f"{n}: {r.last_error}" for n, r in self.routes.items() if r.last_error]
        return "; ".join(errors)

    def retried(self, now: float) -> State:
        """The state after a manual retry: dead routes pending again, all due now, age reset."""
        routes = {
            name: (
                route
                if route.status == "done"
                else RouteState(status="pending", next_attempt_at=now, last_error=route.last_error)
            )
            for name, route in self.routes.items()
        }
        return replace(self, routes=routes, age_from=now, updated_at=now)


# --- encoding -------------------------------------------------------------


def _envelope(data: Mapping[str, Any]) -> Envelope:
    tls = data.get("tls")
    return Envelope(
        mail_from=str(data["mail_from"]),
        rcpt_to=tuple(str(r) for r in data["rcpt_to"]),
        helo=data.get("helo"),
        client_ip=data.get("client_ip"),
        tls=TlsInfo(version=tls["version"], cipher=tls["cipher"]) if tls else None,
    )


def _json_line(data: Mapping[str, Any]) -> bytes:
    # ensure_ascii keeps lone surrogates (odd envelope text) encodable and the line one line.
    return json.dumps(data, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def encode_header(header: Header) -> bytes:
    return _json_line(
        {
            "queue_id": header.queue_id,
            "webhook_id": header.webhook_id,
            "received_at": header.received_at,
            "envelope": payload.envelope_json(header.envelope),
            "routes": {name: list(rcpts) for name, rcpts in header.routes.items()},
            "carrier": dict(header.carrier),
            "size_bytes": header.size_bytes,
        }
    )


def encode(header: Header, raw: bytes) -> list[bytes]:
    """The chunks of a new spool file (write them in order, e.g. with ``os.writev``)."""
    if len(raw) != header.size_bytes:
        raise ValueError("header.size_bytes must be the raw message's length")
    head = MAGIC + encode_header(header) + b"\n"
    digest = hashlib.sha256(head)
    digest.update(raw)
    return [head, raw, END + digest.hexdigest().encode("ascii") + b"\n"]


def encode_state(state: State) -> bytes:
    """One ``STATE`` record line, with its own CRC so a torn append is recognised."""
    body = _json_line(
        {
            "routes": {
                name: {
                    "status": route.status,
                    "attempts": route.attempts,
                    "next_attempt_at": route.next_attempt_at,
                    "last_error": route.last_error,
                }
                for name, route in state.routes.items()
            },
            "age_from": state.age_from,
            "updated_at": state.updated_at,
            "deferrals": state.deferrals,
        }
    )
    return STATE + body + b" " + f"{zlib.crc32(body):08x}".encode("ascii") + b"\n"


# --- decoding -------------------------------------------------------------


@dataclass(frozen=True)
class Parsed:
    header: Header
    state: State
    #: Offset of the raw message in the file.
    raw_offset: int
    #: Length of the immutable part (through the end marker): state records follow it.
    body_end: int
    #: Bytes of state records after the end marker.
    state_bytes: int = field(default=0)


def decode_header(line: bytes) -> Header:
    try:
        data = json.loads(line)
        return Header(
            queue_id=str(data["queue_id"]),
            webhook_id=str(data["webhook_id"]),
            received_at=float(data["received_at"]),
            envelope=_envelope(data["envelope"]),
            routes={str(k): tuple(str(r) for r in v) for k, v in data["routes"].items()},
            carrier={str(k): str(v) for k, v in (data.get("carrier") or {}).items()},
            size_bytes=int(data["size_bytes"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise Damaged(f"unreadable header ({type(error).__name__})") from None


def split_head(data: bytes) -> tuple[Header, int]:
    """The header and the raw message's offset, from the file's first bytes."""
    if not data.startswith(MAGIC):
        raise Damaged("no spool magic")
    newline = data.find(b"\n", len(MAGIC), len(MAGIC) + MAX_HEADER_BYTES)
    if newline < 0:
        raise Damaged("header line not terminated")
    header = decode_header(data[len(MAGIC) : newline])
    if header.size_bytes < 0:
        raise Damaged("negative size")
    return header, newline + 1


def decode_states(data: bytes, header: Header) -> tuple[State, int]:
    """The last valid state in the records ``data`` (after the end marker), and bytes used."""
    state = State.initial(header)
    used = 0
    for line in _lines(data):
        record = _decode_state(line, header)
        if record is None:
            break  # a torn or garbled record: it and anything after it do not count
        state = record
        used += len(line) + 1
    return state, used


def _lines(data: bytes) -> Iterable[bytes]:
    start = 0
    while True:
        end = data.find(b"\n", start)
        if end < 0:
            return
        yield data[start:end]
        start = end + 1


def _decode_state(line: bytes, header: Header) -> State | None:
    if not line.startswith(STATE):
        return None
    body, _, crc = line[len(STATE) :].rpartition(b" ")
    try:
        if int(crc, 16) != zlib.crc32(body):
            return None
        data = json.loads(body)
        routes = {
            str(name): RouteState(
                status=route["status"],
                attempts=int(route["attempts"]),
                next_attempt_at=float(route["next_attempt_at"]),
                last_error=str(route["last_error"]),
            )
            for name, route in data["routes"].items()
        }
        if set(routes) != set(header.routes) or any(
            r.status not in ("pending", "done", "dead") for r in routes.values()
        ):
            return None
        return State(
            routes=routes,
            age_from=float(data["age_from"]),
            updated_at=float(data["updated_at"]),
            deferrals=int(data.get("deferrals", 0)),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def decode(data: bytes, *, verify: bool = True) -> Parsed:
    """Parse a whole spool file; :class:`Damaged` unless complete (and, if asked, intact)."""
    header, raw_offset = split_head(data)
    end_at = raw_offset + header.size_bytes
    marker_end = end_at + len(END) + DIGEST_HEX_CHARS + 1
    if len(data) < marker_end or data[end_at : end_at + len(END)] != END:
        raise Damaged("no end marker (incomplete write)")
    if data[marker_end - 1 : marker_end] != b"\n":
        raise Damaged("end marker not terminated")
    if verify:
        expected = data[end_at + len(END) : marker_end - 1]
        digest = hashlib.sha256(memoryview(data)[:end_at]).hexdigest().encode("ascii")
        if digest != expected:
            raise Damaged("checksum mismatch")
    state, used = decode_states(data[marker_end:], header)
    return Parsed(header, state, raw_offset, marker_end, used)
