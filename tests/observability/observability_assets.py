"""The observability assets under test, loaded once: alert rules, dashboard, docs.

Paths are fixed by the chart's layout; the chart embeds the rules file and the
dashboard unchanged, so these are exactly what users deploy.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES_FILE = ROOT / "charts/mailbridge/rules/mailbridge.rules.yaml"
RULES_TEST_FILE = ROOT / "tests/observability/mailbridge.rules.test.yaml"
DASHBOARD_FILE = ROOT / "charts/mailbridge/dashboards/mailbridge.json"
RUNBOOK_FILE = ROOT / "docs/runbook.md"
OBSERVABILITY_DOC = ROOT / "docs/observability.md"


@dataclass(frozen=True)
class Rule:
    group: str
    name: str  # alert name, or recorded series name
    expr: str
    kind: str  # "alert" or "record"
    raw: dict[str, Any]

    @property
    def id(self) -> str:
        severity = self.raw.get("labels", {}).get("severity", "")
        extra = self.raw.get("labels", {}).get("resource", "")
        return "-".join(part for part in (self.name, extra, severity) if part)


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    ref_id: str
    expr: str

    @property
    def id(self) -> str:
        return f"{self.panel}/{self.ref_id}"


@cache
def rules() -> tuple[Rule, ...]:
    document = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))
    found = []
    for group in document["groups"]:
        for rule in group["rules"]:
            kind = "alert" if "alert" in rule else "record"
            found.append(Rule(group["name"], rule[kind], rule["expr"], kind, rule))
    return tuple(found)


def alert_names() -> list[str]:
    return sorted({rule.name for rule in rules() if rule.kind == "alert"})


@cache
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))


def panels(board: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every panel, with those inside collapsed rows, rows excluded."""
    found = []
    for panel in (board or dashboard())["panels"]:
        if panel.get("type") == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def panel_queries() -> list[PanelQuery]:
    return [
        PanelQuery(panel["title"], target["refId"], target["expr"])
        for panel in panels()
        for target in panel.get("targets", [])
        if not target.get("hide")
    ]


def variables() -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in dashboard()["templating"]["list"]}


def variable_query(variable: dict[str, Any]) -> str:
    query = variable.get("query", "")
    return query["query"] if isinstance(query, dict) else query


LABEL_VALUES = re.compile(r"^label_values\((?:(?P<expr>.+),\s*)?(?P<label>\w+)\)$", re.S)


@cache
def exported_series_names() -> frozenset[str]:
    """Every sample name the bridge's registry exports (``_total``, ``_bucket``, ...)."""
    from prometheus_client import generate_latest

    from mailbridge.observability.metrics import Metrics

    metrics = Metrics()
    metrics.add_routes(["r"])
    text = generate_latest(metrics.registry).decode()
    return frozenset(
        re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group()  # type: ignore[union-attr]
        for line in text.splitlines()
        if line and not line.startswith("#")
    )


@cache
def metric_families() -> tuple[tuple[str, str, str, tuple[str, ...]], ...]:
    """(exported name, type, help, label names) for each metric of the bridge."""
    from mailbridge.observability.metrics import Metrics

    metrics = Metrics()
    metrics.add_routes(["r"])
    found = []
    for family in metrics.registry.collect():
        suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
        labels: set[str] = set()
        for sample in family.samples:
            labels.update(sample.labels)
        labels.discard("le")
        found.append(
            (family.name + suffix, family.type, family.documentation, tuple(sorted(labels)))
        )
    return tuple(found)
