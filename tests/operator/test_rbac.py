"""rbac.RULES: exactly the permissions the running operator uses — none missing, none spare.

Every test that starts the operator already fails when it makes a request the
rules do not grant (see ``conftest.start_operator``). Here one scenario walks
every code path that needs a permission, and the rules it never exercised are
reported as spare.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import yaml
from emulator import OPERATOR_AGENTS, SERVICE_MONITOR_CRD, Cluster, OperatorProcess

from mailbridge_operator import rbac

pytestmark = pytest.mark.timeout(90)


def bridge(name: str, namespace: str, **spec: object) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "mailbridge.io/v1alpha1",
            "kind": "MailBridge",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "routes": [
                    {
                        "name": "main",
                        "recipients": ["*@example.com"],
                        "webhook": {
                            "url": "https://hooks.example/mail",
                            "signingSecretRef": {"name": "hooks"},
                        },
                    }
                ],
                **spec,
            },
        }
    )


def test_policy_rules_group_resources_by_api_group_and_verbs() -> None:
    rules = rbac.policy_rules()
    granted = {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    expected = {(r.api_group, r.resource, v) for r in rbac.RULES for v in r.verbs}
    assert expected == granted
    assert not rbac.allows("", "secrets", "patch")  # the operator never writes Secrets
    assert not rbac.allows("", "pods", "list")


def test_every_rule_is_needed_by_some_code_path(
    cluster: Cluster, start_operator: Callable[..., OperatorProcess]
) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(SERVICE_MONITOR_CRD))
    cluster.kubectl(
        "create",
        "secret",
        "generic",
        "hooks",
        "--from-literal=secret=whsec_c3VwcG9ydC1leGFtcGxlLXNpZ25pbmcta2V5LTAx",
    )
    operator = start_operator("--all-namespaces")

    def wait(what: str, predicate: Callable[[], object]) -> None:
        cluster.wait_for(predicate, what=what, details=operator.log)

    cluster.kubectl(
        "apply",
        "-f",
        "-",
        input=bridge(
            "mx",
            "default",
            monitoring={"serviceMonitor": {"enabled": True}},
            podDisruptionBudget={"enabled": True},
        ),
    )
    wait(
        "the ServiceMonitor",
        lambda: cluster.get("monitoring.coreos.com/v1/servicemonitors", "default", "mx"),
    )
    cluster.kubectl(
        "patch",
        "mailbridge",
        "mx",
        "--type=merge",
        "-p",
        json.dumps(
            {
                "spec": {
                    "monitoring": {"serviceMonitor": {"enabled": False}},
                    "podDisruptionBudget": {"enabled": False},
                    "persistence": {"enabled": True},
                    "delivery": {"mode": "spool"},
                }
            }
        ),
    )
    wait(
        "the Deployment, PDB and ServiceMonitor removed",
        lambda: all(
            cluster.get(resource, "default", "mx") is None
            for resource in (
                "apps/v1/deployments",
                "policy/v1/poddisruptionbudgets",
                "monitoring.coreos.com/v1/servicemonitors",
            )
        ),
    )
    cluster.kubectl(
        "patch",
        "mailbridge",
        "mx",
        "--type=merge",
        "-p",
        json.dumps({"spec": {"persistence": {"enabled": False}, "delivery": {"mode": "sync"}}}),
    )
    wait(
        "the StatefulSet removed",
        lambda: cluster.get("apps/v1/statefulsets", "default", "mx") is None,
    )
    cluster.kubectl("delete", "mailbridge", "mx", "--timeout=20s", timeout=30)

    used = {call.permission for call in cluster.resource_requests(*OPERATOR_AGENTS)}
    granted = {(rule.api_group, rule.resource, verb) for rule in rbac.RULES for verb in rule.verbs}
    # Needed only when the operator serves a list of namespaces (see the next test).
    namespaced_only = {("", "namespaces", "list"), ("", "namespaces", "watch")}
    assert [] == sorted(granted - used - namespaced_only), "rules no code path needed"


def test_an_operator_for_one_namespace_leaves_the_others_alone(
    cluster: Cluster, start_operator: Callable[..., OperatorProcess]
) -> None:
    for namespace in ("team-a", "team-b"):
        cluster.create_namespace(namespace)
        cluster.kubectl(
            "create",
            "secret",
            "generic",
            "hooks",
            "-n",
            namespace,
            "--from-literal=secret=whsec_c3VwcG9ydC1leGFtcGxlLXNpZ25pbmcta2V5LTAx",
        )
    operator = start_operator("--namespace=team-a")
    cluster.kubectl("apply", "-f", "-", input=bridge("mx", "team-a"))
    cluster.kubectl("apply", "-f", "-", input=bridge("mx", "team-b"))
    cluster.wait_for(
        lambda: cluster.get("apps/v1/deployments", "team-a", "mx"),
        what="the team-a Deployment",
        details=operator.log,
    )
    used = {call.permission for call in cluster.resource_requests(*OPERATOR_AGENTS)}
    assert ("", "namespaces", "watch") in used
    assert cluster.get("apps/v1/deployments", "team-b", "mx") is None
    assert (
        cluster.get("mailbridge.io/v1alpha1/mailbridges", "team-b", "mx").get(  # type: ignore[union-attr]
            "status"
        )
        is None
    )
