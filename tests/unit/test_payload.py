"""payload: the documented JSON shape, route privacy, and an id that is stable across retries."""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime, timedelta, timezone
from importlib import resources
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from mailbridge import payload
from mailbridge.parsing import Attachment, Mailbox, Message, parse
from mailbridge.payload import Envelope, TlsInfo, build, encode, stable_id

MESSAGES = Path(__file__).parent / "messages"
SCHEMA = json.loads(
    resources.files("mailbridge").joinpath("schema/payload.schema.json").read_text("utf-8")
)
VALIDATOR = Draft202012Validator(SCHEMA, format_checker=Draft202012Validator.FORMAT_CHECKER)
RECEIVED_AT = datetime(2024, 4, 10, 12, 0, 3, 250000, tzinfo=timezone(timedelta(hours=2)))
ENVELOPE = Envelope(
    mail_from="bounce-1001@shop.example",
    rcpt_to=("Customer+Orders@example.com", "billing@example.com"),
    helo="mta.shop.example",
    client_ip="192.0.2.25",
    tls=TlsInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384"),
)


def empty_message(**fields: Any) -> Message:
    empty: dict[str, Any] = {
        "subject": "",
        "sender": None,
        "to": (),
        "cc": (),
        "reply_to": (),
        "message_id": None,
        "date": None,
        "text": "",
        "html": None,
        "headers": {},
        "attachments": (),
        "defects": (),
    }
    return Message(**(empty | fields))


def build_for(message: Message, **overrides: Any) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "id": "msg_test",
        "message": message,
        "envelope": ENVELOPE,
        "route": "orders",
        "recipients": ["Customer+Orders@example.com"],
        "received_at": RECEIVED_AT,
        "size_bytes": 100,
    }
    return build(**(arguments | overrides))


def test_schema_is_valid_draft_2020_12_and_describes_every_property() -> None:
    Draft202012Validator.check_schema(SCHEMA)

    def undocumented(node: object, path: str) -> list[str]:
        found: list[str] = []
        if isinstance(node, dict):
            for name, child in node.get("properties", {}).items():
                if "description" not in child:
                    found.append(f"{path}/{name}")
            for key, child in node.items():
                found += undocumented(child, f"{path}/{key}")
        elif isinstance(node, list):
            for child in node:
                found += undocumented(child, path)
        return found

    assert [] == undocumented(SCHEMA, "")


