"""Parsing: the raw bytes of one message → a :class:`Message`. Pure; no I/O.

Trusts nothing: the bytes are whatever a client sent after ``DATA``. :func:`parse`
never raises for any input. What it cannot read it reads as well as it can and
says so in ``Message.defects``: the standard library's defect class names
(``StartBoundaryNotFoundDefect``, ``InvalidHeaderDefect in From``) and short
sentences (``undecodable charset x-foo in text/plain``).

Reads the message with the standard library (``email.policy.default``, with a
header factory that falls back to plain text instead of raising), walks the
MIME tree once, and picks:

- the text body: the first ``text/plain`` part that is not an attachment,
  preferring one inside ``multipart/alternative``; the HTML body likewise with
  ``text/html``. HTML-only mail gets ``html2text`` of the HTML as its text.
  Line ends in bodies are ``\\n``.
- the attachments, in order: every part with ``Content-Disposition: attachment``
  or a filename, every part that is neither text nor HTML, and every text part
  outside ``multipart/alternative`` that is not a chosen body (so nothing the
  sender wrote is dropped). A nested ``message/*`` part is one attachment that
  carries the nested message's bytes.

Fast paths give what the full parse gives, minus its slowest steps: a plain
one-mailbox address header is read by a regex, a printable ASCII Subject without
an encoded word is taken as is, and the body of a message that is not multipart
is taken as is instead of line by line.

Text is decoded with the declared charset, else UTF-8, else latin-1. Every string
in the result encodes to UTF-8 (lone surrogates become U+FFFD) and holds no NUL.

Settings (from the ``parsing`` group, passed in): ``header_prefixes``,
``max_inline_attachment_bytes``.

Known limits: a nested message is re-serialised by the standard library (CRLF
line ends, header folding as received), so its bytes can differ slightly from
what was sent. Filenames are as the sender wrote them: never use one as a path.
``format=flowed`` text is not unwrapped. ``html2text`` is pure Python (about
1.5 s per MiB), so HTML-only bodies over :data:`HTML2TEXT_MAX_CHARS` get their
tags stripped instead.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import dataclasses
import email.errors
import email.message
import email.utils
import html
import io
import re
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from email import headerregistry, policy
from email.generator import BytesGenerator
from email.parser import BytesParser
from typing import Any, Literal

import html2text

MiB = 1024 * 1024
#: :func:`parse_lean` streams a single-part text body of a message this big or bigger.
LEAN_MESSAGE_BYTES = MiB
#: How much of the raw message :meth:`TextSource.chunks` decodes at a time.
CHUNK_BYTES = MiB
#: :func:`parse_streamed` reads a base64 part of a big message from the raw bytes
#: when its encoded text is this big or bigger.
LEAN_PART_BYTES = 64 * 1024
HTML2TEXT_MAX_CHARS = MiB  # larger HTML-only bodies get their tags stripped instead

# What the email package (and html2text) raise on malformed input. Bodies and
# headers are never trusted, so each read is guarded by exactly these.
_LIBRARY_ERRORS: tuple[type[Exception], ...] = (
    LookupError,  # unknown charsets, KeyError
    ValueError,  # UnicodeError, binascii.Error
    TypeError,
    IndexError,
    AttributeError,
    AssertionError,  # asserts in email._header_value_parser and html.parser
    RecursionError,  # deeply nested multiparts
    email.errors.MessageError,  # HeaderParseError
)

_SURROGATE = re.compile("[\ud800-\udfff]")
_LINE_BREAK = re.compile("[\r\n]")
_PRINTABLE_ASCII = re.compile("[\x20-\x7e]*")
_ANGLE_ADDR = re.compile("<([^<>]*)>")
_TAG = re.compile(r"<[^<>]*>")  # [^<>]: linear even on '<<<<…' without a '>'
_ASCII_CHARSETS = frozenset({"us-ascii", "ascii", "ansi_x3.4-1968", "iso-646-us", "646"})
_ALTERNATIVE = "multipart/alternative"
_PLAIN = "text/plain"
_HTML = "text/html"
_MAX_DEFECT_WORD = 40
_PLAIN_ENCODINGS = frozenset({"", "7bit", "8bit", "binary"})
# One plain mailbox, "Display Name <local@domain>" or "local@domain": only atoms
# and dot-atoms (RFC 5322 §3.2.3), ASCII, no quotes, comments, encoded words or
# folding. For such a value the structured parser finds exactly these parts and
# no defect, so it is read directly (the stdlib parser costs ~0.1 ms a header).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = rf"{_ATEXT}(?:\.{_ATEXT})*"
_PLAIN_MAILBOX = re.compile(
    rf"[ \t]*(?:(?:(?P<name>{_ATEXT}(?: {_ATEXT})*) ?)?<(?P<angle>{_DOT_ATOM}@{_DOT_ATOM})>"
    rf"|(?P<bare>{_DOT_ATOM}@{_DOT_ATOM}))[ \t]*"
)
# The end of the header section: the first empty line, whatever the line ends.
_HEADER_END = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r)")
# An empty line (LF or CRLF line ends), and the base64 lines that may follow it:
# from the first to the last character that is not a line break.
_EMPTY_LINE = re.compile(rb"\n\r?\n")
_LINE_BREAK_RUN = re.compile(rb"[\r\n]*")
# Where a base64 part may start: its header line (found through "ase64" with
# bytes.find, fast; a header spelt otherwise just means no streamed part).
_BASE64_HEADER = re.compile(rb"content-transfer-encoding:[ \t]*base64[ \t]*\r?\n", re.IGNORECASE)
_BASE64_NEEDLES = (b"ase64", b"ASE64")
_BASE64_RUN = re.compile(rb"[A-Za-z0-9+/=][A-Za-z0-9+/=\r\n]*")  # no backtracking: linear
_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_LINE_BREAKS = b"\r\n"


@dataclass(frozen=True)
class Mailbox:
    """One address from an address header."""

    name: str  # display name, decoded ('' when none)
    address: str  # addr-spec as given ('' when unreadable)


@dataclass(frozen=True)
class Attachment:
    filename: str | None
    content_type: str  # e.g. 'application/pdf' (lowercase)
    size_bytes: int  # decoded size
    content_id: str | None  # without <>
    disposition: Literal["attachment", "inline"]
    data: str | None  # base64 of the decoded bytes, or None when size_bytes > cap


@dataclass(frozen=True)
class Message:
    subject: str  # RFC 2047 decoded, '' when absent
    sender: Mailbox | None  # From:
    to: tuple[Mailbox, ...]
    cc: tuple[Mailbox, ...]
    reply_to: tuple[Mailbox, ...]
    message_id: str | None  # as in the header, angle brackets stripped
    date: str | None  # ISO 8601 with offset, None when absent/unparseable
    text: str  # text body; when only HTML exists: html2text of it; '' when none
    html: str | None
    headers: dict[str, str]  # passthrough by name prefix; repeated headers joined with ', '
    attachments: tuple[Attachment, ...]
    defects: tuple[str, ...]  # short human strings; never raised


@dataclass(frozen=True)
class TextSource:
    """A text body read from the raw message in chunks, never held as one ``str``.

    Joined, :meth:`chunks` is exactly what :func:`parse` gives as ``Message.text``
    for the same bytes. Holds a reference to the raw message (read, never changed).
    """

    raw: bytes | bytearray = field(repr=False)
    start: int  # the body's first byte in ``raw``
    encoding: Literal["utf-8", "latin-1"]
    errors: Literal["strict", "replace"]

    def chunks(self, chunk_bytes: int | None = None) -> Iterator[str]:
        """The text in pieces of about ``chunk_bytes``: line ends ``\\n``, no NUL."""
        chunk_bytes = chunk_bytes or CHUNK_BYTES
        decoder = codecs.getincrementaldecoder(self.encoding)(self.errors)
        carry = ""  # a trailing CR waits: its LF may open the next piece
        for offset in range(self.start, len(self.raw), chunk_bytes):
            text = carry + decoder.decode(self.raw[offset : offset + chunk_bytes])
            carry = "\r" if text.endswith("\r") else ""
            if carry:
                text = text[:-1]
            if text:
                yield _tidy(text)
        text = carry + decoder.decode(b"", final=True)
        if text:
            yield _tidy(text)

    def decodes(self) -> bool:
        """Whether the whole body decodes with :attr:`encoding` and :attr:`errors`."""
        decoder = codecs.getincrementaldecoder(self.encoding)(self.errors)
        try:
            for offset in range(self.start, len(self.raw), CHUNK_BYTES):
                decoder.decode(self.raw[offset : offset + CHUNK_BYTES])
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return False
        return True


@dataclass(frozen=True)
class Base64Source:
    """A base64 attachment's encoded text, read from the raw message in pieces.

    Joined, :meth:`chunks` is exactly the ``data`` :func:`parse` gives for the
    attachment: the part's text is canonical base64 (checked), so the base64 of
    its decoded bytes is that text without its line breaks. Holds a reference to
    the raw message (read, never changed).
    """

    raw: bytes | bytearray = field(repr=False)
    start: int  # the first base64 character in ``raw``
    end: int  # just after the last one
    size_bytes: int  # decoded

    def chunks(self, chunk_bytes: int | None = None) -> Iterator[bytes]:
        """The base64 text without line breaks, in pieces of at most ``chunk_bytes``."""
        chunk_bytes = chunk_bytes or CHUNK_BYTES
        for offset in range(self.start, self.end, chunk_bytes):
            with memoryview(self.raw) as view:  # released at once: raw may be resized later
                piece = bytes(view[offset : min(offset + chunk_bytes, self.end)])
            piece = piece.translate(None, _LINE_BREAKS)
            if piece:
                yield piece


def _base64_size(raw: bytes | bytearray, start: int, end: int) -> int | None:
    """The decoded size of ``raw[start:end]`` if it is canonical base64, else None.

    Canonical: line breaks aside, only the base64 alphabet, a length that is a
    multiple of 4, at most two ``=`` and only at the end, and zero unused bits
    before them. For such text, ``binascii.a2b_base64`` (what :func:`_content`
    uses) decodes without error, and ``base64.b64encode`` of its result is the
    text without line breaks. Read in chunks: no copy of the whole text.
    """
    total = pads = 0
    last = -1  # the last character that is not padding
    for offset in range(start, end, CHUNK_BYTES):
        with memoryview(raw) as view:
            piece = bytes(view[offset : min(offset + CHUNK_BYTES, end)])
        piece = piece.translate(None, _LINE_BREAKS)
        data = piece.rstrip(b"=")
        if data:
            if pads or data.translate(None, _BASE64_ALPHABET):
                return None  # data after padding, or a character outside the alphabet
            last = data[-1]
        pads += len(piece) - len(data)
        total += len(piece)
    if total == 0 or total % 4 or pads > 2 or last < 0:
        return None
    if pads:
        value = _BASE64_ALPHABET.index(last)
        if value & (0b11 if pads == 1 else 0b1111):
            return None  # unused bits set: b64encode would write another character
    return total // 4 * 3 - pads


def _tidy(text: str) -> str:
    """What :func:`_body` does to decoded text (which holds no surrogates)."""
    text = text.replace("\r\n", "\n")
    return text.replace("\x00", "") if "\x00" in text else text


def clean(text: str) -> str:
    """``text`` without NUL and with lone surrogates as U+FFFD (pairs are joined)."""
    if "\x00" in text:
        text = text.replace("\x00", "")
    if not text.isascii() and _SURROGATE.search(text):
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _short(word: str) -> str:
    """A sender-chosen word (charset, header name) fit to quote in a defect."""
    word = clean(word)
    return word if len(word) <= _MAX_DEFECT_WORD else word[:_MAX_DEFECT_WORD] + "…"


def _from_8bit(value: str) -> tuple[str, bool]:
    """Undo the parser's surrogateescape: UTF-8 when it is, else latin-1 (``False``)."""
    try:
        data = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # surrogates that were not escaped bytes
        return clean(value), True
    try:
        return data.decode("utf-8"), True
    except UnicodeDecodeError:
        return data.decode("latin-1"), False


