"""The chart's generated parts, made from their single sources of truth.

- ``templates/_rbac-rules.tpl``: the operator's API permissions
  (:data:`mailbridge_operator.rbac.RULES`) as three named templates: every rule
  (the ClusterRole when the operator watches all namespaces), the namespaced
  rules (a Role per watched namespace) and the cluster-scoped ones (the
  ClusterRole otherwise).
- the values table in ``README.md`` (key, default, the comment above the key
  in ``values.yaml``).
- ``values.schema.json``'s ``$defs``: ``mailBridgeSpec`` (the CRD's spec
  schema as JSON Schema, so ``bridges[].spec`` is checked like the API server
  checks it, minus CEL rules) and the ``io.k8s.*`` definitions the schema
  refers to (from kubernetes-validate's strict schemas, so ``resources``,
  ``securityContext``, ``affinity``... reject unknown keys too). The rest of
  the schema is written by hand.

Run ``.venv/bin/python tests/charts/chart_sources.py`` after a change to a
source; ``test_chart_static.py`` fails while a generated part is stale. Pure
functions apart from :func:`main`.
"""

from __future__ import annotations

import copy
import json
import pathlib
import re
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import kubernetes_validate
import yaml

from mailbridge_operator import rbac

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "mailbridge"
CRD_PATH = CHART / "crds" / "mailbridges.mailbridge.io.yaml"
RBAC_TEMPLATE = CHART / "templates" / "_rbac-rules.tpl"
VALUES_SCHEMA = CHART / "values.schema.json"
VALUES = CHART / "values.yaml"
README = CHART / "README.md"
# The Kubernetes version whose definitions the values schema embeds.
KUBERNETES_VERSION = "1.35.0"
K8S_PREFIX = "io.k8s."
SPEC_DEF = "mailBridgeSpec"

sys.path.insert(0, str(ROOT / "tests" / "operator"))
from crdschema import to_json_schema  # noqa: E402  (tests/operator is not a package)


def group_rules(rules: Iterable[rbac.Rule]) -> list[dict[str, Any]]:
    """Rules grouped as :func:`rbac.policy_rules` groups them (by API group and verbs)."""
    grouped: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for rule in rules:
        grouped.setdefault((rule.api_group, tuple(sorted(rule.verbs))), []).append(rule.resource)
    return [
        {"apiGroups": [group], "resources": sorted(resources), "verbs": list(verbs)}
        for (group, verbs), resources in grouped.items()
    ]


def rbac_template() -> str:
    """The text of ``templates/_rbac-rules.tpl``."""
    blocks = {
        "mailbridge.rbac.allRules": rbac.policy_rules(),
        "mailbridge.rbac.namespacedRules": group_rules(
            r for r in rbac.RULES if not r.cluster_scoped
        ),
        "mailbridge.rbac.clusterScopedRules": group_rules(
            r for r in rbac.RULES if r.cluster_scoped
        ),
    }
    lines = [
        "{{/*",
        "GENERATED from mailbridge_operator.rbac.RULES by tests/charts/chart_sources.py:",
        "do not edit. The operator's API permissions, grouped like rbac.policy_rules().",
        "*/}}",
    ]
    for name, rules in blocks.items():
        body = yaml.safe_dump(rules, default_flow_style=None, sort_keys=False, width=100)
        lines += ["", f'{{{{- define "{name}" -}}}}', body.rstrip("\n"), "{{- end }}"]
    return "\n".join(lines) + "\n"


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _kubernetes_definitions() -> dict[str, Any]:
    directory = (
        pathlib.Path(kubernetes_validate.__file__).parent
        / "kubernetes-json-schema"
        / f"v{KUBERNETES_VERSION}-local-strict"
    )
    document = json.loads((directory / "_definitions.json").read_text(encoding="utf-8"))
    return document["$defs"]  # type: ignore[no-any-return]


# Fields the CRD leaves open (x-kubernetes-preserve-unknown-fields: the API server
# checks them when it creates the pods) that are Kubernetes types: in values they
# are checked as those types, so a typo fails `helm install` already.
KUBERNETES_TYPED_FIELDS = {
    ("env", "items"): "io.k8s.api.core.v1.EnvVar",
    ("scheduling", "tolerations", "items"): "io.k8s.api.core.v1.Toleration",
    ("scheduling", "affinity"): "io.k8s.api.core.v1.Affinity",
    (
        "scheduling",
        "topologySpreadConstraints",
        "items",
    ): "io.k8s.api.core.v1.TopologySpreadConstraint",
}


