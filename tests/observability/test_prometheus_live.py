"""Every PromQL expression we ship, evaluated by a real Prometheus scraping real metrics.

A real ``prometheus`` (conftest.py) scrapes ``metrics_targets`` every second: two
instances of one job, as in a real Deployment, so a wrong join fails here too.
One is the real ``mailbridge`` process after real SMTP mail to a real webhook
receiver; the other is the bridge's own ``Metrics`` under a scripted load
(``fake_bridge.py``), for what the bridge cannot show yet (spool mode, an open
circuit, dead letters). The chart's rules file is loaded too. Each expression
then goes through ``/api/v1/query``.

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
from typing import TYPE_CHECKING

import pytest
from live_processes import Prometheus, wait_for
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

import mailbridge

if TYPE_CHECKING:  # the type only: at run time "conftest" may name another directory's
    from conftest import BridgeTarget


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


@pytest.mark.parametrize("which", ["real bridge", "scripted instance"])
def test_each_target_exports_every_metric_of_the_bridge(
    prometheus: Prometheus, metrics_targets: list[str], which: str
) -> None:
    """The queries are only proven against data if every metric is there: the
    real bridge must export all of metrics.py, and so must the scripted one."""
    instance = metrics_targets[["real bridge", "scripted instance"].index(which)]
    result = _result(prometheus, f'count by (__name__) ({{instance="{instance}"}})')
    scraped = {series["metric"]["__name__"] for series in result}
    expected = {
        name + "_bucket" if kind == "histogram" else name
        for name, kind, _help, _labels in metric_families()
    }
    assert set() == expected - scraped


def _value(prometheus: Prometheus, expr: str) -> float:
    result = _result(prometheus, expr)
    assert 1 == len(result), f"{expr}: {result}"
    return float(result[0]["value"][1])


def test_real_mail_shows_in_prometheus(prometheus: Prometheus, real_bridge: BridgeTarget) -> None:
    """What the real bridge did with real mail arrives in Prometheus under the
    names, labels and values the dashboard and the alerts read."""
    assert {
        "billing@example.com": 250,
        "support@example.com": 451,
        "nobody@example.com": 550,
    } == real_bridge.replies
    at = f'instance="{real_bridge.address}"'
    assert real_bridge.accepted == _value(
        prometheus, f"mailbridge_smtp_messages_accepted_total{{{at}}}"
    )
    assert 1 <= _value(
        prometheus, f'mailbridge_smtp_messages_rejected_total{{{at}, reason="unknown_recipient"}}'
    )
    assert 1 <= _value(
        prometheus, f'mailbridge_smtp_messages_rejected_total{{{at}, reason="temp_failure"}}'
    )
    assert 4 == _value(prometheus, f"mailbridge_smtp_sessions_total{{{at}}}")
    assert 1 == _value(prometheus, f"mailbridge_smtp_tls_sessions_total{{{at}}}")
    delivered = f'{at}, route="billing", outcome="delivered", status_class="2xx"'
    assert 2 == _value(prometheus, f"mailbridge_webhook_attempts_total{{{delivered}}}")
    failed = f'{at}, route="support", outcome!~"delivered|circuit_open", status_class="5xx"'
    assert 1 <= _value(prometheus, f"sum(mailbridge_webhook_attempts_total{{{failed}}})")
    assert 2 == _value(
        prometheus, f'mailbridge_delivery_latency_seconds_count{{{at}, route="billing"}}'
    )
    # the message to nobody@ never reached DATA: its only recipient was refused
    assert 3 == _value(prometheus, f"mailbridge_smtp_message_size_bytes_count{{{at}}}")
    version = _result(prometheus, f"mailbridge_build_info{{{at}}}")[0]["metric"]["version"]
    assert mailbridge.__version__ == version
