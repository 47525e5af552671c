"""The parser's fast paths give exactly what the standard library's full parse gives.

:func:`mailbridge.parsing._plain_mailbox` reads plain address headers without
the structured header parser. It must agree with the slow path on every input
it accepts, and decline everything else.
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
