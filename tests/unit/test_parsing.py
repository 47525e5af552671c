"""parsing: every fixture message reads to exactly these fields, and no input makes it raise."""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailbridge import parsing
from mailbridge.parsing import Attachment, Mailbox, Message, parse

MESSAGES = Path(__file__).parent / "messages"
FIXTURES = sorted(path.name for path in MESSAGES.glob("*.eml"))
PREFIXES = ("X-", "List-")

PDF = b"%PDF-1.4\n% mailbridge test file\n1 0 obj << >> endobj\n%%EOF\n"
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)
NESTED = (
    b"From: Carol <carol@example.com>\r\n"
    b"To: alice@example.org\r\n"
    b"Subject: Original question\r\n"
    b"Date: Thu, 11 Apr 2024 10:00:00 +0000\r\n"
    b"Message-ID: <original-1@example.com>\r\n"
    b'Content-Type: multipart/alternative; boundary="nested-b"\r\n'
    b"\r\n"
    b"--nested-b\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Can you check this?\r\n"
    b"--nested-b\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"\r\n"
    b"<p>Can you check this?</p>\r\n"
    b"--nested-b--\r\n"
)


def read(name: str) -> bytes:
    return (MESSAGES / name).read_bytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def message(**fields: Any) -> Message:
    """A Message with everything empty except ``fields``."""
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


