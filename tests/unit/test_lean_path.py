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
    monkeypatch.setattr(parsing, "LEAN_PART_BYTES", 1)
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
    "base64 attachment, LF": (
        b"Content-Type: multipart/mixed; boundary=b\n\n--b\n\nhello\n--b\n"
        b"Content-Type: application/pdf\nContent-Transfer-Encoding: base64\n\n"
        + base64.encodebytes(bytes(range(256)) * 8192)
        + b"--b--\n"
    ),
    "several base64 attachments, one above the cap": (
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nhello\r\n"
        + b"".join(
            b"--b\r\nContent-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + base64.encodebytes(bytes(range(256)) * count).replace(b"\n", b"\r\n")
            for count in (2048, 4097, 300)
        )
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


@pytest.mark.parametrize(
    "name",
    [
        "plain body",
        "utf-8 body",
        "base64 attachment",
        "several base64 attachments, one above the cap",
    ],
)
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


# --- big base64 attachments, read from the raw message -----------------------


def _b64_lines(data: bytes, eol: bytes, width: int = 76) -> bytes:
    text = base64.b64encode(data)
    return b"".join(text[i : i + width] + eol for i in range(0, len(text), width))


ENCODINGS = {  # how an attachment's text is written: (function of the data and eol, canonical)
    "canonical": (lambda data, eol: _b64_lines(data, eol), True),
    "one long line": (lambda data, eol: base64.b64encode(data) + eol, True),
    "short lines": (lambda data, eol: _b64_lines(data, eol, 4), True),
    "blank line inside": (lambda data, eol: _b64_lines(data, eol) + eol + b"QUJD" + eol, True),
    "no padding": (lambda data, eol: base64.b64encode(data).rstrip(b"=") + eol, False),
    "extra padding": (lambda data, eol: base64.b64encode(data) + b"==" + eol, False),
    "padding inside": (lambda data, eol: b"QQ==" + eol + base64.b64encode(data) + eol, False),
    "unused bits set": (lambda data, eol: b"QUJDRF==" + eol, False),
    "one unused bit": (lambda data, eol: b"QUJDRE" + b"Y=" + eol, False),
    "spaces": (lambda data, eol: b"QUJD QUJD" + eol + base64.b64encode(data) + eol, False),
    "junk": (lambda data, eol: base64.b64encode(data) + b"!" + eol, False),
    "excess bits": (lambda data, eol: base64.b64encode(data) + b"Q" + eol, False),
    "dash at the end": (lambda data, eol: base64.b64encode(data) + b"--" + eol, False),
    "8-bit byte": (lambda data, eol: b"QUJD\xe9" + eol, False),
}
FILENAMES = [
    b'; filename="scan.pdf"',
    b"; filename=plain.bin",
    b"; filename*=utf-8''caf%C3%A9.pdf",
    b'; filename="=?utf-8?b?w6l0w6kucGRm?="',
    b"; filename*0=long; filename*1=name.pdf",
    b'; filename="caf\xc3\xa9.pdf"',
    b"",
]


def attachment_message(
    *,
    eol: bytes = b"\r\n",
    encodings: tuple[str, ...] = ("canonical",),
    sizes: tuple[int, ...] = (3000,),
    filename: bytes = FILENAMES[0],
    final_boundary: bool = True,
    preamble: bytes = b"",
    epilogue: bytes = b"",
    alternative: bool = False,
    text_encoding: str = "",
) -> bytes:
    """A multipart/mixed message: a text body (or an alternative), then attachments."""
    lines = [b"From: A <a@example.net>", b"Subject: scan", b"MIME-Version: 1.0"]
    lines.append(b'Content-Type: multipart/mixed; boundary="=_b"')
    out = eol.join(lines) + eol + eol + preamble
    if alternative:
        out += b"--=_b" + eol + b"Content-Type: multipart/alternative; boundary=alt" + eol + eol
        out += b"--alt" + eol + b"Content-Type: text/plain" + eol + eol + b"hello" + eol
        out += b"--alt" + eol + b"Content-Type: text/html" + eol + eol + b"<p>hi</p>" + eol
        out += b"--alt--" + eol
    else:
        out += b"--=_b" + eol + b"Content-Type: text/plain; charset=utf-8" + eol
        if text_encoding:
            out += b"Content-Transfer-Encoding: " + text_encoding.encode() + eol
            body = base64.b64encode(b"hello " * 50) if text_encoding == "base64" else b"hello"
            out += eol + body + eol
        else:
            out += eol + b"hello" + eol
    for index, name in enumerate(encodings):
        size = sizes[index % len(sizes)]
        data = bytes((i * 7 + index) % 256 for i in range(size))
        write, _ = ENCODINGS[name]
        out += b"--=_b" + eol + b"Content-Type: application/pdf" + filename + eol
        out += b"Content-Disposition: attachment" + filename + eol
        out += b"Content-Transfer-Encoding: base64" + eol + eol + write(data, eol)
    if final_boundary:
        out += b"--=_b--" + eol + epilogue
    return out


ATTACHMENT_CASES = {
    "canonical, CRLF": {},
    "canonical, LF": {"eol": b"\n"},
    "no final boundary": {"final_boundary": False},
    "preamble and epilogue": {"preamble": b"preamble\r\n", "epilogue": b"epilogue QUJD\r\n"},
    "base64-looking preamble": {"preamble": b"QUJD\r\n"},
    "several attachments": {"encodings": ("canonical",) * 3, "sizes": (3000, 1, 70_000)},
    "above the inline cap": {"sizes": (MiB + 3,)},
    "exactly the inline cap": {"sizes": (MiB,)},
    "empty attachment": {"sizes": (0,)},
    "nested alternative": {"alternative": True},
    "base64 text body": {"text_encoding": "base64"},
    "one good, one bad": {"encodings": ("canonical", "junk"), "sizes": (3000, 3000)},
    **{f"encoding: {name}": {"encodings": (name,)} for name in ENCODINGS},
    **{f"filename {i}": {"filename": name} for i, name in enumerate(FILENAMES)},
}


@pytest.mark.parametrize("name", sorted(ATTACHMENT_CASES))
def test_attachment_messages_give_unchanged_documents(name: str) -> None:
    raw = attachment_message(**ATTACHMENT_CASES[name])  # type: ignore[arg-type]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(parsing, "LEAN_MESSAGE_BYTES", 0)
        patch.setattr(parsing, "LEAN_PART_BYTES", 1)
        for chunk in (7, 4096):
            patch.setattr(parsing, "CHUNK_BYTES", chunk)
            assert_same_documents(raw)
            assert_same_documents(bytearray(raw))


def test_canonical_attachments_are_read_from_the_raw_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(parsing, "LEAN_MESSAGE_BYTES", 0)
    monkeypatch.setattr(parsing, "LEAN_PART_BYTES", 1)
    for eol in (b"\r\n", b"\n"):
        raw = attachment_message(eol=eol, encodings=("canonical",) * 2, sizes=(3000, MiB + 1))
        read = parsing.parse_streamed(raw, max_inline_attachment_bytes=MiB)
        assert [a.size_bytes for a in read.message.attachments] == [3000, MiB + 1]
        assert read.message.attachments[1].data is None  # above the cap: size only
        assert list(read.attachments) == [read.message.attachments[0].data]
    bad = attachment_message(encodings=("junk",))
    assert parsing.parse_streamed(bad).attachments == {}


ATTACHMENT_MESSAGES = st.builds(
    attachment_message,
    eol=st.sampled_from([b"\r\n", b"\n"]),
    encodings=st.lists(st.sampled_from(sorted(ENCODINGS)), min_size=1, max_size=3).map(tuple),
    sizes=st.lists(st.integers(0, 2000), min_size=1, max_size=3).map(tuple),
    filename=st.sampled_from(FILENAMES),
    final_boundary=st.booleans(),
    preamble=st.sampled_from([b"", b"pre\r\n", b"QUJD\r\n\r\n", b"\r\n"]),
    epilogue=st.sampled_from([b"", b"epi\r\n", b"QUJD\r\n"]),
    alternative=st.booleans(),
    text_encoding=st.sampled_from(["", "base64", "quoted-printable"]),
).flatmap(lambda raw: st.just(raw))


@settings(max_examples=200, deadline=None)
@given(
    raw=st.tuples(ATTACHMENT_MESSAGES, st.integers(0, 5000), st.binary(max_size=8)).map(
        lambda t: t[0][: len(t[0]) - t[1] % 40] + t[2] if t[1] % 3 == 0 else t[0]
    ),
    chunk=st.integers(1, 9),
)
def test_mutated_attachment_messages_give_unchanged_documents(raw: bytes, chunk: int) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(parsing, "LEAN_MESSAGE_BYTES", 0)
        patch.setattr(parsing, "LEAN_PART_BYTES", 1)
        patch.setattr(parsing, "CHUNK_BYTES", chunk)
        assert_same_documents(raw)


def test_a_big_attachment_is_streamed_shared_and_never_decoded() -> None:
    raw = BIG["base64 attachment"]
    read = parsing.parse_streamed(raw, max_inline_attachment_bytes=MiB)
    assert len(read.attachments) == 0  # 2 MiB decoded: above the test cap, size only
    big_settings = ParsingSettings(header_prefixes=["X-"], max_inline_attachment_bytes=4 * MiB)
    read = parsing.parse_streamed(raw, max_inline_attachment_bytes=4 * MiB)
    assert len(read.attachments) == 1
    _, documents = pipeline.build_documents(ROUTES, big_settings, ENVELOPE, raw, NOW)
    document = documents["billing"]
    assert max(len(part) for part in document.parts) <= parsing.CHUNK_BYTES
    shared = {id(part) for part in document.parts if len(part) > 1000}
    assert shared and shared <= {id(part) for part in documents["audit"].parts}
    _, old = pipeline.build_bodies(ROUTES, big_settings, ENVELOPE, raw, NOW)
    assert bytes(document) == old["billing"]
