"""Every Kubernetes API permission the operator uses, in one place.

The Helm chart is to render its ClusterRole from :data:`RULES` (see
:func:`policy_rules`). Every test that runs the operator records each request
it makes against the emulated API and fails when one is not allowed here
(``tests/operator/conftest.py``), and ``tests/operator/test_rbac.py`` fails
when a rule is never needed by the code. Discovery (``/api``, ``/apis``) needs no rule: every
authenticated user may read it.

Why each rule exists:

- mailbridges: kopf lists and watches them and patches its bookkeeping
  annotations (and removes the finalizer that versions with a per-object timer
  added); the operator reads the latest one before each reconciliation.
  mailbridges/status: the operator writes the status.
- configmaps, services, deployments, statefulsets, poddisruptionbudgets,
  servicemonitors: the children. ``get`` to compare with the desired state,
  ``create`` + ``patch`` for server-side apply, ``list`` + ``watch`` so kopf
  sees drift (a child edited or deleted), ``delete`` for children that are no
  longer wanted (the Deployment after persistence is turned on, a disabled
  ServiceMonitor or PodDisruptionBudget). ConfigMaps and Services are never
  deleted by the operator (owner references collect them). ServiceMonitors are
  not watched (their CRD may be absent): the periodic resync corrects them.
- secrets: ``get`` the resourceVersions that go into the config hash; ``list`` +
  ``watch`` to roll the pods when a referenced Secret changes. Never written.
- events: the operator reports what it did (Created, Updated, InvalidSpec...).
- customresourcedefinitions: kopf watches them to notice the MailBridge and
  ServiceMonitor APIs appearing or going away.
- namespaces: kopf lists and watches them when it serves a set of namespaces.

Pure data.
"""

from __future__ import annotations

import dataclasses
from typing import Any

CHILD_VERBS = ("get", "list", "watch", "create", "patch")  # watched children, applied


@dataclasses.dataclass(frozen=True)
class Rule:
    api_group: str
    resource: str
    verbs: tuple[str, ...]
    cluster_scoped: bool = False


RULES: tuple[Rule, ...] = (
    Rule("mailbridge.io", "mailbridges", ("get", "list", "watch", "patch")),
    Rule("mailbridge.io", "mailbridges/status", ("patch",)),
    Rule("", "configmaps", CHILD_VERBS),
    Rule("", "services", CHILD_VERBS),
    Rule("apps", "deployments", (*CHILD_VERBS, "delete")),
    Rule("apps", "statefulsets", (*CHILD_VERBS, "delete")),
    Rule("policy", "poddisruptionbudgets", (*CHILD_VERBS, "delete")),
    Rule("monitoring.coreos.com", "servicemonitors", ("get", "create", "patch", "delete")),
    Rule("", "secrets", ("get", "list", "watch")),
    Rule("", "events", ("create",)),
    Rule(
        "apiextensions.k8s.io", "customresourcedefinitions", ("list", "watch"), cluster_scoped=True
    ),
    Rule("", "namespaces", ("list", "watch"), cluster_scoped=True),
)


def allows(api_group: str, resource: str, verb: str) -> bool:
    """Whether :data:`RULES` grant ``verb`` on ``api_group``/``resource``."""
    return any(
        rule.api_group == api_group and rule.resource == resource and verb in rule.verbs
        for rule in RULES
    )


def policy_rules() -> list[dict[str, Any]]:
    """The rules as a ClusterRole's ``rules`` (grouped by API group and verbs)."""
    grouped: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for rule in RULES:
        grouped.setdefault((rule.api_group, tuple(sorted(rule.verbs))), []).append(rule.resource)
    return [
        {"apiGroups": [group], "resources": sorted(resources), "verbs": list(verbs)}
        for (group, verbs), resources in grouped.items()
    ]