EXPECTED: dict[str, Message] = {
    "alternative.eml": message(
        subject="Quarterly report",
        sender=Mailbox("Alice Example", "alice@example.org"),
        to=(Mailbox("Bob", "bob@example.com"), Mailbox("", "carol@example.com")),
        cc=(Mailbox("Dave, Jr.", "dave@example.net"),),
        reply_to=(Mailbox("", "replies@example.org"),),
        message_id="20240115093000.1234@mail.example.org",
        date="2024-01-15T09:30:00-05:00",
        text="Hi Bob,\n\nThe report is ready — see the numbers below.\n\nRevenue: 1\xa0234 €",
        html="<html><body><p>Hi Bob,</p><p>The report is ready — see the numbers below.</p>"
        "<p>Revenue: 1&nbsp;234 &euro;</p></body></html>",
        headers={
            "X-Mailer": "ExampleMailer 2.1",
            "X-Tag": "first, second",
            "List-Id": "Reports <reports.example.org>",
        },
    ),
    "html_only.eml": message(
        subject="Welcome aboard",
        sender=Mailbox("Newsletter", "news@shop.example"),
        to=(Mailbox("", "subscriber@example.com"),),
        message_id="welcome-42@shop.example",
        date="2024-03-01T08:00:00+01:00",
        text="# Welcome, Zoë\n\nClick [here](https://shop.example/start) to begin.",
        html="<html><head><style>p { color: red; }</style></head><body>\n"
        "<h1>Welcome, Zoë</h1>\n"
        '<p>Click <a href="https://shop.example/start">here</a> to begin.'
        '<img src="https://shop.example/pixel.gif" alt="pixel"></p>\n'
        "</body></html>\n",
    ),
    "attachments.eml": message(
        subject="Rechnung Nr. 42 \u2013 Übersicht",
        sender=Mailbox("Billing", "billing@vendor.example"),
        to=(Mailbox("", "accounts@example.com"),),
        message_id="invoice-42@vendor.example",
        date="2024-04-02T17:45:10+02:00",
        text="Please find the invoice attached.",
        attachments=(
            Attachment("invoice-42.pdf", "application/pdf", 59, None, "attachment", b64(PDF)),
            Attachment(
                "Übersicht 2024.csv",
                "text/csv",
                19,
                None,
                "attachment",
                b64(b"month,total\r\njan,10"),
            ),
            Attachment("résumé.txt", "text/plain", 6, None, "attachment", b64(b"R\xe9sum\xe9")),
            Attachment(None, "application/octet-stream", 4, None, "attachment", "AAEC/w=="),
        ),
    ),
    "related_inline_image.eml": message(
        subject="Your order has shipped",
        sender=Mailbox("Shop, The", "shop@shop.example"),
        to=(Mailbox("", "customer+orders@example.com"),),
        message_id="ship-1001@shop.example",
        date="2024-04-10T12:00:00+00:00",
        text="Your order 1001 has shipped.",
        html='<p><img src="cid:logo@shop.example"> Your order 1001 has shipped.</p>',
        attachments=(
            Attachment("logo.png", "image/png", 66, "logo@shop.example", "inline", b64(PNG)),
            Attachment(None, "image/png", 66, "spacer@shop.example", "inline", b64(PNG)),
        ),
    ),
    "iso_8859_1.eml": message(
        subject="Café crème",
        sender=Mailbox("François Müller", "francois@example.fr"),
        to=(Mailbox("Jörg", "joerg@example.de"),),
        text="Voilà, à bientôt.\n",
    ),
    "windows_1252.eml": message(
        subject="“Smart quotes” cost €100",
        sender=Mailbox("Renée O\u2019Brien", "renee@example.ie"),
        to=(Mailbox("", "team@example.com"),),
        text="It\u2019s “quoted” \u2013 and costs €100.\n",
    ),
    "iso_2022_jp.eml": message(
        subject="テスト",
        sender=Mailbox("山田太郎", "taro@example.jp"),
        to=(Mailbox("", "hanako@example.jp"),),
        text="こんにちは、世界。\n",
    ),
    "koi8_r.eml": message(
        subject="Привет, мир",
        sender=Mailbox("Иван Петров", "ivan@example.ru"),
        to=(Mailbox("", "olga@example.ru"),),
        text="Здравствуйте!\n",
    ),
    "unknown_charset.eml": message(
        subject="Hello World",
        sender=Mailbox("", "sender@example.com"),
        to=(Mailbox("", "rcpt@example.com"),),
        text="naïve café\n",  # x-foo is unknown: the bytes are valid UTF-8
        defects=("undecodable charset x-foo in text/plain",),
    ),
    "invalid_bytes.eml": message(
        subject="Broken bytes",
        sender=Mailbox("", "sender@example.com"),
        to=(Mailbox("", "rcpt@example.com"),),
        text="Price: 5\ufffd euros \ufffd\n",
        defects=("invalid utf-8 bytes in text/plain",),
    ),
    "missing_headers.eml": message(
        text="Just a body.\n",
        headers={"X-Note": "no From, To, Subject, Date or Message-ID here"},
    ),
    "broken_boundary.eml": message(
        subject="Boundary never appears",
        sender=Mailbox("", "sender@example.com"),
        to=(Mailbox("", "rcpt@example.com"),),
        # Nothing could be split: the whole body is delivered as text.
        text="--actual\nContent-Type: text/plain\n\nHello.\n--actual--\n",
        defects=("StartBoundaryNotFoundDefect", "MultipartInvariantViolationDefect"),
    ),
    "unclosed_boundary.eml": message(
        subject="Boundary never closed",
        sender=Mailbox("", "sender@example.com"),
        to=(Mailbox("", "rcpt@example.com"),),
        text="Plain part.",
        html="<p>HTML part.</p>",
        defects=("CloseBoundaryNotFoundDefect",),
    ),
    "forwarded_rfc822.eml": message(
        subject="Fwd: Original question",
        sender=Mailbox("Alice Example", "alice@example.org"),
        to=(Mailbox("", "bob@example.com"),),
        message_id="fwd-1@example.org",
        date="2024-04-11T11:00:00+00:00",
        text="See the forwarded message.",
        attachments=(
            Attachment(
                "original.eml", "message/rfc822", len(NESTED), None, "attachment", b64(NESTED)
            ),
        ),
    ),
    "header_nul.eml": message(
        subject="HelloWorld",
        sender=Mailbox("NulName", "nul@example.com"),
        to=(Mailbox("", "rcpt@example.com"),),
        text="Line one\n",
        headers={"X-Custom": "ab"},
        defects=("NonPrintableDefect in From",),
    ),
    "eight_bit_headers.eml": message(
        subject="Grüße aus Köln",  # raw UTF-8
        sender=Mailbox("Jürgen Weiß", "juergen@example.de"),  # raw latin-1
        to=(Mailbox("Zoë", "zoe@example.com"),),
        text="Schöne Grüße\n",
        defects=("8-bit From header is not UTF-8 (read as latin-1)",),
    ),
    "bare_lf.eml": message(
        subject="Bare line feeds",
        sender=Mailbox("Alice Example", "alice@example.org"),
        to=(Mailbox("", "bob@example.com"),),
        message_id="lf-1@example.org",
        text="First line.\nSecond line.",
        html="<p>First line.<br>Second line.</p>",
    ),
    "headers_only.eml": message(
        subject="Disk full on db-1",
        sender=Mailbox("", "alerts@monitor.example"),
        to=(Mailbox("", "oncall@example.com"),),
    ),
    "order_confirmation.eml": message(
        subject="Order 1001 confirmed ✓",
        sender=Mailbox("Schönes Shop", "orders@shop.example"),
        to=(
            Mailbox("Customer", "customer+orders@example.com"),
            Mailbox("", "archive@shop.example"),
        ),
        cc=(Mailbox("Support Team", "support@shop.example"),),
        reply_to=(Mailbox("Support", "support@shop.example"),),
        message_id="order-1001.1712743200@shop.example",
        date="2024-04-10T12:00:00+02:00",
        text="Thank you for your order!\n\nOrder 1001: 2 \u00d7 Espresso cups, 24,00 €",
        html='<p><img src="cid:logo@shop.example"></p><p>Thank you for your order!</p>'
        "<p>Order 1001: 2 &times; Espresso cups, 24,00 &euro;</p>",
        headers={
            "X-Order-Id": "1001",
            "List-Unsubscribe": "<https://shop.example/unsubscribe?u=42>",
        },
        attachments=(
            Attachment("logo.png", "image/png", 66, "logo@shop.example", "inline", b64(PNG)),
            Attachment("order-1001.pdf", "application/pdf", 59, None, "attachment", b64(PDF)),
        ),
    ),
    "empty.eml": message(),
}


