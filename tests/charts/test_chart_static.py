"""The chart as files: lint, generated parts up to date, documented and strictly typed values.

What this protects: ``helm lint --strict`` passes; the RBAC template and the
schema's generated definitions match their sources (the operator's declared
permissions, the CRD); every key of ``values.yaml`` is commented, typed in
``values.schema.json`` with unknown keys refused; a typo in values fails the
install; the chart's version facts agree with the package's; one kind per
template file and the conventional helper names.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import tarfile
import tomllib
from collections.abc import Iterator
from typing import Any

import chart_sources
import jsonschema
import pytest
import yaml
from chart_tools import CHART, MONITORING_APIS, SCENARIOS, VALUES_DIR, Helm

from mailbridge_operator import model, rbac

VALUES = CHART / "values.yaml"
SCHEMA = CHART / "values.schema.json"
ROOT = CHART.parents[1]


def load_schema() -> dict[str, Any]:
    return json.loads(SCHEMA.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_lint_strict_passes(helm: Helm, scenario: str) -> None:
    files = [] if scenario == "defaults" else ["-f", str(VALUES_DIR / f"{scenario}.yaml")]
    result = helm.run("lint", "--strict", str(CHART), *files)
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout, result.stdout


def test_the_rbac_template_is_generated_from_the_operators_declared_rules() -> None:
    expected = chart_sources.rbac_template()
    assert expected == chart_sources.RBAC_TEMPLATE.read_text(encoding="utf-8"), (
        "templates/_rbac-rules.tpl is stale: run .venv/bin/python tests/charts/chart_sources.py"
    )


def test_the_schemas_generated_definitions_match_the_crd_and_kubernetes() -> None:
    current = load_schema()
    assert chart_sources.schema_text(chart_sources.values_schema(current)) == SCHEMA.read_text(
        encoding="utf-8"
    ), "values.schema.json is stale: run tests/charts/chart_sources.py"


def test_the_readmes_values_table_is_generated_from_values_yaml() -> None:
    readme = chart_sources.README.read_text(encoding="utf-8")
    assert chart_sources.readme_with_table(readme) == readme, (
        "charts/mailbridge/README.md's values table is stale: run tests/charts/chart_sources.py"
    )


def test_values_yaml_is_valid_for_the_schema() -> None:
    values = yaml.safe_load(VALUES.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(load_schema()).validate(values)
    for scenario in SCENARIOS[1:]:
        overrides = yaml.safe_load((VALUES_DIR / f"{scenario}.yaml").read_text())
        jsonschema.Draft202012Validator(load_schema()).validate(_merge(values, overrides))


def _merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        return {k: _merge(base.get(k), v) if k in base else v for k, v in override.items()} | {
            k: v for k, v in base.items() if k not in override
        }
    return override


def _chart_keys(node: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """The chart's own keys: properties of the hand-written schema (not Kubernetes types)."""
    for name, sub in (node.get("properties") or {}).items():
        if name == "global":
            continue
        yield (*path, name)
        if sub.get("type") == "object" and "properties" in sub:
            yield from _chart_keys(sub, (*path, name))


def _values_lines() -> dict[tuple[str, ...], int]:
    """Path of every mapping key in values.yaml → its line number."""
    lines = VALUES.read_text(encoding="utf-8").splitlines()
    stack: list[tuple[int, str]] = []
    found: dict[tuple[str, ...], int] = {}
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z_][\w.-]*):(\s|$)", line)
        if not match:
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group(2)))
        found[tuple(name for _, name in stack)] = number
    return found


def test_every_values_key_has_a_comment_and_a_schema_entry() -> None:
    lines = VALUES.read_text(encoding="utf-8").splitlines()
    positions = _values_lines()
    keys = list(_chart_keys(load_schema()))
    undocumented = []
    for key in keys:
        assert key in positions, f"values.yaml lacks {'.'.join(key)} (in the schema)"
        above = lines[positions[key] - 1].strip()
        if not above.startswith("#"):
            undocumented.append(".".join(key))
    assert [] == undocumented, "values keys without a comment right above them"
    top_level = {key[0] for key in positions if len(key) == 1}
    assert top_level == {key[0] for key in keys}, "values.yaml and the schema differ"


def test_every_object_in_the_schema_refuses_unknown_keys() -> None:
    loose = []

    def visit(node: Any, path: str) -> None:
        if isinstance(node, dict):
            is_object = node.get("type") in ("object", ["object", "null"]) or "properties" in node
            # `global` is Helm's own; if/then only add constraints to an object checked above.
            exempt = path == "/properties/global" or path.endswith(("/if", "/then"))
            if is_object and "additionalProperties" not in node and not exempt:
                loose.append(path)
            for key, value in node.items():
                visit(value, f"{path}/{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                visit(value, f"{path}/{index}")

    visit(load_schema(), "")
    assert [] == loose


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("operator.watchNamespace={a}", "additional properties 'watchNamespace' not allowed"),
        ("operator.resources.requets.cpu=1", "additional properties 'requets' not allowed"),
        ("operator.securityContext.runAsUsr=1", "additional properties 'runAsUsr' not allowed"),
        ("operator.logFormat=xml", "/operator/logFormat"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("serviceAccount.create=false", "/serviceAccount/name"),
        ("prometheusRule.labels.release=null", "/prometheusRule/labels/release"),
        (
            "bridges[0].name=x,bridges[0].spec.routez=1",
            "additional properties 'routez' not allowed",
        ),
        ("bridges[0].name=Bad_Name,bridges[0].spec.routes=[]", "/bridges/0/name"),
        (
            "operator.extraEnv[0].name=MAILBRIDGE_OPERATOR_BRIDGE_IMAGE,operator.extraEnv[0].value=x",
            "/operator/extraEnv/0",
        ),
    ],
)
def test_a_typo_in_values_fails_the_install(helm: Helm, setting: str, message: str) -> None:
    result = helm.run("template", "mb", str(CHART), "--set", setting, check=False)
    assert 0 != result.returncode
    assert message in result.stderr