#: MIME headers whose few values repeat from message to message
#: (``text/plain; charset=utf-8``): a parsed one is kept and shared. Parsed
#: headers are immutable, and the standard library's Content-Type parser is
#: most of a small message's parse.
_SHARED_HEADERS = frozenset({"content-type", "content-transfer-encoding", "mime-version"})
_SHARED_VALUE_CHARS = 200
_SHARED_MAX = 128


class _TolerantHeaders(headerregistry.HeaderRegistry):
    """The default header registry, except that it never raises.

    Undeclared 8-bit bytes are read as UTF-8, else latin-1. A value the
    structured parser cannot read is read as unstructured text, and failing
    that, returned as a plain string.
    """

    def __init__(self) -> None:
        super().__init__()
        self._classes: dict[type, type] = {}
        self.unstructured = self["x-unstructured"]
        #: Parsed values of the headers in :data:`_SHARED_HEADERS`, by (name, value).
        self._shared: dict[tuple[str, str], Any] = {}

    def __getitem__(self, name: str) -> type:
        # The stdlib builds a new class on every header access; build each once.
        kind = self.registry.get(name.lower(), self.default_class)
        if kind not in self._classes:
            self._classes[kind] = type("_" + kind.__name__, (kind, self.base_class), {})
        return self._classes[kind]

    def __call__(self, name: str, value: str) -> Any:
        shared = name.lower() in _SHARED_HEADERS and len(value) <= _SHARED_VALUE_CHARS
        if shared:
            found = self._shared.get((name, value))
            if found is not None:
                return found
        parsed = self._parse(name, value)
        if shared:
            if len(self._shared) >= _SHARED_MAX:
                self._shared.clear()
            self._shared[(name, value)] = parsed
        return parsed

    def _parse(self, name: str, value: str) -> Any:
        if _SURROGATE.search(value):
            value = _from_8bit(value)[0]
        try:
            return super().__call__(name, value)
        except _LIBRARY_ERRORS:
            pass
        try:
            return self.unstructured(name, value)
        except _LIBRARY_ERRORS:
            return clean(value)


