"""DATA reading on a real asyncio StreamReader: strict end marker, unstuffing, limits."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailbridge.smtp import data
from mailbridge.smtp.session import enhance


async def feed(wire: bytes, *, max_bytes: int = 10_000, max_line: int = 1000, chunk: int = 7):
    """Run data.read over ``wire`` delivered in small chunks; return (Data, leftover)."""
    reader = asyncio.StreamReader(limit=64 * 1024)

    async def producer() -> None:
        for start in range(0, len(wire), chunk):
            reader.feed_data(wire[start : start + chunk])
            await asyncio.sleep(0)
        reader.feed_eof()

    task = asyncio.create_task(producer())
    result = await data.read(reader, max_bytes=max_bytes, max_line_bytes=max_line)
    await task
    return result, await reader.read()


async def test_message_ends_only_at_crlf_dot_crlf_and_keeps_what_follows() -> None:
    result, rest = await feed(b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n")
    assert data.Verdict.OK == result.verdict
    assert b"Subject: x\r\n\r\nhello\r\n" == result.content
    assert b"QUIT\r\n" == rest


async def test_empty_message_is_a_lone_dot() -> None:
    result, rest = await feed(b".\r\nNOOP\r\n")
    assert (data.Verdict.OK, b"", b"NOOP\r\n") == (result.verdict, result.content, rest)


@pytest.mark.parametrize(
    "lookalike",
    [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r", b"\r.\r\n"],
)
async def test_smuggling_lookalikes_are_content_not_an_end(lookalike: bytes) -> None:
    smuggled = b"a" + lookalike + b"MAIL FROM:<evil@x>\r\n"
    result, rest = await feed(smuggled + b".\r\n")
    assert data.Verdict.OK == result.verdict
    assert data.unstuff(b"\r\n" + smuggled) == result.content
    assert b"MAIL FROM:<evil@x>" in result.content
    assert b"" == rest


async def test_leading_dots_are_unstuffed_on_every_line() -> None:
    result, _ = await feed(b"..\r\n...x\r\n.y\r\nz.\r\n.\r\n")
    assert b".\r\n..x\r\ny\r\nz.\r\n" == result.content


async def test_too_big_is_drained_to_the_end_and_the_session_continues() -> None:
    body = b"x" * 60 + b"\r\n"
    wire = body * 2000 + b".\r\nRSET\r\n"
    result, rest = await feed(wire, max_bytes=10_000, chunk=4096)
    assert data.Verdict.TOO_BIG == result.verdict
    assert b"" == result.content
    assert len(body) * 2000 == result.wire_bytes
    assert b"RSET\r\n" == rest


async def test_exactly_at_the_size_limit_is_accepted() -> None:
    content = b"y" * 98 + b"\r\n"
    result, _ = await feed(content * 10 + b".\r\n", max_bytes=len(content) * 10)
    assert (data.Verdict.OK, content * 10) == (result.verdict, result.content)


async def test_a_line_over_the_limit_is_refused_after_the_whole_message() -> None:
    result, rest = await feed(b"ok\r\n" + b"z" * 1001 + b"\r\n.\r\nNOOP\r\n", max_line=1000)
    assert data.Verdict.LINE_TOO_LONG == result.verdict
    assert b"NOOP\r\n" == rest


async def test_a_line_at_the_limit_is_fine() -> None:
    result, _ = await feed(b"z" * 1000 + b"\r\n.\r\n", max_line=1000)
    assert data.Verdict.OK == result.verdict


async def test_client_vanishing_mid_data_raises_incomplete_read() -> None:
    with pytest.raises(asyncio.IncompleteReadError):
        await feed(b"Subject: cut\r\n\r\nhalf")


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(st.binary(max_size=80).map(lambda b: b.replace(b"\r\n", b"")), max_size=30))
def test_stuffing_then_reading_round_trips_any_content(lines: list[bytes]) -> None:
    content = b"".join(line + b"\r\n" for line in lines)
    wire = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)

    async def run() -> data.Data:
        result, _ = await feed(wire + b".\r\n", max_bytes=1_000_000, max_line=10_000, chunk=13)
        return result

    result = asyncio.run(run())
    assert (data.Verdict.OK, content) == (result.verdict, result.content)


@pytest.mark.parametrize(
    ("content", "limit", "expected"),
    [
        (b"a" * 10, 10, False),
        (b"a" * 11, 10, True),
        (b"a" * 10 + b"\r\n" + b"b" * 10, 10, False),
        (b"a" * 5 + b"\r\n" + b"b" * 11 + b"\r\n", 10, True),
        ((b"a" * 9 + b"\r\n") * 100 + b"c" * 11, 10, True),
        ((b"a" * 9 + b"\r\n") * 100, 10, False),
    ],
)
def test_longest_line_check(content: bytes, limit: int, expected: bool) -> None:
    assert expected == data.longest_line_exceeds(content, limit)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("250 OK", "250 2.0.0 OK"),
        ("503 Error: need MAIL command", "503 5.5.1 Error: need MAIL command"),
        ("500 Error: bad syntax", "500 5.5.2 Error: bad syntax"),
        (
            "530 Must issue a STARTTLS command first",
            "530 5.7.0 Must issue a STARTTLS command first",
        ),
        ("552 Error: too much", "552 5.3.4 Error: too much"),
        ("550 5.1.1 already enhanced", "550 5.1.1 already enhanced"),
        ("354 End data", "354 End data"),
        ("599 odd", "599 5.0.0 odd"),
        ("220 mx.test mailbridge ESMTP", "220 mx.test mailbridge ESMTP"),
        ("220 Ready to start TLS", "220 2.0.0 Ready to start TLS"),
    ],
)
def test_every_reply_gets_an_enhanced_code(reply: str, expected: str) -> None:
    assert expected == enhance(reply)
