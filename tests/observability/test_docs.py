"""docs/observability.md lists every metric and every alert, so the page
cannot fall behind metrics.py or the rules file."""

from __future__ import annotations

import re

import pytest
from observability_assets import OBSERVABILITY_DOC, alert_names, metric_families, rules


def _table_rows(first_column: str) -> dict[str, list[str]]:
    """Rows of the Markdown table whose first column header is ``first_column``."""
    rows: dict[str, list[str]] = {}
    in_table = False
    for line in OBSERVABILITY_DOC.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_column:
            in_table = True
        elif in_table and line.startswith("|"):
            if not set(cells[0]) <= set("- "):
                rows[cells[0].strip("`")] = cells
        else:
            in_table = False
    return rows


@pytest.mark.parametrize(
    ("name", "kind", "labels"),
    [(name, kind, labels) for name, kind, _help, labels in metric_families()],
    ids=lambda value: value if isinstance(value, str) and value.startswith("mailbridge") else "",
)
def test_every_metric_is_documented_with_its_type_and_labels(
    name: str, kind: str, labels: tuple[str, ...]
) -> None:
    row = _table_rows("Metric").get(name)
    assert row is not None, f"{name} is missing from docs/observability.md"
    assert row[1].startswith(kind)
    assert sorted(labels) == sorted(re.findall(r"`(\w+)`", row[2]))


def test_no_documented_metric_is_gone() -> None:
    exported = {name for name, _kind, _help, _labels in metric_families()}
    assert set() == set(_table_rows("Metric")) - exported


def test_every_alert_is_in_the_table_with_its_severities() -> None:
    table = _table_rows("Alert")
    assert alert_names() == sorted(table)
    for name in alert_names():
        severities = {r.raw["labels"]["severity"] for r in rules() if r.name == name}
        assert severities == set(table[name][1].replace(" ", "").split("/")), name
        assert f"(runbook.md#{name.lower()})" in table[name][4]