class _ParsedOnce(email.message.EmailMessage):
    """An EmailMessage that parses each header value once, however often it is read.

    The stdlib parses a header on every ``get``: ``Content-Type`` alone was read
    five times per message (type, filename, charset, ...), most of the CPU of a
    small message. A parsed header is immutable; the memo holds the raw value it
    was made from and is used only while that very object is still in the
    message, so a header set, replaced or deleted is parsed afresh.
    """

    def __init__(self, policy: Any = None) -> None:
        super().__init__(policy)
        self._parsed: dict[str, tuple[Any, Any]] = {}

    def get(self, name: str, failobj: Any = None) -> Any:
        key = name.lower()
        for header, value in self._headers:
            if header.lower() == key:
                cached = self._parsed.get(key)
                if cached is not None and cached[0] is value:
                    return cached[1]
                parsed = self.policy.header_fetch_parse(header, value)
                self._parsed[key] = (value, parsed)
                return parsed
        return failobj


_HEADERS = _TolerantHeaders()
_POLICY = policy.default.clone(header_factory=_HEADERS, message_factory=_ParsedOnce)
# Nested messages are written back out with their headers as received.
_SERIALISE_POLICY = _POLICY.clone(linesep="\r\n", refold_source="none")


class _Serialiser(BytesGenerator):
    """A BytesGenerator that writes non-ASCII text as UTF-8 instead of raising.

    The stdlib one raises on a multipart whose boundary was never found and whose
    body holds 8-bit bytes: it hands that body to ``write`` as decoded text.
    """

    def write(self, s: str) -> None:
        try:
            super().write(s)
        except UnicodeEncodeError:
            super().write(clean(s).encode("utf-8").decode("ascii", "surrogateescape"))


