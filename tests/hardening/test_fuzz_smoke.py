"""A bounded smoke run of the fuzz targets (``fuzz/targets.py``) with hypothesis.

Seconds, not hours: a fixed number of examples per target, no deadline, and a
derandomised run so CI is repeatable. The long coverage-guided run is atheris
(``fuzz/README.md``). Every crash either run finds becomes a case below.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fuzz import targets

SMOKE = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MESSAGES = Path(__file__).resolve().parent.parent / "unit" / "messages"

COMMANDS = [
    b"EHLO client.test",
    b"HELO client.test",
    b"EHLO",
    b"MAIL FROM:<a@sender.test>",
    b"MAIL FROM:<>",
    b"MAIL FROM:<a@sender.test> SIZE=100",
    b"MAIL FROM:<a@sender.test> SIZE=999999999",
    b"MAIL FROM:<a@sender.test> BODY=8BITMIME SMTPUTF8",
    b"MAIL FROM:a@sender.test",
    b"RCPT TO:<billing@example.com>",
    b"RCPT TO:<Billing+tag@Example.COM>",
    b"RCPT TO:<x@support.example.com>",
    b"RCPT TO:<anyone@anywhere.test>",
    b"RCPT TO:<user%evil.test@example.com>",
    b"RCPT TO:<@hop.test:user@example.com>",
    b'RCPT TO:<"a@b"@example.com>',
    b"RCPT TO:<user@[127.0.0.1]>",
    b"RCPT TO:<postmaster>",
    b"RCPT TO:<billing@example.com> NOTIFY=NEVER",
    b"DATA",
    b"DATA x",
    b"BDAT 10 LAST",
    b"RSET",
    b"NOOP",
    b"VRFY billing",
    b"EXPN list",
    b"HELP",
    b"HELP DATA",
    b"STARTTLS",
    b"AUTH PLAIN AGFhAGI=",
    b"QUIT",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2",
]
FRAGMENTS = [
    b"Subject: fuzz\r\n\r\n",
    b"\r\n.\r\n",
    b".\r\n",
    b"..\r\n",
    b"\n.\n",
    b"\r.\r",
    b"\r\n.\n",
    b"\n.\r\n",
    b"\r\n",
    b"\n",
    b"\r",
    b".",
    b"\x00",
    b"\xff\xfe",
    b"\xc3\xa9",
    b"x" * 1100,
]
ENDINGS = [b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b""]

token = st.one_of(
    st.tuples(st.sampled_from(COMMANDS), st.sampled_from(ENDINGS)).map(b"".join),
    st.sampled_from(FRAGMENTS),
    st.binary(max_size=40),
)


@st.composite
def sessions(draw: st.DrawFn) -> list[bytes]:
    stream = b"".join(draw(st.lists(token, max_size=30)))
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    chunks, start = [], 0
    for cut in [*cuts, len(stream)]:
        if cut > start:
            chunks.append(stream[start:cut])
            start = cut
    return chunks


FULL = [
    b"EHLO client.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<billing@example.com>\r\nDATA\r\n",
    b"Subject: hi\r\n\r\n..dot\r\n.\r\nQUIT\r\n",
]


@SMOKE
@given(sessions())
@example(FULL)
@example([FULL[0], b"Subject: hi\r\n\r\nx\n.\nMAIL FROM:<e@vil.test>\r\n\r\n.\r\n"])
@example([b"EHLO \x00\r\nHELO a\rb\r\nMAIL FROM:<a\xff@b.test>\r\n"])
@example([b"\r.\rEHLO client.test\r\n"])  # found: a CR echoed into the 500 reply
@example([b"EHLO\r\n", b"HELO\r\n"])  # found: "501 Syntax: EHLO" had no enhanced code
@example(
    [b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<billing@\r\n"]
)  # found by atheris: IndexError -> 451
@example([b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@b.test>\r\nDATA\r\n.x\r\n..y\r\n.\r\n"])
@example([b"X" * 500 + b"\r\n"])  # an echoed verb must not make the reply over-long
def test_smtp_sessions_keep_their_invariants(chunks: list[bytes]) -> None:
    targets.smtp_session(chunks)


def test_a_whole_transaction_through_the_harness_is_accepted_once() -> None:
    replies = targets.smtp_session(FULL)
    assert ["354", "250", "221"] == [line[:3] for line in replies[-3:]]


def _seed_messages() -> list[bytes]:
    return [path.read_bytes() for path in sorted(MESSAGES.glob("*.eml"))]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    seed = bytearray(draw(st.sampled_from(_seed_messages())))
    for _ in range(draw(st.integers(0, 8))):
        if not seed:
            break
        at = draw(st.integers(0, len(seed) - 1))
        action = draw(st.sampled_from(["flip", "cut", "insert", "repeat"]))
        if action == "flip":
            seed[at] = draw(st.integers(0, 255))
        elif action == "cut":
            del seed[at : at + draw(st.integers(1, 200))]
        elif action == "insert":
            seed[at:at] = draw(st.sampled_from([*FRAGMENTS, b"--", b"=?utf-8?b?", b"boundary="]))
        else:
            seed[at:at] = seed[at : at + draw(st.integers(1, 300))] * draw(st.integers(2, 20))
    return bytes(seed)


@SMOKE
@given(st.one_of(mutated(), st.binary(max_size=3000)))
def test_the_mime_parser_and_payload_build_are_total(raw: bytes) -> None:
    targets.mime(raw)


def test_every_seed_message_parses_cleanly() -> None:
    for raw in _seed_messages():
        targets.mime(raw)


data_stream = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=30), st.just(b"a" * 90)),
    max_size=25,
).map(b"".join)


@SMOKE
@given(
    stream=data_stream,
    chunk=st.integers(1, 64),
    max_bytes=st.integers(1, 600),
    max_line=st.integers(1, 120),
    budget_bytes=st.none() | st.integers(0, 3000),
)
@example(stream=b".\r\n", chunk=1, max_bytes=1, max_line=1, budget_bytes=None)
@example(stream=b"a\n.\nb\r.\r\n.\r\nrest", chunk=2, max_bytes=100, max_line=80, budget_bytes=None)
@example(stream=b"..\r\n" * 200 + b".\r\n", chunk=9, max_bytes=300, max_line=5, budget_bytes=None)
@example(stream=b"x\r\n" * 500 + b".\r\nQ", chunk=64, max_bytes=2000, max_line=5, budget_bytes=1100)
def test_the_data_reader_agrees_with_the_rfc_model(
    stream: bytes, chunk: int, max_bytes: int, max_line: int, budget_bytes: int | None
) -> None:
    targets.data_reader(
        stream, chunk=chunk, max_bytes=max_bytes, max_line=max_line, budget_bytes=budget_bytes
    )


ATOM = st.text(alphabet="aZ09!#$%&'*+/=?^_`{|}~-.é", min_size=1, max_size=8)
PATH_TAIL = st.text(alphabet=' \t()aZ=<>@"x.,:;\\', max_size=12)


@SMOKE
@given(
    st.one_of(
        st.tuples(st.sampled_from(["", " ", "\t"]), ATOM, ATOM, PATH_TAIL).map(
            lambda parts: f"{parts[0]}<{parts[1]}@{parts[2]}>{parts[3]}"
        ),
        st.text(alphabet='<>@. \t()aZ09!#%"[]:,;\\', max_size=30),
    )
)
@example("<a@b> SIZE=10")
@example("<a@b>(comment) SIZE=10")
@example("<a.@b>")
@example("<@hop:a@b>")
@example("<i.c@o> \x1e\x1eS")  # found by atheris: the fast path kept blanks the stdlib eats
@example("<a@b> \xa0X")
@example("<a@b>\n")
@example(" -\udc8f\\\udc87$.\x00@[ ")  # found by atheris: UnboundLocalError in the stdlib
def test_the_session_reads_mail_and_rcpt_paths_as_aiosmtpd_does(arg: str) -> None:
    targets.address_path(arg)
