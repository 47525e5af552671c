"""model: durations, sizes, defaults, and problems reported with their spec paths."""

from __future__ import annotations

from typing import Any

import pytest

from mailbridge_operator import model


def spec(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "routes": [
            {
                "name": "main",
                "recipients": ["*@example.com"],
                "webhook": {"url": "https://hooks.example.com/mail"},
            }
        ]
    }
    return base | fields


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1m30s250ms", 90.25),
    ],
)
def test_durations_become_seconds(text: str, seconds: float) -> None:
    assert seconds == pytest.approx(model.parse_duration(text))


@pytest.mark.parametrize(
    ("text", "size"),
    [("1024", 1024), ("512Ki", 512 * 1024), ("25Mi", 25 * 2**20), ("1G", 10**9), (2048, 2048)],
)
def test_sizes_become_bytes(text: str | int, size: int) -> None:
    assert size == model.parse_size(text)


@pytest.mark.parametrize("text", ["5 minutes", "1d", "-1s", ""])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        model.parse_duration(text)


def test_defaults_match_the_bridge_defaults_where_they_overlap() -> None:
    parsed = model.parse(spec())
    assert (1, 2525, 25 * 2**20, "sync", 25, "ClusterIP") == (
        parsed.replicas,
        parsed.smtp.port,
        parsed.smtp.max_message_size,
        parsed.delivery.mode,
        parsed.service.port,
        parsed.service.type,
    )
    assert parsed.effective_image.startswith("ghcr.io/mailbridge/mailbridge:")


def test_every_problem_is_listed_with_its_path() -> None:
    bad = spec(replicas=-1, smtp={"port": 80})
    bad["routes"][0]["webhook"]["url"] = "mailto:x@example.com"
    with pytest.raises(model.InvalidSpecError) as caught:
        model.parse(bad)
    paths = sorted(problem.split(":")[0] for problem in caught.value.problems)
    assert ["spec.replicas", "spec.routes[0].webhook.url", "spec.smtp.port"] == paths
    assert "spec.replicas" in str(caught.value)


def test_secret_names_cover_signing_and_tls_secrets_once() -> None:
    parsed = model.parse(
        spec(
            tls={"secretName": "mx-tls"},
            routes=[
                {
                    "name": "a",
                    "recipients": ["a@x.org"],
                    "webhook": {
                        "url": "https://h.example/a",
                        "signingSecretRef": {"name": "hooks", "key": "a"},
                        "additionalSigningSecretRefs": [{"name": "old-hooks"}],
                    },
                },
                {
                    "name": "b",
                    "recipients": ["b@x.org"],
                    "webhook": {
                        "url": "https://h.example/b",
                        "signingSecretRef": {"name": "hooks", "key": "b"},
                    },
                },
            ],
        )
    )
    assert ("hooks", "mx-tls", "old-hooks") == parsed.secret_names
    assert "secret" == parsed.routes[0].webhook.additional_signing_secret_refs[0].key


def test_rotation_secrets_need_a_primary() -> None:
    bad = spec()
    bad["routes"][0]["webhook"]["additionalSigningSecretRefs"] = [{"name": "old"}]
    with pytest.raises(model.InvalidSpecError, match="needs signingSecretRef"):
        model.parse(bad)


def test_a_disabled_tls_secret_is_not_referenced() -> None:
    assert () == model.parse(spec(tls={"enabled": True})).secret_names
