"""The session's fast path for MAIL/RCPT paths gives what aiosmtpd's parser gives.

:data:`mailbridge.smtp.session.PLAIN_PATH` reads ``<local@domain>`` paths (both
dot-atoms) without the stdlib header parser. On every argument it accepts it
must return the same address and remaining text as ``aiosmtpd.smtp.SMTP._getaddr``,
and it must decline source routes, quoted or 8-bit local parts, comments and the
rest, so their existing handling is unchanged.
"""

from __future__ import annotations

import itertools
import random

import pytest
from aiosmtpd.smtp import SMTP

from mailbridge.smtp import session as session_module
from mailbridge.smtp.session import Session

ADDRESSES = [
    "a@b",
    "bench@example.com",
    "first.last@sub.example.org",
    "x+tag@example.com",
    "o'neil@example.com",
    "a..b@example.com",
    ".a@example.com",
    "a@[127.0.0.1]",
    "a@b.",
    "@b",
    "a@",
    "",
    "a b@c",
    "ünï@example.com",
    "a@b@c",
    '"q"@example.com',
    "@hop:a@b",
    "@h1,@h2:a@b",
]
SHAPES = [
    "<{addr}>",
    "<{addr}> SIZE=1024",
    "<{addr}>  BODY=8BITMIME SMTPUTF8",
    "<{addr}>\tSIZE=1",
    "<{addr}>SIZE=1",
    "<{addr}> (comment) SIZE=1",
    "<{addr}>(c)",
    " <{addr}>",
    "{addr}",
    "{addr} SIZE=1",
    "<{addr}",
    "<<{addr}>>",
    "<{addr}> ",
]


def plain_session(local_part_limit: int = 0) -> Session:
    session = object.__new__(Session)  # _getaddr needs no connection
    session.local_part_limit = local_part_limit
    session._keep_source_route = True
    return session


def stdlib(session: Session, arg: str) -> tuple[str | None, str | None]:
    try:
        return SMTP._getaddr(session, arg)
    except session_module.ADDRESS_PARSER_ERRORS:
        return None, None


def arguments() -> list[str]:
    found = [shape.format(addr=a) for shape, a in itertools.product(SHAPES, ADDRESSES)]
    rng = random.Random(6)
    alphabet = "ab.@<> \t\"'=?,;:()[]\\_-+Ü"
    found += [
        "<" + "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 16))) for _ in range(4000)
    ]
    return found


@pytest.mark.parametrize("limit", [0, 4])
def test_a_plain_path_is_read_as_aiosmtpd_reads_it(limit: int) -> None:
    session = plain_session(limit)
    taken = 0
    for arg in arguments():
        if session_module.PLAIN_PATH.match(arg) is None:
            continue
        taken += 1
        assert stdlib(session, arg) == session._getaddr(arg), arg
    assert taken > 20  # the fast path is really used


@pytest.mark.parametrize(
    "arg",
    [
        "<@hop:a@b>",
        '<"q"@example.com>',
        "<ünï@example.com>",
        "<a@b> (c) SIZE=1",
        "a@b",
        "<a..b@c>",
        "<a@[127.0.0.1]>",
        "<>",
    ],
)
def test_anything_else_is_left_to_the_full_parser(arg: str) -> None:
    assert session_module.PLAIN_PATH.match(arg) is None


def test_a_source_route_is_still_kept_for_routing_to_refuse() -> None:
    assert ("@hop:a@b", "") == plain_session()._getaddr("<@hop:a@b>")