def _strip_tags(markup: str) -> str:
    return html.unescape(_TAG.sub(" ", markup)).strip()


def _html2text(markup: str, defects: list[str]) -> str:
    """A text rendering of HTML-only mail; tags stripped when html2text cannot do it."""
    if len(markup) > HTML2TEXT_MAX_CHARS:  # html2text is pure Python: ~1.5 s per MiB
        defects.append("HTML body too large for html2text; text made by stripping tags")
        return _strip_tags(markup)
    converter = html2text.HTML2Text()
    converter.body_width = 0
    converter.ignore_images = True
    converter.unicode_snob = True
    try:
        return converter.handle(markup).strip()
    except _LIBRARY_ERRORS as error:
        defects.append(f"html2text failed ({type(error).__name__}); text made by stripping tags")
        return _strip_tags(markup)


# --- headers ---------------------------------------------------------------


def _read_header(name: str, value: str, defects: list[str], *, structured: bool = True) -> Any:
    """One header through the tolerant factory; records its defects."""
    text = _LINE_BREAK.sub("", value)
    if _SURROGATE.search(text):
        text, utf8 = _from_8bit(text)
        if not utf8:
            defects.append(f"8-bit {_short(name)} header is not UTF-8 (read as latin-1)")
    if structured:
        header = _HEADERS(name, text)
    else:
        try:
            header = _HEADERS.unstructured(name, text)
        except _LIBRARY_ERRORS:
            header = text
    defects.extend(
        f"{type(defect).__name__} in {_short(name)}" for defect in getattr(header, "defects", ())
    )
    return header


def _subject(name: str, value: str, defects: list[str]) -> str:
    """The decoded Subject; printable ASCII without an encoded word is read as it is."""
    text = _LINE_BREAK.sub("", value)
    if _PRINTABLE_ASCII.fullmatch(text) and "=?" not in text:
        return text  # what the unstructured parser gives for it, with no defect
    return clean(str(_read_header(name, value, defects)))


def _plain_mailbox(value: str) -> Mailbox | None:
    """The one mailbox of a plain address header value, or None (use the full parser)."""
    match = _PLAIN_MAILBOX.fullmatch(value)
    if match is None or "=?" in value:  # '=' and '?' are atext, but "=?" may start a word
        return None
    return Mailbox(match["name"] or "", match["angle"] or match["bare"])


def _mailboxes(values: list[tuple[str, str]], defects: list[str]) -> tuple[Mailbox, ...]:
    found: list[Mailbox] = []
    for name, value in values:
        plain = _plain_mailbox(value)
        if plain is not None:
            found.append(plain)
            continue
        header = _read_header(name, value, defects)
        addresses = getattr(header, "addresses", None)
        if addresses is None:  # the structured parser gave up: read it the old way
            defects.append(f"unreadable {_short(name)} header")
            pairs = email.utils.getaddresses([_LINE_BREAK.sub("", value)])
            for display, spec in pairs:
                if display or spec:
                    decoded = str(_read_header(name, display, [], structured=False))
                    found.append(Mailbox(clean(decoded), clean(_from_8bit(spec)[0])))
            continue
        for address in addresses:
            try:
                spec = address.addr_spec
            except _LIBRARY_ERRORS:
                spec = ""
            spec = "" if spec == "<>" else spec
            if address.display_name or spec:
                found.append(Mailbox(clean(address.display_name), clean(spec)))
    return tuple(found)


def _message_id(value: str) -> str | None:
    text, _ = _from_8bit(_LINE_BREAK.sub("", value))
    match = _ANGLE_ADDR.search(text)
    found = match.group(1) if match else text.strip("<> \t")
    return clean(found.strip()) or None


def _date(value: str, defects: list[str]) -> str | None:
    text = _LINE_BREAK.sub("", value).strip()
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (ValueError, TypeError, IndexError, OverflowError):
        defects.append("unreadable Date header")
        return None
    if moment.tzinfo is None:  # '-0000': UTC, local offset unknown (RFC 5322 §3.3)
        moment = moment.replace(tzinfo=UTC)
    return moment.isoformat()


def _passthrough(
    items: list[tuple[str, str]], prefixes: Sequence[str], defects: list[str]
) -> dict[str, str]:
    if isinstance(prefixes, str):
        prefixes = [prefixes]
    wanted = tuple(p.strip().lower() for p in prefixes if p.strip())
    if not wanted:
        return {}
    found: dict[str, str] = {}
    spelling: dict[str, str] = {}  # lowercase name → the first spelling seen
    for name, value in items:
        key = name.lower()
        if not key.startswith(wanted):
            continue
        text = clean(str(_read_header(name, value, defects, structured=False)))
        if key in spelling:
            found[spelling[key]] += ", " + text
        else:
            spelling[key] = clean(name)
            found[spelling[key]] = text
    return found


