"""The parser's fast paths give exactly what the standard library's full parse gives.

:func:`mailbridge.parsing._plain_mailbox` reads plain address headers without
the structured header parser, and :func:`mailbridge.parsing._read_single_part`
takes a single-part body without the line-by-line feed parser. Both must agree
with the slow path on every input they accept, and decline everything else.
"""

from __future__ import annotations

import itertools
import random

import pytest

from mailbridge import parsing

NAMES = [
    "",
    "Bench",
    "John Smith",
    "a",
    "O'Neil",
    "x_y-z",
    "=?utf-8?q?J=C3=B6rg?=",
    "J. Smith",
    '"Quoted"',
    "Two  Spaces",
    "(comment)",
    "Ünï",
    "tab\there",
    "a,b",
]
ADDRESSES = [
    "a@b",
    "bench@example.com",
    "first.last@sub.example.org",
    "x+tag@example.com",
    "a..b@example.com",
    ".a@example.com",
    "a@[127.0.0.1]",
    "a@b.",
    "@b",
    "a@",
    "<>",
    "a b@c",
    "ünï@example.com",
    "a@b@c",
    '"q"@example.com',
]
SHAPES = [
    "{name} <{addr}>",
    "{name}<{addr}>",
    "<{addr}>",
    "{addr}",
    " {name} <{addr}> ",
    "\t<{addr}>\t",
    "{name} <{addr}> (comment)",
    "{name} <{addr}>, other@example.com",
]


def full_parse(value: str) -> tuple[tuple[parsing.Mailbox, ...], list[str]]:
    defects: list[str] = []
    header = parsing._read_header("From", value, defects)
    addresses = header.addresses
    return (
        tuple(
            parsing.Mailbox(parsing.clean(a.display_name), parsing.clean(a.addr_spec))
            for a in addresses
        ),
        defects,
    )


def values() -> list[str]:
    found = [
        shape.format(name=name, addr=addr)
        for shape, name, addr in itertools.product(SHAPES, NAMES, ADDRESSES)
    ]
    rng = random.Random(6)
    alphabet = "ab.@<> \t\"'=?,;:()[]\\_-+Ü"
    found += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 14))) for _ in range(3000)]
    return found


def test_a_plain_mailbox_is_read_as_the_full_parser_reads_it() -> None:
    accepted = 0
    for value in values():
        fast = parsing._plain_mailbox(value)
        if fast is None:
            continue
        accepted += 1
        mailboxes, defects = full_parse(value)
        assert ((fast,), []) == (mailboxes, defects), value
    assert accepted > 100  # the fast path is really taken


@pytest.mark.parametrize(
    "value",
    ["=?utf-8?q?J=C3=B6rg?= <a@b>", '"Quoted" <a@b>', "a@b, c@d", "a..b@c", "x <a@b> (c)"],
)
def test_anything_not_plain_goes_to_the_full_parser(value: str) -> None:
    assert parsing._plain_mailbox(value) is None


BODY = b"line one\r\n.leading dot\r\n\r\nafter a blank line\r\nno end"
MESSAGES = [
    b"From: Bench <bench@example.com>\r\nSubject: hi\r\n\r\n" + BODY,
    b"Subject: lf only\n\nbody\nmore\n",
    b"Subject: cr only\r\rbody\r",
    b"Subject: mixed\r\n\nbody\r\n",
    b"\r\nno headers at all\r\n",
    b"Subject: no body\r\n\r\n",
    b"Subject: no separator\r\n",
    b"Subject: bad line follows\r\nthis is not a header\r\n\r\nbody\r\n",
    b"Subject: folded\r\n continued\r\n\r\nbody\r\n",
    b"Content-Type: text/html; charset=utf-8\r\n\r\n<p>caf\xc3\xa9</p>\r\n",
    b"Content-Type: text/plain; charset=latin-1\r\n\r\ncaf\xe9\r\n",
    b"Content-Transfer-Encoding: base64\r\nContent-Type: application/pdf\r\n\r\nJVBERi0=\r\n",
    b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n\r\na\r\n--x--\r\n",
    b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\nbody\r\n",
    b"From nobody Mon Jan  1 00:00:00 2024\r\nSubject: unix from\r\n\r\nbody\r\n",
    b"Subject: 8bit \xff header\r\n\r\nbody \xfe\r\n",
    b"Subject: x\r\nContent-Type: text/plain\r\n\r\n" + b"X" * 78 + b"\r\n" * 3,
]


@pytest.mark.parametrize("raw", MESSAGES)
def test_a_single_part_body_is_read_as_the_full_parse_reads_it(
    raw: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = parsing.parse(raw, header_prefixes=["X-", "Subject"])
    with monkeypatch.context() as patch:
        patch.setattr(parsing, "_read_single_part", lambda raw: None)
        patch.setattr(parsing, "_plain_mailbox", lambda value: None)
        slow = parsing.parse(raw, header_prefixes=["X-", "Subject"])
    assert slow == fast


def test_the_body_fast_path_is_taken_for_plain_mail_and_declined_for_containers() -> None:
    assert parsing._read_single_part(MESSAGES[0]) is not None
    for container in (MESSAGES[12], MESSAGES[13], MESSAGES[7], MESSAGES[6]):
        assert parsing._read_single_part(container) is None


def test_a_header_is_parsed_once_and_again_after_it_changes() -> None:
    """The per-message memo serves the parsed header only while its raw value is in place."""
    msg = parsing._read(
        b"Content-Type: text/plain; charset=utf-8\r\nSubject: hi\r\n\r\nbody\r\n", []
    )
    first = msg["content-type"]
    assert first is msg["content-type"]
    assert "utf-8" == msg.get_content_charset()
    msg.replace_header("Content-Type", "text/html; charset=latin-1")
    assert "text/html" == msg.get_content_type()
    assert "latin-1" == msg.get_content_charset()
    del msg["content-type"]
    assert msg["content-type"] is None
    assert "text/plain" == msg.get_content_type()


def test_shared_mime_headers_parse_like_fresh_ones() -> None:
    """A Content-Type seen before gives the same answers as one parsed anew."""
    raw = b"Content-Type: text/plain; charset=ISO-8859-1\r\n\r\n\xe9t\xe9\r\n"
    again = [parsing.parse(raw) for _ in range(3)]
    assert all(again[0] == message for message in again)
    assert "\u00e9t\u00e9\n" == again[0].text
    fresh = parsing._TolerantHeaders()("Content-Type", "text/plain; charset=ISO-8859-1")
    shared = parsing._HEADERS("Content-Type", "text/plain; charset=ISO-8859-1")
    assert shared is parsing._HEADERS("Content-Type", "text/plain; charset=ISO-8859-1")
    assert (fresh.content_type, dict(fresh.params), str(fresh)) == (
        shared.content_type,
        dict(shared.params),
        str(shared),
    )


SUBJECT_CHARS = " abcXYZ019()<>@,;:\\\".[]?=_-'!#$%&*+/^`{|}~"


@pytest.mark.parametrize("seed", range(4))
def test_plain_subjects_read_as_the_full_parse_reads_them(seed: int) -> None:
    """The printable-ASCII Subject fast path gives the unstructured parser's text, no defect."""
    rng = random.Random(seed)
    for _ in range(2000):
        value = "".join(rng.choice(SUBJECT_CHARS) for _ in range(rng.randint(0, 16)))
        slow_defects: list[str] = []
        slow = parsing.clean(str(parsing._read_header("Subject", value, slow_defects)))
        fast_defects: list[str] = []
        assert (slow, slow_defects) == (
            parsing._subject("Subject", value, fast_defects),
            fast_defects,
        ), value
