"""reconcile and handlers helpers: drift detection and the Secrets a spec reads."""

from __future__ import annotations

from typing import Any

import pytest

from mailbridge_operator import handlers, kube, reconcile

LIVE: dict[str, Any] = {
    "metadata": {"name": "mx", "uid": "1", "labels": {"a": "1", "b": "2"}},
    "spec": {
        "replicas": 2,
        "template": {
            "spec": {
                "containers": [
                    {
                        "name": "main",
                        "image": "x:1",
                        "terminationMessagePath": "/dev/termination-log",
                    }
                ]
            }
        },
    },
    "status": {"replicas": 2},
}


@pytest.mark.parametrize(
    ("desired", "expected"),
    [
        ({"metadata": {"labels": {"a": "1"}}}, True),  # extra live fields are fine
        (
            {"spec": {"template": {"spec": {"containers": [{"name": "main", "image": "x:1"}]}}}},
            True,
        ),  # server defaults inside list items are fine
        ({"metadata": {"labels": {"a": "2"}}}, False),
        ({"metadata": {"labels": {"c": "3"}}}, False),
        ({"spec": {"replicas": 3}}, False),
        (
            {
                "spec": {
                    "template": {
                        "spec": {
                            "containers": [
                                {"name": "main", "image": "x:1"},
                                {"name": "side", "image": "y"},
                            ]
                        }
                    }
                }
            },
            False,
        ),
        (
            {"spec": {"template": {"spec": {"containers": [{"name": "main", "image": "x:2"}]}}}},
            False,
        ),
    ],
)
def test_contains_decides_whether_a_child_needs_an_apply(
    desired: dict[str, Any], expected: bool
) -> None:
    assert expected is reconcile.contains(LIVE, desired)


def test_secret_names_are_read_even_from_an_invalid_spec() -> None:
    spec = {
        "routes": [
            {
                "name": "Bad Name",
                "webhook": {
                    "signingSecretRef": {"name": "a"},
                    "additionalSigningSecretRefs": [{"name": "b"}, {}],
                },
            },
            {"webhook": {}},
            None,
        ],
        "tls": {"secretName": "tls"},
    }
    assert {"a", "b", "tls"} == handlers._secret_names(spec)
    assert set() == handlers._secret_names({})


@pytest.mark.parametrize(
    ("args", "path"),
    [
        (("v1", "Secret", "mail", "hooks"), "/api/v1/namespaces/mail/secrets/hooks"),
        (("apps/v1", "Deployment", "mail", None), "/apis/apps/v1/namespaces/mail/deployments"),
        (
            ("mailbridge.io/v1alpha1", "MailBridge", "m", "x"),
            "/apis/mailbridge.io/v1alpha1/namespaces/m/mailbridges/x",
        ),
    ],
)
def test_api_paths(args: tuple[str, str, str, str | None], path: str) -> None:
    assert path == kube.path(*args)


def test_outcome_classifies_for_metrics() -> None:
    ready = {
        "conditions": [
            {"type": "Ready", "status": "True"},
            {"type": "Progressing", "status": "False"},
        ]
    }
    rolling = {
        "conditions": [
            {"type": "Ready", "status": "True"},
            {"type": "Progressing", "status": "True", "message": "1 of 2"},
        ]
    }
    assert "settled" == reconcile.Outcome(ready).outcome
    assert "waiting" == reconcile.Outcome(rolling).outcome
    assert "1 of 2" == reconcile.Outcome(rolling).waiting_for
    assert "invalid" == reconcile.Outcome(ready, invalid=True).outcome
    assert "failed" == reconcile.Outcome(ready, apply_error="403").outcome
