"""The Grafana dashboard's structure: what makes it import cleanly with the
``grafana_dashboard`` sidecar and work against any Prometheus data source.
Its queries run against a real Prometheus in test_prometheus_live.py."""

from __future__ import annotations

import re

import pytest
from observability_assets import (
    DASHBOARD_FILE,
    dashboard,
    exported_series_names,
    panel_queries,
    panels,
    variable_query,
    variables,
)
from promql_text import metric_names

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def test_dashboard_is_provisionable() -> None:
    """Sidecar provisioning wants a stable uid, no numeric id and no import-time inputs."""
    board = dashboard()
    assert board["schemaVersion"] >= 39
    assert "mailbridge" == board["uid"]
    assert board["id"] is None
    assert "__inputs" not in board and "__requires" not in board
    assert "${" not in DASHBOARD_FILE.read_text(encoding="utf-8").replace("${datasource}", "")


def test_datasource_is_a_variable_used_by_every_panel_and_query() -> None:
    datasource = variables()["datasource"]
    assert ("datasource", "prometheus") == (datasource["type"], datasource["query"])
    for panel in panels():
        assert DATASOURCE == panel["datasource"], panel["title"]
        for target in panel["targets"]:
            assert DATASOURCE == target["datasource"], panel["title"]
    for name in ("namespace", "job", "instance", "route"):
        assert DATASOURCE == variables()[name]["datasource"], name


def test_selection_variables() -> None:
    found = {name: variable_query(v) for name, v in variables().items() if v["type"] == "query"}
    assert {
        "namespace": "label_values(mailbridge_build_info, namespace)",
        "job": 'label_values(mailbridge_build_info{namespace=~"$namespace"}, job)',
        "instance": (
            'label_values(mailbridge_build_info{namespace=~"$namespace", job=~"$job"}, instance)'
        ),
        "route": (
            "label_values(mailbridge_webhook_attempts_total"
            '{namespace=~"$namespace", job=~"$job"}, route)'
        ),
    } == found
    for name in found:
        assert variables()[name]["includeAll"] and ".*" == variables()[name]["allValue"]


@pytest.mark.parametrize("query", panel_queries(), ids=lambda q: q.id)
def test_query_honours_the_selection(query) -> None:
    """Every selector filters by namespace, job and instance; route-labelled
    metrics also by route, so the variables narrow every panel."""
    for selector in re.findall(r"mailbridge_\w+\{[^}]*\}|\bup\{[^}]*\}", query.expr):
        for variable in ("namespace", "job", "instance"):
            assert f'{variable}=~"${variable}"' in selector, selector
        if re.match(r"mailbridge_(webhook|delivery|dead)", selector):
            assert 'route=~"$route"' in selector, selector
    assert not re.search(r"mailbridge_\w+(?![\w{])", query.expr), "a selector without labels"


@pytest.mark.parametrize("query", panel_queries(), ids=lambda q: q.id)
def test_query_reads_only_metrics_the_bridge_exports(query) -> None:
    assert set() == metric_names(query.expr) - exported_series_names() - {"up"}


def test_panels_have_unique_ids_titles_descriptions_and_fit_the_grid() -> None:
    board = dashboard()
    ids = [panel["id"] for panel in board["panels"]]
    ids += [inner["id"] for panel in board["panels"] for inner in panel.get("panels", [])]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] != "row":
            assert panel["title"] and panel["description"], panel["id"]


def test_the_dashboard_shows_what_issue_4_asks_for() -> None:
    """Traffic, rejects, latency percentiles, webhook errors, spool, circuits,
    dead letters, TLS share, active sessions, refused connections."""
    exprs = "\n".join(query.expr for query in panel_queries())
    for needle in (
        "mailbridge_smtp_messages_accepted_total",
        "sum by (reason) (rate(mailbridge_smtp_messages_rejected_total",
        "histogram_quantile(0.5, sum by (le) (rate(mailbridge_delivery_latency_seconds_bucket",
        "histogram_quantile(0.95, sum by (le) (rate(mailbridge_delivery_latency_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(mailbridge_delivery_latency_seconds_bucket",
        "sum by (route, status_class) (rate(mailbridge_webhook_attempts_total",
        "mailbridge_webhook_request_duration_seconds_bucket",
        "sum by (state) (mailbridge_spool_messages",
        "mailbridge_spool_oldest_message_age_seconds",
        "mailbridge_webhook_circuit_state",
        "mailbridge_dead_letters_total",
        "mailbridge_smtp_tls_sessions_total",
        "mailbridge_smtp_sessions_active",
        "mailbridge_smtp_connections_refused_total",
    ):
        assert needle in exprs