def test_every_fixture_has_an_expectation() -> None:
    assert sorted(EXPECTED) == FIXTURES


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_reads_to_expected_fields(name: str) -> None:
    assert EXPECTED[name] == parse(read(name), header_prefixes=PREFIXES)


# --- specific behaviour ----------------------------------------------------


def test_attachments_over_the_cap_keep_metadata_but_not_data() -> None:
    attachments = parse(read("attachments.eml"), max_inline_attachment_bytes=6).attachments
    assert [(a.filename, a.size_bytes, a.data) for a in attachments] == [
        ("invoice-42.pdf", 59, None),
        ("Übersicht 2024.csv", 19, None),
        ("résumé.txt", 6, b64(b"R\xe9sum\xe9")),  # exactly the cap: still inline
        (None, 4, "AAEC/w=="),
    ]


def test_crlf_and_bare_lf_give_the_same_message() -> None:
    lf = read("bare_lf.eml")
    assert parse(lf) == parse(lf.replace(b"\n", b"\r\n"))


def test_header_prefixes_match_case_insensitively_and_ignore_empty_ones() -> None:
    raw = read("alternative.eml")
    assert {"List-Id": "Reports <reports.example.org>"} == parse(
        raw, header_prefixes=["list-", "", "  "]
    ).headers
    assert {} == parse(raw).headers


def test_an_unchosen_text_part_outside_alternative_is_kept_as_inline_attachment() -> None:
    """A mailing-list footer after the body must not be dropped."""
    raw = (
        b"Content-Type: multipart/mixed; boundary=m\r\n\r\n"
        b"--m\r\nContent-Type: multipart/alternative; boundary=a\r\n\r\n"
        b"--a\r\nContent-Type: text/plain\r\n\r\nBody.\r\n"
        b"--a\r\nContent-Type: text/html\r\n\r\n<p>Body.</p>\r\n--a--\r\n"
        b"--m\r\nContent-Type: text/plain\r\n\r\nFooter.\r\n--m--\r\n"
    )
    parsed = parse(raw)
    assert ("Body.", "<p>Body.</p>") == (parsed.text, parsed.html)
    assert (Attachment(None, "text/plain", 7, None, "inline", b64(b"Footer.")),) == (
        parsed.attachments
    )


def test_text_part_with_a_name_is_an_attachment_not_the_body() -> None:
    raw = (
        b"Content-Type: multipart/mixed; boundary=m\r\n\r\n"
        b'--m\r\nContent-Type: text/plain; name="log.txt"\r\n\r\nlog line\r\n'
        b"--m\r\nContent-Type: text/plain\r\n\r\nThe body.\r\n--m--\r\n"
    )
    parsed = parse(raw)
    assert "The body." == parsed.text
    assert (Attachment("log.txt", "text/plain", 8, None, "attachment", b64(b"log line")),) == (
        parsed.attachments
    )


