"""The lean path for big messages gives exactly the old path's documents.

``pipeline.build_documents`` (big plain text bodies streamed from the raw bytes
into their JSON string, documents held in pieces, signed piece by piece) must
give, byte for byte, what ``pipeline.build_bodies`` gives, and the same
signatures, for every input: the varied corpus of the parsing tests (with the
lean threshold at 0 and tiny chunks, so every boundary case is reached) and
big messages of every shape, including those that must fall back.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailbridge import parsing, payload, pipeline, routing
from mailbridge.config import ParsingSettings
from mailbridge.delivery import signing
from tests.unit.test_parsing import SEEDS, mutated_messages
from tests.unit.test_parsing_fast_paths import MESSAGES as FAST_PATH_MESSAGES

MiB = 1024 * 1024
ROUTES = routing.compile_routes({"billing": ["*@example.com"], "audit": ["audit@example.org"]})
ENVELOPE = payload.Envelope(
    "sender@example.net", ("a+tag@example.com", "audit@example.org"), "mx", "127.0.0.1", None
)
SETTINGS = ParsingSettings(header_prefixes=["X-", "Subject"], max_inline_attachment_bytes=MiB)
NOW = datetime.datetime(2026, 11, 21, 9, 0, tzinfo=datetime.UTC)
KEYS = (b"k" * 32, b"second key, rotated in")


def assert_same_documents(raw: bytes | bytearray) -> None:
    old_id, old = pipeline.build_bodies(ROUTES, SETTINGS, ENVELOPE, bytes(raw), NOW)
    new_id, new = pipeline.build_documents(ROUTES, SETTINGS, ENVELOPE, raw, NOW)
    assert old_id == new_id
    assert {route: body for route, body in old.items()} == {
        route: bytes(document) for route, document in new.items()
    }
    for route, document in new.items():
        assert len(document) == len(old[route])
        assert signing.sign_parts(new_id, 1700000000, document, KEYS) == signing.sign(
            new_id, 1700000000, old[route], KEYS
        )


@pytest.fixture
def lean_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every message takes the lean path when it can, read 7 bytes at a time."""
    monkeypatch.setattr(parsing, "LEAN_MESSAGE_BYTES", 0)
    monkeypatch.setattr(parsing, "CHUNK_BYTES", 7)


@pytest.mark.usefixtures("lean_everywhere")
@pytest.mark.parametrize("raw", [*SEEDS, *FAST_PATH_MESSAGES])
def test_corpus_documents_are_unchanged(raw: bytes) -> None:
    assert_same_documents(raw)


@pytest.mark.usefixtures("lean_everywhere")
@settings(max_examples=300, deadline=None)
@given(raw=mutated_messages())
def test_mutated_messages_give_unchanged_documents(raw: bytes) -> None:
    assert_same_documents(raw)


BODY_BYTES = st.lists(
    st.sampled_from([b"\r\n", b"\r", b"\n", b"\x00", b"a", b"\xc3\xa9", b"\xe9", b"\xff", b'"\\']),
    max_size=40,
).map(b"".join)
HEADERS = st.sampled_from(
    [
        b"Subject: s\r\n\r\n",
        b"Content-Type: text/plain; charset=utf-8\r\n\r\n",
        b"Content-Type: text/plain; charset=us-ascii\r\n\r\n",
        b"Content-Type: text/plain; charset=iso-8859-1\r\n\r\n",
        b"Content-Transfer-Encoding: 8bit\r\n\n",
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n",
        b"Content-Disposition: attachment\r\n\r\n",
        b"Subject: bare\n\n",
    ]
)


@pytest.mark.usefixtures("lean_everywhere")
@settings(max_examples=300, deadline=None)
@given(head=HEADERS, body=BODY_BYTES, chunk=st.integers(1, 9))
def test_odd_bodies_and_chunk_boundaries_give_unchanged_documents(
    head: bytes, body: bytes, chunk: int
) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(parsing, "CHUNK_BYTES", chunk)
        assert_same_documents(head + body)
        assert_same_documents(bytearray(head + body))