# --- bodies and attachments ------------------------------------------------


def _decode_text(data: bytes, charset: str | None, where: str, defects: list[str]) -> str:
    """Text from bytes: the declared charset, else UTF-8, else latin-1."""
    if charset and charset not in _ASCII_CHARSETS:
        try:
            return data.decode(charset)
        except LookupError:
            defects.append(f"undecodable charset {_short(charset)} in {where}")
        except ValueError:  # UnicodeDecodeError, or a codec that is no text codec
            try:
                text = data.decode(charset, errors="replace")
            except (LookupError, ValueError):
                defects.append(f"undecodable charset {_short(charset)} in {where}")
            else:
                defects.append(f"invalid {_short(charset)} bytes in {where}")
                return text
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        if not charset or charset in _ASCII_CHARSETS:
            defects.append(f"undeclared 8-bit text in {where} (read as latin-1)")
        return data.decode("latin-1")


def _charset(part: email.message.Message) -> str | None:
    try:
        return part.get_content_charset()
    except _LIBRARY_ERRORS:
        return None


def _transfer_encoding(part: email.message.Message) -> str:
    return str(part.get("content-transfer-encoding", "")).strip().lower()


def _serialise(messages: object, defects: list[str]) -> bytes:
    """The bytes of nested messages (``message/*`` payloads), as received."""
    buffer = io.BytesIO()
    try:
        for nested in messages if isinstance(messages, list) else ():
            _Serialiser(buffer, policy=_SERIALISE_POLICY).flatten(nested)
    except _LIBRARY_ERRORS as error:
        defects.append(f"unreadable nested message ({type(error).__name__})")
        return b""
    return buffer.getvalue()


def _content(part: email.message.Message, defects: list[str]) -> bytes:
    """The decoded content of a leaf part, copying large payloads as little as possible."""
    encoding = _transfer_encoding(part)
    if part.is_multipart():  # message/*: the nested message, not its parts
        data = _serialise(part.get_payload(), defects)
        try:
            if encoding == "base64":  # not allowed by RFC 2046, but sent
                return binascii.a2b_base64(data)
            if encoding == "quoted-printable":
                return binascii.a2b_qp(data)
        except ValueError:
            defects.append(f"undecodable {encoding} nested message")
        return data
    if encoding == "base64":
        try:
            # Straight from the text (a2b skips line breaks): get_payload(decode=True)
            # would first copy the whole payload three more times.
            text = part.get_payload()
            if isinstance(text, str):
                return binascii.a2b_base64(text)
        except _LIBRARY_ERRORS:  # bad padding or 8-bit bytes: the careful way below
            pass
    try:
        data_or_none: object = part.get_payload(decode=True)
    except _LIBRARY_ERRORS as error:
        defects.append(f"undecodable {_short(encoding)} content ({type(error).__name__})")
        return b""
    return data_or_none if isinstance(data_or_none, bytes) else b""


def _filename(part: email.message.Message) -> str | None:
    try:
        name = part.get_filename()
    except _LIBRARY_ERRORS:
        return None
    return clean(name) if name else None


def _content_id(part: email.message.Message) -> str | None:
    value = part.get("content-id")
    if value is None:
        return None
    found = clean(str(value)).strip().removeprefix("<").removesuffix(">").strip()
    return found or None


@dataclass(frozen=True)
class _Leaf:
    """A part that is not a container, with what decides its role."""

    part: email.message.Message
    content_type: str
    in_alternative: bool
    disposition: str | None
    filename: str | None

    @property
    def is_body(self) -> bool:
        """Text or HTML meant to be read, not an attachment."""
        textual = self.content_type in (_PLAIN, _HTML) or self.content_type.startswith(
            "multipart/"  # a multipart whose boundary was never found: its body as text
        )
        return textual and self.disposition != "attachment" and self.filename is None

    @property
    def kind(self) -> str:
        return _HTML if self.content_type == _HTML else _PLAIN


def _walk(msg: email.message.Message) -> tuple[list[_Leaf], list[email.message.Message]]:
    """One pass over the MIME tree, in document order, not into nested messages."""
    leaves: list[_Leaf] = []
    parts: list[email.message.Message] = []
    stack: list[tuple[email.message.Message, bool]] = [(msg, False)]
    while stack:
        part, in_alternative = stack.pop()
        parts.append(part)
        content_type = part.get_content_type()
        if part.is_multipart() and not content_type.startswith("message/"):
            children = part.get_payload()
            inside = in_alternative or content_type == _ALTERNATIVE
            if isinstance(children, list):
                stack.extend(
                    (child, inside)
                    for child in reversed(children)
                    if isinstance(child, email.message.Message)
                )
            continue
        disposition = part.get_content_disposition()
        leaves.append(_Leaf(part, content_type, in_alternative, disposition, _filename(part)))
    return leaves, parts


def _choose(leaves: list[_Leaf], kind: str) -> _Leaf | None:
    """The first body of ``kind``, preferring one inside multipart/alternative."""
    bodies = [leaf for leaf in leaves if leaf.is_body and leaf.kind == kind]
    preferred = [leaf for leaf in bodies if leaf.in_alternative]
    found = preferred or bodies
    return found[0] if found else None