def test_plain_text_inside_alternative_is_preferred_over_an_earlier_one() -> None:
    raw = (
        b"Content-Type: multipart/mixed; boundary=m\r\n\r\n"
        b"--m\r\nContent-Type: text/plain\r\n\r\nPreface.\r\n"
        b"--m\r\nContent-Type: multipart/alternative; boundary=a\r\n\r\n"
        b"--a\r\nContent-Type: text/plain\r\n\r\nReal body.\r\n"
        b"--a\r\nContent-Type: text/html\r\n\r\n<p>Real body.</p>\r\n--a--\r\n--m--\r\n"
    )
    parsed = parse(raw)
    assert ("Real body.", "<p>Real body.</p>") == (parsed.text, parsed.html)
    assert ["Preface."] == [base64.b64decode(a.data or "").decode() for a in parsed.attachments]


def test_html_only_inside_multipart_still_gets_a_text_rendering() -> None:
    raw = (
        b"Content-Type: multipart/mixed; boundary=m\r\n\r\n"
        b"--m\r\nContent-Type: text/html\r\n\r\n<p>Hi <b>there</b></p>\r\n"
        b"--m\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(PDF)
        + b"--m--\r\n"
    )
    parsed = parse(raw)
    assert ("Hi **there**", "<p>Hi <b>there</b></p>") == (parsed.text, parsed.html)
    assert [("application/pdf", 59)] == [(a.content_type, a.size_bytes) for a in parsed.attachments]


def test_html_only_body_too_large_for_html2text_gets_its_tags_stripped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(parsing, "HTML2TEXT_MAX_CHARS", 10)
    parsed = parse(b"Content-Type: text/html\r\n\r\n<p>Fish &amp; <b>chips</b></p>")
    assert (
        "Fish &  chips",
        ("HTML body too large for html2text; text made by stripping tags",),
    ) == (parsed.text, parsed.defects)


def test_base64_with_bad_padding_is_decoded_and_flagged() -> None:
    raw = b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\naGVsbG8\r\n"
    parsed = parse(raw)
    assert ("hello", ("InvalidBase64PaddingDefect",)) == (parsed.text, parsed.defects)


def test_large_attachment_round_trips_exactly() -> None:
    blob = bytes(range(256)) * 8192  # 2 MiB
    raw = (
        b"Content-Type: multipart/mixed; boundary=m\r\n\r\n"
        b"--m\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        b"--m\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment; filename=blob.bin\r\n\r\n"
        + base64.encodebytes(blob).replace(b"\n", b"\r\n")
        + b"--m--\r\n"
    )
    (attachment,) = parse(raw).attachments
    assert (len(blob), blob) == (attachment.size_bytes, base64.b64decode(attachment.data or ""))


def test_nested_message_sent_in_base64_is_decoded() -> None:
    raw = (
        b"Content-Type: multipart/mixed; boundary=m\r\n\r\n"
        b"--m\r\nContent-Type: text/plain\r\n\r\nfwd\r\n"
        b"--m\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(NESTED)
        + b"--m--\r\n"
    )
    (attachment,) = parse(raw).attachments
    assert (NESTED, "message/rfc822") == (
        base64.b64decode(attachment.data or ""),
        attachment.content_type,
    )


def test_nested_message_with_unsplittable_8bit_multipart_is_still_carried() -> None:
    """The stdlib generator raises here; the bytes it cannot write come out as U+FFFD."""
    raw = (
        b"Content-Type: multipart/mixed; boundary=m\r\n\r\n"
        b"--m\r\nContent-Type: text/plain\r\n\r\nfwd\r\n"
        b"--m\r\nContent-Type: message/rfc822\r\n\r\n"
        b"Subject: inner\r\nContent-Type: multipart/mixed; boundary=never\r\n\r\ncaf\xc3\xa9\r\n"
        b"--m--\r\n"
    )
    parsed = parse(raw)
    expected = (
        b"Subject: inner\r\nContent-Type: multipart/mixed; boundary=never\r\n\r\n"
        + "caf\ufffd\ufffd\r\n".encode()
    )
    assert ((), [expected]) == (
        parsed.defects,
        [base64.b64decode(a.data or "") for a in parsed.attachments],
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Tue, 1 Aug 2023 10:00:00 +0200", "2023-08-01T10:00:00+02:00"),
        ("1 Aug 23 10:00 -0000", "2023-08-01T10:00:00+00:00"),  # -0000: UTC, zone unknown
        ("Tue, 1 Aug 2023 10:00:00 GMT", "2023-08-01T10:00:00+00:00"),
    ],
)
def test_date_becomes_iso_8601_with_offset(value: str, expected: str) -> None:
    assert expected == parse(f"Date: {value}\r\n\r\n".encode()).date


