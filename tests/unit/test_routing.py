"""Routing on the envelope: patterns, plus-addressing, case, fan-out, and no relaying."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailbridge import routing

ROUTES = routing.compile_routes(
    {
        "billing": ["billing@example.com", "invoices@example.com"],
        "support": ["*@support.example.com"],
        "alerts": ["alerts+prod@example.com"],
        "everything": ["*"],
    }
)
NAMED = routing.compile_routes(
    {"billing": ["billing@example.com"], "support": ["*@support.example.com"]}
)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("billing@example.com", ("billing",)),
        ("BILLING@Example.COM", ("billing",)),
        ("billing+q3@example.com", ("billing",)),
        ("someone@support.example.com", ("support",)),
        ("someone@sub.support.example.com", ()),
        ("nobody@example.com", ()),
        ("billing@example.com.", ("billing",)),
    ],
)
def test_match_by_exact_domain_and_plus_address(address: str, expected: tuple[str, ...]) -> None:
    assert expected == routing.match(NAMED, address)


def test_a_tagged_pattern_matches_only_that_tag() -> None:
    routes = routing.compile_routes({"alerts": ["alerts+prod@example.com"]})
    assert ("alerts",) == routing.match(routes, "alerts+prod@example.com")
    assert () == routing.match(routes, "alerts@example.com")
    assert () == routing.match(routes, "alerts+dev@example.com")


def test_catch_all_takes_any_local_address_and_message_fans_out() -> None:
    assert ("billing", "everything") == routing.match(ROUTES, "billing@example.com")
    assert ("everything",) == routing.match(ROUTES, "x@y.org")


@pytest.mark.parametrize(
    "address",
    [
        "user%evil.com@example.com",
        "evil.com!user@example.com",
        '"user@evil.com"@example.com',
        "user@[127.0.0.1]",
        "user@",
        "@example.com",
        "no-at-sign",
        "user@exa mple.com",
        "@a.com,@b.com:user@example.com",
    ],
)
def test_relay_forms_match_nothing_even_with_a_catch_all(address: str) -> None:
    assert () == routing.match(ROUTES, address)


def test_idn_domains_match_in_either_form() -> None:
    routes = routing.compile_routes({"de": ["*@bücher.example"]})
    assert ("de",) == routing.match(routes, "info@xn--bcher-kva.example")
    assert ("de",) == routing.match(routes, "info@BÜCHER.example")


def test_fan_out_groups_recipients_per_route_in_route_order() -> None:
    groups = routing.fan_out(
        ROUTES, ["x@support.example.com", "billing+a@example.com", "nobody@nowhere.test"]
    )
    assert {
        "billing": ["billing+a@example.com"],
        "support": ["x@support.example.com"],
        "everything": ["x@support.example.com", "billing+a@example.com", "nobody@nowhere.test"],
    } == groups
    assert ["billing", "support", "everything"] == list(groups)


def test_split_exposes_the_plus_tag() -> None:
    parts = routing.split("Support+Billing@Example.com")
    assert parts == routing.Address(
        address="support+billing@example.com", local="support", domain="example.com", tag="billing"
    )
    assert "support@example.com" == parts.base


@pytest.mark.parametrize("bad", ["*@", "a*@b.com", "*@*.com", "not an address", "x@[1.2.3.4]"])
def test_invalid_patterns_say_what_is_wrong(bad: str) -> None:
    with pytest.raises(ValueError, match="not a valid pattern"):
        routing.parse_pattern(bad)


local_parts = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters='@%!,:*"<>\\'),
    min_size=1,
    max_size=20,
)
domains = st.from_regex(r"[a-z][a-z0-9-]{0,10}\.(com|org|test)", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(local=local_parts, domain=domains, tag=st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True))
def test_plus_addressed_and_case_changed_forms_route_like_the_base(
    local: str, domain: str, tag: str
) -> None:
    base_local = local.split("+", 1)[0]
    if not base_local:
        return
    routes = routing.compile_routes({"r": [f"{base_local}@{domain}"]})
    assert ("r",) == routing.match(routes, f"{base_local}+{tag}@{domain}")
    assert ("r",) == routing.match(routes, f"{base_local.upper()}@{domain.upper()}")


@settings(max_examples=300, deadline=None)
@given(address=st.text(max_size=60))
def test_match_never_raises_and_relay_characters_never_route(address: str) -> None:
    result = routing.match(ROUTES, address)
    local = address.rpartition("@")[0]
    if set(local) & set("%!"):
        assert () == result
