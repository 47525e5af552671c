"""Routing: which routes want which envelope recipients. Pure; no I/O.

Trusts nothing: recipients come straight from ``RCPT TO``. Routing is on the
SMTP envelope only, never on ``To:``/``From:`` headers.

Patterns (case-insensitive; domains compared in their IDNA ASCII form):

``user@example.com``   that address, and its plus-addressed forms ``user+tag@example.com``
``*@example.com``      any address at that domain (not its subdomains)
``*``                  any address (catch-all)

Addresses that try to relay (``%`` or ``!`` in the local part, a source route,
an IP-literal domain, no domain) match no route: the bridge never relays.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

PLUS = "+"
RELAY_CHARACTERS = frozenset("%!@:,")


@dataclass(frozen=True)
class Address:
    """A recipient split into its parts; ``base`` is the address without its +tag."""

    address: str
    local: str
    domain: str
    tag: str | None

    @property
    def base(self) -> str:
        return f"{self.local}@{self.domain}"


@dataclass(frozen=True)
class Pattern:
    kind: Literal["exact", "domain", "any"]
    value: str  # the normalised address, domain, or "" for any

    @property
    def text(self) -> str:
        return {"exact": self.value, "domain": f"*@{self.value}", "any": "*"}[self.kind]


@dataclass(frozen=True)
class Route:
    name: str
    patterns: tuple[Pattern, ...]


def _domain(text: str) -> str | None:
    domain = text.strip().rstrip(".").lower()
    if not domain or domain.startswith("[") or any(c in domain for c in ' \t@%!,:;<>"\\'):
        return None
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return None


@functools.lru_cache(maxsize=4096)
def split(address: str) -> Address | None:
    """Split and normalise a recipient; ``None`` when it is not a deliverable local address.

    Cached (it is pure and its result immutable): routing and the payload's
    tags split each recipient of every message, and recipients repeat.
    """
    local, at, domain_text = address.strip().rpartition("@")
    if not at or not local:
        return None
    if RELAY_CHARACTERS & set(local.strip('"')) or local.startswith("@"):
        return None
    domain = _domain(domain_text)
    if domain is None:
        return None
    local = local.lower()
    base_local, plus, tag = local.partition(PLUS)
    if plus and base_local:
        return Address(address=f"{local}@{domain}", local=base_local, domain=domain, tag=tag)
    return Address(address=f"{local}@{domain}", local=local, domain=domain, tag=None)


def parse_pattern(text: str) -> Pattern:
    """Read a route's recipient pattern; raise ``ValueError`` saying what is wrong."""
    stripped = text.strip()
    if stripped == "*":
        return Pattern("any", "")
    if stripped.startswith("*@"):
        domain = _domain(stripped[2:])
        if domain is None or "*" in domain:
            raise ValueError(f"{text!r} is not a valid pattern: bad domain after '*@'")
        return Pattern("domain", domain)
    if "*" in stripped:
        raise ValueError(f"{text!r} is not a valid pattern: '*' only as '*' or '*@domain'")
    parts = split(stripped)
    if parts is None:
        raise ValueError(f"{text!r} is not a valid pattern: expected user@domain, *@domain or *")
    # A pattern with a +tag matches exactly that tagged address.
    return Pattern("exact", parts.address)


def compile_routes(routes: Mapping[str, Iterable[str]]) -> tuple[Route, ...]:
    """Build routes from ``{name: [pattern, ...]}`` in the given order."""
    return tuple(
        Route(name, tuple(parse_pattern(p) for p in patterns)) for name, patterns in routes.items()
    )


def _matches(pattern: Pattern, address: Address) -> bool:
    if pattern.kind == "any":
        return True
    if pattern.kind == "domain":
        return pattern.value == address.domain
    return pattern.value in (address.address, address.base)


def match(routes: Sequence[Route], address: str) -> tuple[str, ...]:
    """Names of the routes that want ``address``, in route order (empty: unknown)."""
    parts = split(address)
    if parts is None:
        return ()
    return tuple(route.name for route in routes if any(_matches(p, parts) for p in route.patterns))


def fan_out(routes: Sequence[Route], recipients: Iterable[str]) -> dict[str, list[str]]:
    """Group accepted recipients by route: one delivery per (message, route)."""
    grouped: dict[str, list[str]] = {}
    for recipient in recipients:
        for name in match(routes, recipient):
            grouped.setdefault(name, []).append(recipient)
    return {route.name: grouped[route.name] for route in routes if route.name in grouped}