def test_golden_payload_of_a_realistic_message() -> None:
    raw = (MESSAGES / "order_confirmation.eml").read_bytes()
    message = parse(raw, header_prefixes=["X-", "List-"], max_inline_attachment_bytes=60)
    document = build(
        id=stable_id(ENVELOPE, raw),
        message=message,
        envelope=ENVELOPE,
        route="orders",
        recipients=["Customer+Orders@example.com"],
        received_at=RECEIVED_AT,
        size_bytes=len(raw),
    )
    expected = {
        "schema_version": 1,
        "id": stable_id(ENVELOPE, raw) + ".orders",
        "received_at": "2024-04-10T10:00:03.250Z",
        "route": "orders",
        "sender": "orders@shop.example",
        "sender_name": "Schönes Shop",
        "recipient": "Customer+Orders@example.com",
        "recipients": ["Customer+Orders@example.com"],
        "tags": {"Customer+Orders@example.com": "orders"},
        "subject": "Order 1001 confirmed ✓",
        "body": "Thank you for your order!\n\nOrder 1001: 2 \u00d7 Espresso cups, 24,00 €",
        "html_body": '<p><img src="cid:logo@shop.example"></p><p>Thank you for your order!</p>'
        "<p>Order 1001: 2 &times; Espresso cups, 24,00 &euro;</p>",
        "headers": {
            "X-Order-Id": "1001",
            "List-Unsubscribe": "<https://shop.example/unsubscribe?u=42>",
        },
        "attachments": [
            {
                "filename": "logo.png",
                "content_type": "image/png",
                "size_bytes": 66,
                "content_id": "logo@shop.example",
                "disposition": "inline",
                "data": None,  # 66 bytes: over the cap of 60
                "truncated": True,
            },
            {
                "filename": "order-1001.pdf",
                "content_type": "application/pdf",
                "size_bytes": 59,
                "content_id": None,
                "disposition": "attachment",
                "data": (
                    "JVBERi0xLjQKJSBtYWlsYnJpZGdlIHRlc3QgZmlsZQoxIDAgb2JqIDw8ID4+IGVuZG9iagolJUVPRgo="
                ),
                "truncated": False,
            },
        ],
        "message_id": "order-1001.1712743200@shop.example",
        "date": "2024-04-10T12:00:00+02:00",
        "to": [
            {"name": "Customer", "address": "customer+orders@example.com"},
            {"name": "", "address": "archive@shop.example"},
        ],
        "cc": [{"name": "Support Team", "address": "support@shop.example"}],
        "reply_to": [{"name": "Support", "address": "support@shop.example"}],
        "size_bytes": len(raw),
        "envelope": {
            "mail_from": "bounce-1001@shop.example",
            "rcpt_to": ["Customer+Orders@example.com"],
            "helo": "mta.shop.example",
            "client_ip": "192.0.2.25",
            "tls": {"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384"},
        },
        "defects": [],
    }
    assert expected == document
    assert expected == json.loads(encode(document))
    VALIDATOR.validate(document)


def test_other_routes_recipients_never_appear_in_a_document() -> None:
    document = build_for(empty_message(), route="billing", recipients=["billing@example.com"])
    assert "Customer+Orders" not in encode(document).decode()
    assert (["billing@example.com"], ["billing@example.com"], "billing@example.com") == (
        document["recipients"],
        document["envelope"]["rcpt_to"],
        document["recipient"],
    )


def test_sender_falls_back_to_the_envelope_without_a_readable_from() -> None:
    assert ("bounce-1001@shop.example", "") == tuple(
        build_for(empty_message())[key] for key in ("sender", "sender_name")
    )
    nameless = empty_message(sender=Mailbox("Only A Name", ""))
    assert ("bounce-1001@shop.example", "Only A Name") == tuple(
        build_for(nameless)[key] for key in ("sender", "sender_name")
    )


def test_null_sender_and_plain_text_session_are_empty_and_null() -> None:
    envelope = Envelope(
        mail_from="", rcpt_to=("a@example.com",), helo=None, client_ip=None, tls=None
    )
    document = build_for(empty_message(), envelope=envelope, recipients=["a@example.com"])
    expected_envelope = {
        "mail_from": "",
        "rcpt_to": ["a@example.com"],
        "helo": None,
        "client_ip": None,
        "tls": None,
    }
    assert ("", expected_envelope) == (document["sender"], document["envelope"])
    VALIDATOR.validate(document)


def test_tags_map_only_tagged_recipients_to_their_tag() -> None:
    recipients = ["plain@example.com", "user+Invoices@example.com", "user+@example.com"]
    assert {"user+Invoices@example.com": "invoices"} == build_for(
        empty_message(), recipients=recipients
    )["tags"]


def test_attachment_over_the_cap_is_marked_truncated() -> None:
    big = Attachment("big.bin", "application/octet-stream", 11 * 2**20, None, "attachment", None)
    (attachment,) = build_for(empty_message(attachments=(big,)))["attachments"]
    assert (None, True) == (attachment["data"], attachment["truncated"])


def test_received_at_is_utc_with_z_and_naive_times_are_taken_as_utc() -> None:
    naive = datetime(2024, 1, 2, 3, 4, 5)
    assert (
        "2024-01-02T03:04:05.000Z" == build_for(empty_message(), received_at=naive)["received_at"]
    )
    aware = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert (
        "2024-01-02T03:04:05.000Z" == build_for(empty_message(), received_at=aware)["received_at"]
    )


