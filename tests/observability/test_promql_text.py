"""The PromQL text helpers the observability tests rely on: a wrong helper would
let a typo'd selector slip through, so the helpers are tested too."""

from __future__ import annotations

import pytest
from promql_text import metric_names, selectors, strip_conditions, substitute_grafana_variables


def test_selectors_skip_functions_aggregations_and_label_lists() -> None:
    expr = """
      sum by (namespace, job, route) (rate(mailbridge_webhook_attempts_total{outcome!~"a|b"}[5m]))
      / on (namespace, job) group_left ()
      sum without (state) (mailbridge_spool_messages offset 5m) > 0.8
      and absent(up{job=~".*mailbridge.*", job!~".*operator.*"})
    """
    expected = [
        'mailbridge_webhook_attempts_total{outcome!~"a|b"}',
        "mailbridge_spool_messages",
        'up{job=~".*mailbridge.*", job!~".*operator.*"}',
    ]
    assert expected == selectors(expr)


def test_selectors_keep_braces_inside_strings() -> None:
    assert ['x{a="}{", b=~"[a-z]{2}"}'] == selectors('rate(x{a="}{", b=~"[a-z]{2}"}[1m])')


def test_selectors_include_nameless_selectors() -> None:
    assert ['{__name__="mailbridge_build_info"}'] == selectors(
        'count({__name__="mailbridge_build_info"})'
    )
    assert {"mailbridge_build_info"} == metric_names('count({__name__="mailbridge_build_info"})')


@pytest.mark.parametrize(
    ("condition", "healthy_form"),
    [
        ("sum by (job) (up) == 0", "sum by ( job ) ( up )"),
        ("a / (b > 0) > 0.8", "a / ( b )"),
        ("x > 0.5 and y >= 10", "x and y"),
        ('absent(up{job=~".*m.*"})', '( up{job=~".*m.*"} )'),
        ("x > bool -1", "x"),
        ("x == 0 unless on (job) (sum by (job) (x) == 0)", "x"),
        ("x > y", "x > y"),  # a comparison of two vectors is part of the query
        ('x{le="0.5"}', 'x{le="0.5"}'),
    ],
)
def test_strip_conditions_removes_number_comparisons(condition: str, healthy_form: str) -> None:
    assert healthy_form == strip_conditions(condition)


def test_grafana_variables_are_substituted() -> None:
    expr = 'rate(x{job=~"$job", route=~"${route}", i=~"${instance:regex}"}[$__rate_interval])'
    assert 'rate(x{job=~".*", route=~"b", i=~".*"}[1m])' == substitute_grafana_variables(
        expr, {"route": "b"}
    )


def test_tokeniser_rejects_junk() -> None:
    with pytest.raises(ValueError, match="cannot tokenise"):
        selectors("rate(x[5m]) ?? 3")