def test_unreadable_date_is_none_and_flagged() -> None:
    parsed = parse(b"Date: next tuesday\r\n\r\n")
    assert (None, ("unreadable Date header",)) == (parsed.date, parsed.defects)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("<abc@example.com>", "abc@example.com"),
        ("  <abc@example.com> (added by relay)", "abc@example.com"),
        ("abc@example.com", "abc@example.com"),
        ("<>", None),
    ],
)
def test_message_id_loses_only_its_angle_brackets(value: str, expected: str | None) -> None:
    assert expected == parse(f"Message-ID: {value}\r\n\r\n".encode()).message_id


def test_adjacent_encoded_words_join_without_the_space_between() -> None:
    raw = b"Subject: =?UTF-8?Q?Gr=C3=BC=C3=9Fe?=\r\n =?UTF-8?Q?_aus_M=C3=BCnchen?=\r\n\r\n"
    assert "Grüße aus München" == parse(raw).subject


def test_groups_and_empty_addresses_give_no_mailboxes() -> None:
    parsed = parse(b"From: <>\r\nTo: undisclosed-recipients:;\r\n\r\n")
    assert (None, ()) == (parsed.sender, parsed.to)


def test_a_structure_too_deep_to_parse_is_delivered_with_a_defect() -> None:
    """Where the RecursionError strikes (in the stdlib parser, or later while writing
    back the nested message) depends on how deep the caller's stack already is; both
    paths deliver the message and name the problem, which is the promise."""
    raw = b"Content-Type: message/rfc822\r\n\r\n" * 2000 + b"hello"
    parsed = parse(raw)
    assert parsed.defects in (
        ("unreadable MIME structure (RecursionError); body read as text",),
        ("unreadable nested message (RecursionError)",),
    )
    assert 1 == len(parsed.attachments)


# --- properties: any bytes in, a clean Message out -------------------------


def assert_clean(value: object) -> None:
    """Every string in ``value`` encodes to UTF-8 and holds no NUL."""
    if isinstance(value, str):
        value.encode("utf-8")
        assert "\x00" not in value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            assert_clean(getattr(value, field.name))
    elif isinstance(value, tuple | list):
        for item in value:
            assert_clean(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            assert_clean(key)
            assert_clean(item)


SEEDS = [read(name) for name in FIXTURES]
TOKENS = [
    b"\r\n", b"\n", b"\x00", b"\xff", b"=?", b"?=", b"=?x-foo?q?", b"=?utf-8?b?", b"--",
    b"boundary=", b"multipart/mixed", b"message/rfc822", b"base64", b"charset*=", b"*0*=",
    b"'", b'"', b"<", b">", b";", b":", b"@", b",", b"(", b"\\", b" ", b"\t",
]  # fmt: skip


@st.composite
def mutated_messages(draw: st.DrawFn) -> bytes:
    """A fixture message with bytes inserted, deleted and flipped."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["insert", "token", "delete", "flip"]))
        if action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=12))
        elif action == "token":
            data[at:at] = draw(st.sampled_from(TOKENS))
        elif action == "delete":
            del data[at : at + draw(st.integers(1, 40))]
        elif data:
            data[min(at, len(data) - 1)] ^= draw(st.integers(1, 255))
    return bytes(data)


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=2000))
def test_parse_never_raises_and_gives_clean_strings_for_any_bytes(raw: bytes) -> None:
    assert_clean(parse(raw, header_prefixes=PREFIXES))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=mutated_messages())
def test_parse_never_raises_and_gives_clean_strings_for_mutated_messages(raw: bytes) -> None:
    parsed = parse(raw, header_prefixes=PREFIXES, max_inline_attachment_bytes=32)
    assert_clean(parsed)
    for attachment in parsed.attachments:
        assert (attachment.data is None) == (attachment.size_bytes > 32)