def test_encode_is_compact_utf8_not_ascii_escaped() -> None:
    assert b'{"a":"\xc3\xa9","b":[1,null]}' == encode({"a": "é", "b": [1, None]})


def test_encode_replaces_lone_surrogates_and_joins_pairs() -> None:
    encoded = encode({"lone": "a\udce9b", "pair": "\ud83d\ude00"})
    assert {"lone": "a\ufffdb", "pair": "\U0001f600"} == json.loads(encoded)


# --- stable_id -------------------------------------------------------------


def envelope(mail_from: str = "a@example.org", *rcpt_to: str) -> Envelope:
    return Envelope(mail_from, rcpt_to or ("b@example.com",), "helo", "192.0.2.1", None)


def test_stable_id_is_pinned() -> None:
    """Changing the id scheme would make a message retried across an upgrade look new."""
    assert "msg_azh2b3jmym2zxykdkvg5avrsbwydmden" == stable_id(
        Envelope("", (), None, None, None), b""
    )


def test_stable_id_ignores_recipient_order_case_and_connection_details() -> None:
    raw = b"Subject: x\r\n\r\nbody"
    first = Envelope("a@example.org", ("B@example.com", "c@example.com"), "h1", "192.0.2.1", None)
    retry = Envelope(
        "a@example.org",
        ("c@example.com", "b@EXAMPLE.com"),
        "h2",
        "198.51.100.7",
        TlsInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256"),
    )
    assert stable_id(first, raw) == stable_id(retry, raw)
    assert re.fullmatch(r"msg_[a-z2-7]{32}", stable_id(first, raw))


def test_stable_id_framing_is_unambiguous() -> None:
    """Moving bytes between the sender, a recipient and the message changes the id."""
    ids = {
        stable_id(envelope("ab", "c"), b"d"),
        stable_id(envelope("a", "bc"), b"d"),
        stable_id(envelope("a", "b"), b"cd"),
        stable_id(envelope("a", "b", "c"), b"d"),
        stable_id(envelope("a", "bcd"), b""),
        stable_id(envelope("abcd", "x"), b""),
    }
    assert 6 == len(ids)


ADDRESSES = st.text(max_size=30)


@settings(max_examples=200, deadline=None)
@given(
    mail_from=ADDRESSES,
    rcpt=st.lists(ADDRESSES, min_size=1, max_size=4),
    raw=st.binary(max_size=200),
)
def test_stable_id_is_equal_for_equal_inputs(mail_from: str, rcpt: list[str], raw: bytes) -> None:
    again = Envelope(str(mail_from), tuple(reversed(rcpt)), None, None, None)
    assert stable_id(Envelope(mail_from, tuple(rcpt), None, None, None), raw) == stable_id(
        again, bytes(raw)
    )


@settings(max_examples=200, deadline=None)
@given(
    one=st.tuples(ADDRESSES, st.lists(ADDRESSES, min_size=1, max_size=3), st.binary(max_size=50)),
    two=st.tuples(ADDRESSES, st.lists(ADDRESSES, min_size=1, max_size=3), st.binary(max_size=50)),
)
def test_stable_id_differs_when_envelope_or_bytes_differ(
    one: tuple[str, list[str], bytes], two: tuple[str, list[str], bytes]
) -> None:
    def key(item: tuple[str, list[str], bytes]) -> tuple[str, list[str], bytes]:
        return item[0], sorted(r.lower() for r in item[1]), item[2]

    first = stable_id(Envelope(one[0], tuple(one[1]), None, None, None), one[2])
    second = stable_id(Envelope(two[0], tuple(two[1]), None, None, None), two[2])
    assert (key(one) == key(two)) == (first == second)


# --- properties: every document is valid and survives JSON -----------------

