"""The alert rules: valid for promtool, unit-tested case by case, and complete.

The real ``promtool`` runs here; a missing binary fails (``scripts/setup``
installs it), it never skips. The live check of every expression against a
real Prometheus is in test_prometheus_live.py.
"""

from __future__ import annotations

import re
import subprocess
from collections import defaultdict

import pytest
import yaml
from observability_assets import (
    RULES_FILE,
    RULES_TEST_FILE,
    RUNBOOK_FILE,
    Rule,
    alert_names,
    exported_series_names,
    rules,
)
from promql_text import metric_names

RUNBOOK_URL = "https://github.com/mailbridge/mailbridge/blob/main/docs/runbook.md#"
SEVERITIES = {"critical", "warning", "info"}


def _promtool(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=30, check=False
    )


def test_promtool_check_rules_accepts_the_rules_file(promtool: str) -> None:
    result = _promtool(promtool, "check", "rules", str(RULES_FILE))
    assert 0 == result.returncode, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_promtool_unit_tests_pass(promtool: str) -> None:
    result = _promtool(promtool, "test", "rules", str(RULES_TEST_FILE))
    assert 0 == result.returncode, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    """A rule tested only where it fires could fire always; one tested only
    where it is silent could never fire."""
    document = yaml.safe_load(RULES_TEST_FILE.read_text(encoding="utf-8"))
    cases: dict[str, set[str]] = defaultdict(set)
    severities_fired: dict[str, set[str]] = defaultdict(set)
    for test in document["tests"]:
        for case in test.get("alert_rule_test", []):
            expected = case.get("exp_alerts") or []
            cases[case["alertname"]].add("fires" if expected else "silent")
            for alert in expected:
                severities_fired[case["alertname"]].add(alert["exp_labels"]["severity"])
    missing = {
        name: {"fires", "silent"} - cases[name]
        for name in alert_names()
        if {"fires", "silent"} - cases[name]
    }
    assert {} == missing
    # Each severity level of an alert (warning and critical rules) fires in some case.
    declared: dict[str, set[str]] = defaultdict(set)
    for rule in rules():
        if rule.kind == "alert":
            declared[rule.name].add(rule.raw["labels"]["severity"])
    assert dict(declared) == {name: severities_fired[name] for name in declared}


@pytest.mark.parametrize("rule", [r for r in rules() if r.kind == "alert"], ids=lambda r: r.id)
def test_alert_has_severity_summary_description_and_runbook(rule: Rule) -> None:
    assert rule.raw["labels"]["severity"] in SEVERITIES
    annotations = rule.raw["annotations"]
    assert {"summary", "description", "runbook_url"} <= set(annotations)
    assert annotations["summary"].strip() and annotations["description"].strip()
    assert RUNBOOK_URL + rule.name.lower() == annotations["runbook_url"]


def test_runbook_has_a_section_per_alert() -> None:
    """GitHub makes the anchor of ``## MailbridgeDown`` ``#mailbridgedown``."""
    headings = re.findall(r"^## (\S+)\s*$", RUNBOOK_FILE.read_text(encoding="utf-8"), re.M)
    anchors = {heading.lower() for heading in headings}
    assert [] == [name for name in alert_names() if name.lower() not in anchors]


@pytest.mark.parametrize("rule", rules(), ids=lambda r: r.id)
def test_rule_reads_only_metrics_the_bridge_exports(rule: Rule) -> None:
    """A static guard; test_prometheus_live.py checks the same against real data."""
    unknown = metric_names(rule.expr) - exported_series_names() - {"up"}
    assert set() == unknown