SPEC = {
    "routes": [
        {
            "name": "a",
            "recipients": ["a@example.com"],
            "webhook": {"url": "https://hooks.example.com/"},
        }
    ]
}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"operator": {"watchNamespaces": ["team-a"]}, "bridges": [{"name": "x", "spec": SPEC}]},
            "MailBridge x is in namespace mail, which the operator does not watch",
        ),
        (
            {
                "bridges": [
                    {"name": "x", "spec": SPEC},
                    {"name": "x", "namespace": "mail", "spec": SPEC},
                ]
            },
            "MailBridge mail/x is listed twice",
        ),
    ],
)
def test_impossible_bridges_fail_the_install(
    helm: Helm, tmp_path: pathlib.Path, values: dict[str, Any], message: str
) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    result = helm.run("template", "mb", str(CHART), "-n", "mail", "-f", str(path), check=False)
    assert 0 != result.returncode
    assert message in result.stderr


def test_chart_metadata_matches_the_package_and_the_operators_image() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    values = yaml.safe_load(VALUES.read_text(encoding="utf-8"))
    assert ("v2", "application") == (chart["apiVersion"], chart["type"])
    assert project["version"] == chart["appVersion"]
    # The operator's bridges and the chart's operator come from one repository.
    repository, _, tag = model.DEFAULT_IMAGE.rpartition(":")
    assert (repository, tag) == (values["image"]["repository"], chart["appVersion"])


def test_one_kind_per_template_file(rendered: dict[str, list[dict[str, Any]]], helm: Helm) -> None:
    kinds: dict[str, set[str]] = {}
    for scenario in SCENARIOS:
        files = [] if scenario == "defaults" else ["-f", str(VALUES_DIR / f"{scenario}.yaml")]
        text = helm.run(
            "template",
            "mb",
            str(CHART),
            "-n",
            "mail",
            *files,
            *[arg for api in MONITORING_APIS for arg in ("--api-versions", api)],
        ).stdout
        for document in text.split("\n---\n"):
            source = re.search(r"^# Source: mailbridge/(\S+)$", document, re.M)
            kind = re.search(r"^kind: (\S+)$", document, re.M)
            if source and kind:
                kinds.setdefault(source.group(1), set()).add(kind.group(1))
    templates = {str(p.relative_to(CHART)) for p in (CHART / "templates").rglob("*.yaml")}
    assert templates == set(kinds), "a template never renders in any scenario"
    assert {} == {name: found for name, found in kinds.items() if len(found) != 1}


def test_helpers_define_the_conventional_names() -> None:
    helpers = (CHART / "templates" / "_helpers.tpl").read_text(encoding="utf-8")
    defined = set(re.findall(r'define "([\w.]+)"', helpers))
    assert {
        "mailbridge.name",
        "mailbridge.fullname",
        "mailbridge.chart",
        "mailbridge.labels",
        "mailbridge.selectorLabels",
        "mailbridge.serviceAccountName",
    } <= defined


def test_the_docs_rbac_table_is_what_the_operator_declares() -> None:
    text = (ROOT / "docs" / "kubernetes.md").read_text(encoding="utf-8")
    table = text[text.index("| apiGroup | resources | verbs |") :].split("\n\n")[0]
    documented = set()
    for row in table.splitlines()[2:]:
        group, resources, verbs = (cell.strip() for cell in row.strip("|").split("|"))
        for resource in resources.split(", "):
            for verb in verbs.split(", "):
                documented.add((group.strip('"'), resource, verb))
    declared = {(r.api_group, r.resource, verb) for r in rbac.RULES for verb in r.verbs}
    assert declared == documented


def test_the_packaged_chart_holds_the_crd_rules_and_dashboards(
    helm: Helm, tmp_path: pathlib.Path
) -> None:
    digests = []
    for attempt in ("a", "b"):
        helm.run("package", str(CHART), "--destination", str(tmp_path / attempt))
        (archive,) = (tmp_path / attempt).glob("mailbridge-*.tgz")
        digests.append(hashlib.sha256(archive.read_bytes()).hexdigest())
    with tarfile.open(archive) as tar:
        names = {name.removeprefix("mailbridge/") for name in tar.getnames()}
    expected = {
        "Chart.yaml",
        "values.yaml",
        "values.schema.json",
        "README.md",
        "crds/mailbridges.mailbridge.io.yaml",
        "rules/mailbridge.rules.yaml",
        "templates/NOTES.txt",
        "templates/_helpers.tpl",
        "templates/tests/test-operator.yaml",
    } | {f"dashboards/{p.name}" for p in (CHART / "dashboards").glob("*.json")}
    assert expected <= names
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".orig", "~"))]
    assert digests[0] == digests[1], "helm package is not reproducible"
