"""Payload: the JSON document POSTed for one (message, route), and its stable id. Pure; no I/O.

Trusts its inputs: a :class:`~mailbridge.parsing.Message` (already made safe by
parsing), the SMTP envelope as the session accepted it, and the recipients that
routing gave this route. Emits a plain ``dict`` (:func:`build`) and its compact
UTF-8 JSON (:func:`encode`), described by ``schema/payload.schema.json`` (JSON
Schema 2020-12, version :data:`SCHEMA_VERSION`).

MailLaser's field names (``sender``, ``sender_name``, ``recipient``, ``subject``,
``body``, ``html_body``, ``headers``, ``attachments``) keep their meaning, so its
receivers work unchanged. A document names only its own route's envelope
recipients (``recipient``, ``recipients``, ``tags``, ``envelope.rcpt_to``): one
route never learns who else the message was for. ``to`` and ``cc`` are what
the sender wrote in the headers.

:func:`stable_id` is the same for the same envelope and bytes, so a message the
sending MTA retries keeps its id and receivers can de-duplicate on it.

Reads no settings. Known limit: attachments travel inline as base64 (up to the
parsing cap), so one document can be tens of MiB.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mailbridge import routing
from mailbridge.parsing import Attachment, Base64Source, Mailbox, Message, TextSource

SCHEMA_VERSION = 1
ID_PREFIX = "msg_"
_ID_DIGEST_BYTES = 20
_ID_DOMAIN = b"mailbridge/stable_id/v1"


@dataclass(frozen=True)
class TlsInfo:
    version: str  # e.g. 'TLSv1.3'
    cipher: str


@dataclass(frozen=True)
class Envelope:
    mail_from: str  # '' for the null sender <>
    rcpt_to: tuple[str, ...]  # all accepted envelope recipients, as received
    helo: str | None
    client_ip: str | None
    tls: TlsInfo | None


def _frame(data: bytes) -> bytes:
    return struct.pack(">Q", len(data)) + data


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # total and one-to-one, even for odd input


def stable_id(envelope: Envelope, raw: bytes) -> str:
    """``msg_`` + base32 of SHA-256 over the sender, the sorted recipients and the bytes."""
    recipients = sorted(r.lower() for r in envelope.rcpt_to)
    digest = hashlib.sha256(_ID_DOMAIN)
    digest.update(_frame(_utf8(envelope.mail_from)))
    digest.update(struct.pack(">Q", len(recipients)))
    for recipient in recipients:
        digest.update(_frame(_utf8(recipient)))
    digest.update(struct.pack(">Q", len(raw)))
    digest.update(raw)
    encoded = base64.b32encode(digest.digest()[:_ID_DIGEST_BYTES]).decode("ascii")
    return ID_PREFIX + encoded.rstrip("=").lower()


def envelope_json(envelope: Envelope, *, rcpt_to: Sequence[str] | None = None) -> dict[str, Any]:
    """The envelope as JSON; ``rcpt_to`` narrows it to one route's recipients."""
    return {
        "mail_from": envelope.mail_from,
        "rcpt_to": list(envelope.rcpt_to if rcpt_to is None else rcpt_to),
        "helo": envelope.helo,
        "client_ip": envelope.client_ip,
        "tls": (
            {"version": envelope.tls.version, "cipher": envelope.tls.cipher}
            if envelope.tls is not None
            else None
        ),
    }


def delivery_id(message_id: str, route: str) -> str:
    """The id of one (message, route) delivery: the payload's ``id`` and ``webhook-id``.

    Per route, so a receiver behind two routes de-duplicates retries without
    dropping the other route's delivery; prefixed by the message's id (the one
    named in the 250 reply and the logs), so both can be correlated. Route names
    cannot contain ``.``.
    """
    return f"{message_id}.{route}"