def _body(leaf: _Leaf | None, defects: list[str]) -> str | None:
    if leaf is None:
        return None
    data = _content(leaf.part, defects)
    text = _decode_text(data, _charset(leaf.part), _short(leaf.content_type), defects)
    return clean(text.replace("\r\n", "\n"))


def _attachment(leaf: _Leaf, cap_bytes: int, defects: list[str]) -> Attachment:
    data = _content(leaf.part, defects)
    content_id = _content_id(leaf.part)
    disposition: Literal["attachment", "inline"]
    if leaf.disposition in ("attachment", "inline"):
        disposition = "attachment" if leaf.disposition == "attachment" else "inline"
    else:
        disposition = "inline" if content_id or leaf.is_body else "attachment"
    return Attachment(
        filename=leaf.filename,
        content_type=clean(leaf.content_type),
        size_bytes=len(data),
        content_id=content_id,
        disposition=disposition,
        data=base64.b64encode(data).decode("ascii") if len(data) <= cap_bytes else None,
    )


# --- the whole message -----------------------------------------------------


def _read_single_part(raw: bytes) -> email.message.Message | None:
    """A message that is not multipart: its headers parsed, its body taken as is.

    The feed parser walks a body line by line in Python only to store the lines
    joined again when the part is not a container. This parses the header section
    alone and sets the rest as the payload, which is what the full parse yields,
    for a header section that ends at an empty line without a defect and a
    ``Content-Type`` that is neither ``multipart/*`` nor ``message/*``. Anything
    else returns None and gets the full parse.
    """
    end = _HEADER_END.search(raw)
    if end is None:
        return None
    msg = BytesParser(policy=_POLICY).parsebytes(raw[: end.end()], headersonly=True)
    if msg.defects or msg.get_payload() or msg.get_content_maintype() in ("multipart", "message"):
        return None
    msg.set_payload(raw[end.end() :].decode("ascii", "surrogateescape"))
    return msg


def _read(raw: bytes, defects: list[str]) -> email.message.Message:
    """The parsed message; failing that its headers with the body as text."""
    try:
        return _read_single_part(raw) or BytesParser(policy=_POLICY).parsebytes(raw)
    except _LIBRARY_ERRORS as error:
        defects.append(f"unreadable MIME structure ({type(error).__name__}); body read as text")
    try:
        return BytesParser(policy=_POLICY).parsebytes(raw, headersonly=True)
    except _LIBRARY_ERRORS as error:
        defects.append(f"unreadable headers ({type(error).__name__}); message read as text")
    msg = _ParsedOnce(policy=_POLICY)
    msg.set_payload(raw.decode("ascii", "surrogateescape"))
    return msg


def _unique(defects: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(clean(d) for d in defects))


def _lean_read(raw: bytes | bytearray) -> tuple[email.message.Message, int] | None:
    """Like :func:`_read_single_part`, for a plain text body the lean path can stream.

    The headers parsed, the payload left empty, and where the body starts; None
    unless the one part is ``text/plain`` read as a body, in 7bit/8bit/binary,
    with no charset, an ASCII one or UTF-8 (the charsets decoded here in chunks
    exactly as :func:`_decode_text` decodes them whole).
    """
    end = _HEADER_END.search(raw)
    if end is None:
        return None
    msg = BytesParser(policy=_POLICY).parsebytes(bytes(raw[: end.end()]), headersonly=True)
    if msg.defects or msg.get_payload() or msg.get_content_type() != _PLAIN:
        return None
    charset = _charset(msg)
    if charset is not None and charset not in _ASCII_CHARSETS and charset != "utf-8":
        return None
    if _transfer_encoding(msg) not in _PLAIN_ENCODINGS:
        return None
    if msg.get_content_disposition() == "attachment" or _filename(msg) is not None:
        return None
    return msg, end.end()


def _text_source(
    raw: bytes | bytearray, start: int, charset: str | None, defects: list[str]
) -> TextSource:
    """The body as :func:`_decode_text` would read it, with the same defects."""
    source = TextSource(raw, start, "utf-8", "strict")
    if source.decodes():
        return source
    if charset == "utf-8":
        defects.append(f"invalid utf-8 bytes in {_PLAIN}")
        return TextSource(raw, start, "utf-8", "replace")
    defects.append(f"undeclared 8-bit text in {_PLAIN} (read as latin-1)")
    return TextSource(raw, start, "latin-1", "strict")


