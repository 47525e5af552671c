"""Every PromQL expression we ship, evaluated by a real Prometheus scraping real metrics.

A real ``prometheus`` (conftest.py) scrapes ``metrics_targets`` every second: two
instances of one job, each the bridge's own metrics registry under load, so a
wrong join fails as it would in a real Deployment. The chart's rules file is
loaded too. Each expression then goes through ``/api/v1/query``.

How "returns data" is checked, and why:

* **Dashboard queries** must return a non-empty result with at least one
  finite value, exactly as written (Grafana's ``$variables`` replaced by ``.*``
  and ``$__rate_interval`` by ``1m``). A panel that is empty against a busy
  bridge has a typo'd metric, label or join.
* **Alert expressions** are conditions: when the bridge is healthy most are
  empty on purpose (``... > 0.1``), so emptiness proves nothing. Each is
  checked three ways:

  1. as written, it must be *valid*: ``status: success`` (parse errors, type
     errors, bad vector matching show up here);
  2. each of its vector selectors, queried alone, must return series: a
     typo'd metric name, label name or label value is empty here;
  3. with its comparisons against numbers stripped and ``absent(x)`` read as
     ``x`` (:func:`promql_text.strip_conditions`), it must return series:
     this catches joins (``on``, ``group_left``, ``and``) that never match,
     which 2 cannot see.

  The condition's threshold itself is the job of ``promtool test rules``.
* **Loaded rules**: Prometheus loads the rules file itself, and after it has
  evaluated them every rule reports ``health: ok``.
* **Variables**: each ``label_values(expr, label)`` query of the dashboard
  yields at least one value of ``label``.
"""

from __future__ import annotations

import math

import pytest
from live_processes import TARGET_JOB, Prometheus, wait_for
from observability_assets import (
    LABEL_VALUES,
    PanelQuery,
    Rule,
    metric_families,
    panel_queries,
    rules,
    variable_query,
    variables,
)
from promql_text import selectors, strip_conditions, substitute_grafana_variables


def _result(prometheus: Prometheus, expr: str) -> list[dict]:
    answer = prometheus.query(expr)
    assert "success" == answer["status"], f"{answer.get('error')}\n{expr}"
    return answer["data"]["result"]


def _finite(result: list[dict]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


@pytest.mark.parametrize("query", panel_queries(), ids=lambda q: q.id)
def test_dashboard_query_returns_data(prometheus: Prometheus, query: PanelQuery) -> None:
    expr = substitute_grafana_variables(query.expr)
    result = _result(prometheus, expr)
    assert result, f"no data for panel {query.panel!r}:\n{expr}"
    assert _finite(result), f"only NaN/Inf for panel {query.panel!r}: {result}\n{expr}"


@pytest.mark.parametrize("rule", rules(), ids=lambda r: r.id)
def test_rule_expression_is_valid_and_reads_real_series(prometheus: Prometheus, rule: Rule) -> None:
    _result(prometheus, rule.expr)  # 1. valid as written
    for selector in selectors(rule.expr):  # 2. each selector finds series
        assert _result(prometheus, selector), f"selector {selector} matches nothing"
    healthy = strip_conditions(rule.expr)  # 3. the joins match
    assert _result(prometheus, healthy), f"no data without its conditions:\n{healthy}"


def test_prometheus_loads_and_evaluates_every_rule(prometheus: Prometheus) -> None:
    def evaluated() -> list[dict] | None:
        groups = prometheus.api("rules")["data"]["groups"]
        loaded = [rule for group in groups for rule in group["rules"]]
        done = all(not rule["lastEvaluation"].startswith("0001") for rule in loaded)
        return loaded if loaded and done else None

    loaded = wait_for("one evaluation of every rule", evaluated, timeout=10)
    assert len(rules()) == len(loaded)
    assert [] == [
        (rule["name"], rule.get("lastError")) for rule in loaded if rule["health"] != "ok"
    ]


@pytest.mark.parametrize("name", ["namespace", "job", "instance", "route"])
def test_dashboard_variable_has_values(prometheus: Prometheus, name: str) -> None:
    match = LABEL_VALUES.match(variable_query(variables()[name]))
    assert match, variable_query(variables()[name])
    expr = substitute_grafana_variables(match["expr"])
    values = {series["metric"].get(match["label"]) for series in _result(prometheus, expr)}
    assert values - {None}, f"{name}: no values of {match['label']} in {expr}"


def test_route_variable_lists_the_configured_routes(prometheus: Prometheus) -> None:
    result = _result(prometheus, "group by (route) (mailbridge_webhook_attempts_total)")
    assert {"billing", "support"} == {series["metric"]["route"] for series in result}


def test_target_exports_every_metric_of_the_bridge(prometheus: Prometheus) -> None:
    """The target is worth testing against only if it exports every metric: this
    also holds the real bridge to exporting all of metrics.py once it is the target."""
    result = _result(prometheus, f'count by (__name__) ({{job="{TARGET_JOB}"}})')
    scraped = {series["metric"]["__name__"] for series in result}
    expected = {
        name + "_bucket" if kind == "histogram" else name
        for name, kind, _help, _labels in metric_families()
    }
    assert set() == expected - scraped