def _timestamp(moment: datetime) -> str:
    """ISO 8601 in UTC with ``Z``; a naive time is taken to be UTC already."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _mailboxes(mailboxes: Sequence[Mailbox]) -> list[dict[str, str]]:
    return [{"name": m.name, "address": m.address} for m in mailboxes]


def _attachment(attachment: Attachment) -> dict[str, Any]:
    return {
        "filename": attachment.filename,
        "content_type": attachment.content_type,
        "size_bytes": attachment.size_bytes,
        "content_id": attachment.content_id,
        "disposition": attachment.disposition,
        "data": attachment.data,
        "truncated": attachment.data is None,
    }


def _tags(recipients: Sequence[str]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for recipient in recipients:
        parts = routing.split(recipient)
        if parts is not None and parts.tag:
            tags[recipient] = parts.tag
    return tags


def build(
    *,
    id: str,
    message: Message,
    envelope: Envelope,
    route: str,
    recipients: Sequence[str],
    received_at: datetime,
    size_bytes: int,
) -> dict[str, Any]:
    """The document for ``route``, which wants ``recipients`` (a subset of the envelope's).

    ``id`` is the message's id; the document's ``id`` is :func:`delivery_id` of it.
    """
    recipients = list(recipients)
    sender = message.sender
    # No readable From: the envelope sender is the best we know.
    sender_address = sender.address if sender and sender.address else envelope.mail_from
    return {
        "schema_version": SCHEMA_VERSION,
        "id": delivery_id(id, route),
        "received_at": _timestamp(received_at),
        "route": route,
        "sender": sender_address,
        "sender_name": sender.name if sender is not None else "",
        "recipient": recipients[0] if recipients else "",
        "recipients": recipients,
        "tags": _tags(recipients),
        "subject": message.subject,
        "body": message.text,
        "html_body": message.html,
        "headers": dict(message.headers),
        "attachments": [_attachment(a) for a in message.attachments],
        "message_id": message.message_id,
        "date": message.date,
        "to": _mailboxes(message.to),
        "cc": _mailboxes(message.cc),
        "reply_to": _mailboxes(message.reply_to),
        "size_bytes": size_bytes,
        "envelope": envelope_json(envelope, rcpt_to=recipients),
        "defects": list(message.defects),
    }


def encode(payload: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON; lone surrogates (from odd envelope text) become U+FFFD."""
    return _utf8_json(json.dumps(dict(payload), ensure_ascii=False, separators=(",", ":")))


def _utf8_json(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # Surrogate pairs join; lone surrogates become U+FFFD. JSON stays valid:
        # only characters inside string literals change.
        fixed = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return fixed.encode("utf-8")


@dataclass(frozen=True)
class Document:
    """An encoded document held in pieces: joined, they are :func:`encode`'s bytes.

    Pieces may be shared between documents (one big body, several routes) and
    are never changed. Sign and send it piece by piece: no whole copy is made.
    """

    parts: tuple[bytes, ...]

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts)

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.parts)


def json_string(chunks: Iterable[str]) -> tuple[bytes, ...]:
    """The UTF-8 JSON string literal of the text ``chunks`` make, as :func:`encode` writes it."""
    return (b'"', *json_string_inside(chunks), b'"')


def json_string_inside(chunks: Iterable[str]) -> Iterator[bytes]:
    """:func:`json_string` without its quotes, one piece per chunk, as they are made."""
    for chunk in chunks:
        yield _utf8_json(json.dumps(chunk, ensure_ascii=False)[1:-1])


def encode_document(
    payload: Mapping[str, Any],
    *,
    body: Sequence[bytes] | None = None,
    strings: Mapping[str, Sequence[bytes]] | None = None,
) -> Document:
    """:func:`encode` as a :class:`Document`; ``body``, when given, is the ``body`` field.

    ``body`` is a :func:`json_string` made once per message (the document's own
    ``body`` value is then ignored), so a big text body is never one ``str``,
    never copied per route and never joined with the rest.

    ``strings`` maps string values of the document that are keys (an attachment's
    ``data`` from :func:`mailbridge.parsing.parse_streamed`) to the JSON strings
    that stand for them (:func:`base64_string`), spliced in the same way. Each
    key must occur exactly once in the document.
    """
    if body is None and not strings:
        return Document((encode(payload),))
    spliced: dict[str, Sequence[bytes]] = {}
    if body is not None:
        marker = f"mailbridge-body-{secrets.token_hex(16)}"
        payload = {**payload, "body": marker}
        spliced[f'"{marker}"'] = body
    for key, pieces in (strings or {}).items():
        spliced[json.dumps(key, ensure_ascii=False)] = pieces
    text = json.dumps(dict(payload), ensure_ascii=False, separators=(",", ":"))
    found: list[tuple[int, str]] = []
    for quoted in spliced:
        at = text.find(quoted)
        if at < 0 or text.find(quoted, at + 1) >= 0:  # cannot happen: random keys, once
            raise ValueError("a spliced value is not found exactly once in the document")
        found.append((at, quoted))
    parts: list[bytes] = []
    done = 0
    for at, quoted in sorted(found):
        parts.append(_utf8_json(text[done:at]))
        parts.extend(spliced[quoted])
        done = at + len(quoted)
    parts.append(_utf8_json(text[done:]))
    return Document(tuple(parts))


def base64_string(source: Base64Source) -> tuple[bytes, ...]:
    """The JSON string of a streamed attachment's ``data`` (see :func:`encode_document`).

    Base64 needs no escaping: the pieces are the source's, between quotes.
    """
    return (b'"', *source.chunks(), b'"')


def text_body(source: TextSource) -> tuple[bytes, ...]:
    """The JSON string of a streamed text body (see :func:`encode_document`)."""
    return json_string(source.chunks())