LINE = b"X" * 76 + b"\r\n"


def big(head: bytes, line: bytes = LINE, size: int = 3 * MiB) -> bytes:
    return head + line * (size // len(line))


BIG = {
    "plain body": big(b"From: A <a@example.net>\r\nSubject: big\r\n\r\n"),
    "utf-8 body": big(
        b"Content-Type: text/plain; charset=utf-8\r\n\r\n", 'é€😀 "\\\t\r\n'.encode()
    ),
    "8-bit body, no charset": big(b"Subject: x\r\n\r\n", b"caf\xe9\r\n"),
    "invalid utf-8": big(b"Content-Type: text/plain; charset=utf-8\r\n\r\n", b"\xc3\r\n\xff"),
    "bare LF and CR": big(b"Subject: x\n\n", b"one\ntwo\rthree\r\r\n\x00"),
    "quoted-printable": big(
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n", b"caf=C3=A9 =\r\nsoft\r\n"
    ),
    "html": big(b"Content-Type: text/html\r\n\r\n", b"<p>a &amp; b</p>\r\n"),
    "base64 attachment": (
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nhello\r\n--b\r\n"
        b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(bytes(range(256)) * 8192).replace(b"\n", b"\r\n")
        + b"--b--\r\n"
    ),
    "non-canonical base64 attachment": (
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
        b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + b"QUJD=\r\nQU JD\r\n!!" * 200_000
        + b"\r\n--b--\r\n"
    ),
}


@pytest.mark.parametrize("name", sorted(BIG))
def test_big_messages_give_unchanged_documents(name: str) -> None:
    assert_same_documents(BIG[name])


def test_a_big_plain_body_is_streamed_and_never_held_as_one_string() -> None:
    message, source = parsing.parse_lean(BIG["plain body"])
    assert source is not None
    assert message.text == ""
    _, documents = pipeline.build_documents(ROUTES, SETTINGS, ENVELOPE, BIG["plain body"], NOW)
    document = documents["billing"]
    assert max(len(part) for part in document.parts) <= 2 * parsing.CHUNK_BYTES
    # The body's pieces are shared by every route's document, not copied.
    shared = {id(part) for part in document.parts if len(part) > 1000}
    assert shared <= {id(part) for part in documents["audit"].parts}
    assert json.loads(bytes(document))["body"].startswith("X" * 76 + "\n")


class _Capture:
    """A SyncDelivery stand-in that keeps what it was asked to deliver."""

    def __init__(self) -> None:
        self.bodies: dict[str, bytes] = {}

    async def deliver(
        self, webhook_id: str, bodies: dict[str, payload.Document], **_: object
    ) -> object:
        self.bodies = {route: bytes(document) for route, document in bodies.items()}
        return type("Result", (), {"outcome": "delivered", "detail": ""})()


@pytest.mark.parametrize("name", ["plain body", "utf-8 body", "base64 attachment"])
def test_the_sync_pipeline_sends_the_old_documents(name: str) -> None:
    capture = _Capture()
    sync = pipeline.SyncPipeline(ROUTES, SETTINGS, capture)  # type: ignore[arg-type]
    reply = asyncio.run(sync(ENVELOPE, bytearray(BIG[name]), received_monotonic=0.0))
    webhook_id, old = pipeline.build_bodies(ROUTES, SETTINGS, ENVELOPE, BIG[name], NOW)
    assert reply == f"250 2.0.0 Ok: delivered as {webhook_id}"
    assert sorted(capture.bodies) == sorted(old)
    for route, body in capture.bodies.items():  # received_at differs: compare the rest
        sent, expected = json.loads(body), json.loads(old[route])
        assert sent.pop("received_at") and expected.pop("received_at")
        assert sent == expected