def _message(
    raw: bytes | bytearray,
    header_prefixes: Sequence[str],
    cap_bytes: int,
    defects: list[str],
    lean: tuple[email.message.Message, int] | None = None,
    parsed: email.message.Message | None = None,
) -> tuple[Message, TextSource | None]:
    """The message; with ``lean`` (from :func:`_lean_read`) its text as a source.

    ``parsed``, when given, is ``raw`` already read (by :func:`_read`).
    """
    msg = parsed if parsed is not None else _read(raw, defects) if lean is None else lean[0]
    items = list(msg.raw_items())
    by_name: dict[str, list[tuple[str, str]]] = {}
    for name, value in items:
        by_name.setdefault(name.lower(), []).append((name, value))

    def first(key: str) -> tuple[str, str] | None:
        values = by_name.get(key)
        return values[0] if values else None

    subject_item = first("subject")
    subject = _subject(*subject_item, defects) if subject_item else ""
    senders = _mailboxes(by_name.get("from", [])[:1], defects)
    id_item, date_item = first("message-id"), first("date")

    leaves, parts = _walk(msg)
    text_leaf, html_leaf = _choose(leaves, _PLAIN), _choose(leaves, _HTML)
    source = None
    if lean is not None and text_leaf is not None and text_leaf.part is msg:
        source = _text_source(raw, lean[1], _charset(msg), defects)
        text: str | None = ""
    else:
        text = _body(text_leaf, defects)
    html_body = _body(html_leaf, defects)
    if text is None:
        text = clean(_html2text(html_body, defects)) if html_body is not None else ""
    attachments = tuple(
        _attachment(leaf, cap_bytes, defects)
        for leaf in leaves
        if leaf is not text_leaf
        and leaf is not html_leaf
        and not (leaf.is_body and leaf.in_alternative)  # an unchosen alternative
    )
    for part in parts:  # after decoding, which adds base64 defects
        defects.extend(type(defect).__name__ for defect in part.defects)

    message = Message(
        subject=subject,
        sender=senders[0] if senders else None,
        to=_mailboxes(by_name.get("to", []), defects),
        cc=_mailboxes(by_name.get("cc", []), defects),
        reply_to=_mailboxes(by_name.get("reply-to", []), defects),
        message_id=_message_id(id_item[1]) if id_item else None,
        date=_date(date_item[1], defects) if date_item else None,
        text=text,
        html=html_body,
        headers=_passthrough(items, header_prefixes, defects),
        attachments=attachments,
        defects=_unique(defects),
    )
    return message, source


def parse(
    raw: bytes,
    *,
    header_prefixes: Sequence[str] = (),
    max_inline_attachment_bytes: int = 10 * MiB,
) -> Message:
    """Read one message; never raises (what cannot be read is in ``defects``)."""
    defects: list[str] = []
    try:
        return _message(raw, header_prefixes, max_inline_attachment_bytes, defects)[0]
    except Exception as error:  # the last guard: malformed mail must not stop a session or worker
        defects.append(f"unreadable message ({type(error).__name__}); read as text")
        return Message(
            subject="",
            sender=None,
            to=(),
            cc=(),
            reply_to=(),
            message_id=None,
            date=None,
            text=clean(_decode_text(raw, None, "message", defects).replace("\r\n", "\n")),
            html=None,
            headers={},
            attachments=(),
            defects=_unique(defects),
        )


@dataclass(frozen=True)
class Streamed:
    """:func:`parse_streamed` of a message: the message and its big parts as sources."""

    message: Message
    text: TextSource | None  # as :func:`parse_lean` gives it
    #: The attachments whose ``data`` is read from the raw message, by their
    #: ``Attachment.data``, which holds a random key instead of the base64 text.
    attachments: Mapping[str, Base64Source] = field(default_factory=dict)


def _base64_runs(raw: bytes | bytearray) -> dict[str, tuple[int, int, int]]:
    """The canonical base64 runs of :data:`LEAN_PART_BYTES` or more after an empty line
    that follows a ``Content-Transfer-Encoding: base64`` line.

    By a random key (canonical base64 itself): (start, end, decoded size).
    """
    runs: dict[str, tuple[int, int, int]] = {}
    position = 0
    hits = dict.fromkeys(_BASE64_NEEDLES, -1)
    while True:
        for needle, hit in hits.items():  # each needle searched again only once passed
            if 0 <= hit < position or (hit == -1 and position == 0):
                hits[needle] = raw.find(needle, position)
        found = [hit for hit in hits.values() if hit >= position]
        if not found:
            break
        hit = min(found)
        line = raw.rfind(b"\n", max(0, hit - 64), hit) + 1
        header = _BASE64_HEADER.match(raw, line)
        if header is None:
            position = hit + 1
            continue
        empty = _EMPTY_LINE.search(raw, header.end() - 1)  # the header's own line end
        if empty is None:
            break
        position = _LINE_BREAK_RUN.match(raw, empty.end()).end()  # type: ignore[union-attr]
        run = _BASE64_RUN.match(raw, position)
        if run is None:
            continue
        start, end = run.span()
        position = end  # each byte is looked at a bounded number of times
        while end > start:  # the line breaks at the end are not the run's
            window = bytes(raw[max(start, end - 4096) : end])
            kept = window.rstrip(_LINE_BREAKS)
            end -= len(window) - len(kept)
            if kept:
                break
        if end - start < LEAN_PART_BYTES:
            continue
        size = _base64_size(raw, start, end)
        if size is not None:
            key = base64.b64encode(secrets.token_bytes(33)).decode("ascii")  # no padding
            runs[key] = (start, end, size)
    return runs