ANY_TEXT = st.text(st.characters(codec=None), max_size=40)  # includes lone surrogates
CLEAN_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40)
MAILBOXES = st.lists(st.builds(Mailbox, CLEAN_TEXT, CLEAN_TEXT), max_size=3).map(tuple)
ATTACHMENTS = st.builds(
    Attachment,
    filename=st.none() | CLEAN_TEXT,
    content_type=CLEAN_TEXT,
    size_bytes=st.integers(0, 2**40),
    content_id=st.none() | CLEAN_TEXT,
    disposition=st.sampled_from(["attachment", "inline"]),
    data=st.none() | st.binary(max_size=30).map(lambda b: base64.b64encode(b).decode("ascii")),
)
MESSAGES_ST = st.builds(
    Message,
    subject=CLEAN_TEXT,
    sender=st.none() | st.builds(Mailbox, CLEAN_TEXT, CLEAN_TEXT),
    to=MAILBOXES,
    cc=MAILBOXES,
    reply_to=MAILBOXES,
    message_id=st.none() | CLEAN_TEXT,
    date=st.none() | CLEAN_TEXT,
    text=CLEAN_TEXT,
    html=st.none() | CLEAN_TEXT,
    headers=st.dictionaries(CLEAN_TEXT, CLEAN_TEXT, max_size=3),
    attachments=st.lists(ATTACHMENTS, max_size=3).map(tuple),
    defects=st.lists(CLEAN_TEXT, max_size=3).map(tuple),
)
OFFSETS = st.timedeltas(-timedelta(hours=23), timedelta(hours=23)).map(timezone)
ENVELOPES = st.builds(
    Envelope,
    mail_from=ANY_TEXT,
    rcpt_to=st.lists(ANY_TEXT, max_size=3).map(tuple),
    helo=st.none() | ANY_TEXT,
    client_ip=st.none() | ANY_TEXT,
    tls=st.none() | st.builds(TlsInfo, ANY_TEXT, ANY_TEXT),
)


@settings(max_examples=200, deadline=None)
@given(
    message=MESSAGES_ST,
    envelope=ENVELOPES,
    route=ANY_TEXT,
    recipients=st.lists(ANY_TEXT, max_size=3),
    received_at=st.datetimes(
        min_value=datetime(1970, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.one_of(st.none(), OFFSETS),
    ),
    size_bytes=st.integers(0, 2**40),
)
def test_encoded_document_always_validates_and_round_trips(
    message: Message,
    envelope: Envelope,
    route: str,
    recipients: list[str],
    received_at: datetime,
    size_bytes: int,
) -> None:
    document = build(
        id=stable_id(envelope, b"raw"),
        message=message,
        envelope=envelope,
        route=route,
        recipients=recipients,
        received_at=received_at,
        size_bytes=size_bytes,
    )
    encoded = encode(document)
    decoded = json.loads(encoded.decode("utf-8"))
    VALIDATOR.validate(decoded)
    assert encoded == encode(decoded)  # stable: decoding and encoding again changes nothing
    try:
        json.dumps(document, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from the envelope became U+FFFD
        return
    assert document == decoded


@settings(max_examples=100, deadline=None)
@given(raw=st.binary(max_size=1500))
def test_documents_from_arbitrary_bytes_validate(raw: bytes) -> None:
    document = build_for(parse(raw, header_prefixes=["X-", "Content-", "Subject"]))
    VALIDATOR.validate(json.loads(encode(document)))


def test_schema_version_constant_matches_the_schema() -> None:
    assert SCHEMA["properties"]["schema_version"]["const"] == payload.SCHEMA_VERSION


def test_delivery_ids_differ_per_route_and_keep_the_message_id() -> None:
    from mailbridge.payload import delivery_id

    assert "msg_abc.billing" == delivery_id("msg_abc", "billing")
    assert delivery_id("msg_abc", "billing") != delivery_id("msg_abc", "support")