def spec_schema(crd: dict[str, Any]) -> dict[str, Any]:
    """The CRD's spec schema as JSON Schema, with its open Kubernetes-typed fields typed."""
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    open_fields: list[tuple[str, ...]] = []

    def visit(node: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
        if node.get("x-kubernetes-preserve-unknown-fields"):
            if path not in KUBERNETES_TYPED_FIELDS:
                open_fields.append(path)
                return node
            return {
                "description": node.get("description", ""),
                "$ref": f"#/$defs/{KUBERNETES_TYPED_FIELDS[path]}",
            }
        result = dict(node)
        if "properties" in node:
            result["properties"] = {
                key: visit(sub, (*path, key)) for key, sub in node["properties"].items()
            }
        if "items" in node:
            result["items"] = visit(node["items"], (*path, "items"))
        return result

    converted = to_json_schema(visit(spec, ()))
    if open_fields:
        raise ValueError(
            f"the CRD leaves {open_fields} open: add them to "
            "KUBERNETES_TYPED_FIELDS in tests/charts/chart_sources.py"
        )
    return converted


def values_schema(current: dict[str, Any]) -> dict[str, Any]:
    """``current`` (the hand-written schema) with its generated ``$defs`` made afresh."""
    schema = copy.deepcopy(current)
    hand_written = {
        name: node
        for name, node in schema.get("$defs", {}).items()
        if not name.startswith(K8S_PREFIX) and name != SPEC_DEF
    }
    crd = yaml.safe_load(CRD_PATH.read_text(encoding="utf-8"))
    defs: dict[str, Any] = hand_written | {SPEC_DEF: spec_schema(crd)}
    available = _kubernetes_definitions()
    pending = [ref for ref in _refs({k: v for k, v in schema.items() if k != "$defs"})]
    pending += [ref for ref in _refs(defs)]
    while pending:
        ref = pending.pop()
        name = ref.removeprefix("#/$defs/")
        if name in defs or not name.startswith(K8S_PREFIX):
            continue
        defs[name] = available[name]
        pending.extend(_refs(available[name]))
    schema["$defs"] = dict(sorted(defs.items()))
    return schema


def _values_keys(node: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Documented keys: the schema's leaves (and open maps/lists), in the schema's order."""
    for name, sub in (node.get("properties") or {}).items():
        if name == "global":
            continue
        if sub.get("type") == "object" and "properties" in sub:
            yield from _values_keys(sub, (*path, name))
        else:
            yield (*path, name)


def _comment_above(lines: list[str], number: int) -> str:
    comment: list[str] = []
    for line in reversed(lines[:number]):
        stripped = line.strip()
        if not stripped.startswith("#"):
            break
        comment.insert(0, stripped.lstrip("#").strip().removeprefix("--").strip())
    return " ".join(part for part in comment if part)


def values_table() -> str:
    """The Markdown table of every values key (key, default, description) for the README."""
    text = VALUES.read_text(encoding="utf-8")
    lines = text.splitlines()
    values = yaml.safe_load(text)
    schema = json.loads(VALUES_SCHEMA.read_text(encoding="utf-8"))
    positions: dict[tuple[str, ...], int] = {}
    stack: list[tuple[int, str]] = []
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z_][\w.-]*):(\s|$)", line)
        if not match:
            continue
        while stack and stack[-1][0] >= len(match.group(1)):
            stack.pop()
        stack.append((len(match.group(1)), match.group(2)))
        positions[tuple(name for _, name in stack)] = number
    rows = ["| Key | Default | Description |", "| --- | --- | --- |"]
    for key in _values_keys(schema):
        default: Any = values
        for part in key:
            default = default[part]
        shown = json.dumps(default, separators=(", ", ": "))
        description = _comment_above(lines, positions[key]).split(" Example:")[0]
        description = description.replace("|", "\\|")
        rows.append(f"| `{'.'.join(key)}` | `{shown}` | {description} |")
    return "\n".join(rows) + "\n"


def readme_with_table(readme: str) -> str:
    start, end = "<!-- values-table: generated by tests/charts/chart_sources.py -->", "<!-- end -->"
    before, _, rest = readme.partition(start)
    _, _, after = rest.partition(end)
    return f"{before}{start}\n{values_table()}{end}{after}"


def schema_text(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    RBAC_TEMPLATE.write_text(rbac_template(), encoding="utf-8")
    README.write_text(readme_with_table(README.read_text(encoding="utf-8")), encoding="utf-8")
    current = json.loads(VALUES_SCHEMA.read_text(encoding="utf-8"))
    VALUES_SCHEMA.write_text(schema_text(values_schema(current)), encoding="utf-8")
    print(
        f"wrote {RBAC_TEMPLATE.relative_to(ROOT)}, {VALUES_SCHEMA.relative_to(ROOT)} and "
        f"the values table in {README.relative_to(ROOT)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