def _skeleton(
    raw: bytes | bytearray,
    runs: Mapping[str, tuple[int, int, int]],
    header_prefixes: Sequence[str],
    cap_bytes: int,
) -> tuple[Message, set[str]] | None:
    """The full parse of ``raw`` with each run's text replaced by its key.

    With the keys that are, line breaks aside, the whole payload of a ``base64``
    leaf that became one attachment whose ``data`` is the key. None when the
    skeleton's structure could not be read.
    """
    pieces: list[bytes | bytearray] = []
    done = 0
    for key, (start, end, _) in sorted(runs.items(), key=lambda item: item[1]):
        pieces += (raw[done:start], key.encode("ascii"))
        done = end
    pieces.append(raw[done:])
    skeleton = b"".join(pieces)
    del pieces
    defects: list[str] = []
    msg = _read(skeleton, defects)
    if defects:  # take no chances
        return None
    payloads = set()
    for leaf in _walk(msg)[0]:
        if leaf.part.is_multipart() or _transfer_encoding(leaf.part) != "base64":
            continue
        text = leaf.part.get_payload()
        if isinstance(text, str) and text.strip("\r\n") in runs:
            payloads.add(text.strip("\r\n"))
    message, _ = _message(skeleton, header_prefixes, cap_bytes, defects, parsed=msg)
    data = [a.data for a in message.attachments if a.data is not None and a.data in runs]
    return message, {key for key in payloads if data.count(key) == 1}


def _big_base64_parts(
    raw: bytes | bytearray, header_prefixes: Sequence[str], cap_bytes: int
) -> Streamed | None:
    """The message with its big canonical base64 attachments read from ``raw``, or None.

    Every run of base64 lines of :data:`LEAN_PART_BYTES` or more that follows an
    empty line and is canonical base64 (:func:`_base64_size`) is replaced by a
    short random canonical base64 key, and that skeleton gets the full parse.
    The feed parser reads base64 lines as opaque body lines (none can be a
    boundary or a header), so the skeleton parses as the message does, with each
    run's text swapped for its key. A key that is, line breaks aside, the whole
    payload of a ``base64`` leaf that became exactly one attachment stands for
    that attachment's ``data``: the run without its line breaks, whose decoded
    size is known. Runs that are something else (a base64 text body, lines in a
    7bit part, a preamble) are put back and the skeleton parsed again, once.
    """
    runs = _base64_runs(raw)
    for _ in range(2):
        if not runs:
            return None
        parsed = _skeleton(raw, runs, header_prefixes, cap_bytes)
        if parsed is None:
            return None
        message, good = parsed
        if len(good) == len(runs):
            break
        runs = {key: run for key, run in runs.items() if key in good}
    else:
        return None
    attachments: list[Attachment] = []
    sources: dict[str, Base64Source] = {}
    for attachment in message.attachments:
        if attachment.data is not None and attachment.data in runs:
            key = attachment.data
            start, end, size = runs[key]
            if size <= cap_bytes:
                sources[key] = Base64Source(raw, start, end, size)
            attachment = dataclasses.replace(
                attachment, size_bytes=size, data=key if size <= cap_bytes else None
            )
        attachments.append(attachment)
    return Streamed(dataclasses.replace(message, attachments=tuple(attachments)), None, sources)


def parse_streamed(
    raw: bytes | bytearray,
    *,
    header_prefixes: Sequence[str] = (),
    max_inline_attachment_bytes: int = 10 * MiB,
) -> Streamed:
    """:func:`parse_lean`, except that big base64 attachments are not decoded either.

    For a message of :data:`LEAN_MESSAGE_BYTES` or more with base64 parts of
    :data:`LEAN_PART_BYTES` or more (see :func:`_big_base64_parts` for the exact
    conditions), such an attachment's ``data`` is a key of
    :attr:`Streamed.attachments`, whose source gives the base64 text in pieces;
    its size is the decoded size, as :func:`parse` gives it. Otherwise the
    message and text source are :func:`parse_lean`'s. Never raises.
    """
    if len(raw) >= LEAN_MESSAGE_BYTES:
        try:
            found = _big_base64_parts(raw, header_prefixes, max_inline_attachment_bytes)
        except Exception:  # parse_lean below reads it again, with its guards
            found = None
        if found is not None:
            return found
    message, source = parse_lean(
        raw,
        header_prefixes=header_prefixes,
        max_inline_attachment_bytes=max_inline_attachment_bytes,
    )
    return Streamed(message, source)


def parse_lean(
    raw: bytes | bytearray,
    *,
    header_prefixes: Sequence[str] = (),
    max_inline_attachment_bytes: int = 10 * MiB,
) -> tuple[Message, TextSource | None]:
    """:func:`parse`, except that a big plain text body is not read into a ``str``.

    For a single-part ``text/plain`` message of :data:`LEAN_MESSAGE_BYTES` or more
    (see :func:`_lean_read` for the exact conditions), ``Message.text`` is ``''``
    and the :class:`TextSource` gives the text in chunks; otherwise the source is
    None and the message is :func:`parse`'s. Either way the message and the
    text are exactly what :func:`parse` gives. Never raises.
    """
    lean = None
    if len(raw) >= LEAN_MESSAGE_BYTES:
        try:
            lean = _lean_read(raw)
        except _LIBRARY_ERRORS:
            lean = None
    if lean is not None:
        try:
            return _message(raw, header_prefixes, max_inline_attachment_bytes, [], lean)
        except Exception:  # parse() below reads it again, with its guard
            pass
    return (
        parse(
            raw,
            header_prefixes=header_prefixes,
            max_inline_attachment_bytes=max_inline_attachment_bytes,
        ),
        None,
    )
