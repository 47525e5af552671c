"""Just enough PromQL text handling for the observability tests: no evaluation.

- :func:`selectors` lists the vector selectors of an expression
  (``mailbridge_x_total{route="a"}``), so each can be queried alone;
- :func:`strip_conditions` removes the comparisons with a number
  (``> 0.8``, ``== 0``) and unwraps ``absent(...)``, which turns an alert
  condition into the expression that shows data when everything is healthy;
- :func:`metric_names` lists the metric names an expression reads;
- :func:`substitute_grafana_variables` replaces Grafana's ``$var`` placeholders.

It tokenises strings, label matchers and ranges properly, which is all the
grammar this needs; Prometheus itself stays the judge of what is valid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Aggregation operators and keywords: identifiers that are never metric names.
KEYWORDS = frozenset(
    (
        *("sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values"),
        *("bottomk", "topk", "quantile", "and", "or", "unless", "by", "without", "on"),
        *("ignoring", "group_left", "group_right", "offset", "bool", "atan2", "inf", "nan"),
    )
)
#: Keywords followed by a parenthesised list of label names, not expressions.
LABEL_LIST_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})

_TOKEN = re.compile(
    r"""
      (?P<space>\s+)
    | (?P<comment>\#[^\n]*)
    | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<matchers>\{(?:[^}"'`]|"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)*\})
    | (?P<range>\[[^\]]*\])
    | (?P<number>(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)
        (?:[smhdwy]|ms)?(?:\d+(?:[smhdwy]|ms))*)
    | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
    | (?P<compare>==|!=|>=|<=|>|<)
    | (?P<op>[-+*/%^(),=])
    """,
    re.VERBOSE,
)


@dataclass(frozen=True)
class Token:
    kind: str
    text: str


def tokens(expr: str) -> list[Token]:
    """The tokens of ``expr`` (whitespace and comments dropped); ValueError on junk."""
    found, position = [], 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if match is None:
            raise ValueError(f"cannot tokenise PromQL at {expr[position : position + 20]!r}")
        kind = match.lastgroup
        assert kind is not None
        if kind not in ("space", "comment"):
            found.append(Token(kind, match.group()))
        position = match.end()
    return found


def _skip_label_list(toks: list[Token], index: int) -> int:
    """Index after a ``by (a, b)``-style list that starts at ``index`` (if any)."""
    if index < len(toks) and toks[index].text == "(":
        while toks[index].text != ")":
            index += 1
        return index + 1
    return index


def selectors(expr: str) -> list[str]:
    """Every vector selector of ``expr`` as text, in order, duplicates removed."""
    toks = tokens(expr)
    found: list[str] = []
    i = 0
    while i < len(toks):
        tok = toks[i]
        nxt = toks[i + 1] if i + 1 < len(toks) else None
        if tok.kind == "ident" and tok.text in LABEL_LIST_KEYWORDS:
            i = _skip_label_list(toks, i + 1)
            continue
        if tok.kind == "ident" and tok.text == "offset":
            i += 2  # the duration
            continue
        if tok.kind == "ident" and tok.text not in KEYWORDS and not (nxt and nxt.text == "("):
            if nxt is not None and nxt.kind == "matchers":
                found.append(tok.text + nxt.text)
                i += 2
            else:
                found.append(tok.text)
                i += 1
            continue
        if tok.kind == "matchers":  # a selector without a metric name: {job="x"}
            found.append(tok.text)
        i += 1
    return list(dict.fromkeys(found))


def metric_names(expr: str) -> set[str]:
    """The metric names read by ``expr`` (from ``name{...}`` and ``{__name__="name"}``)."""
    names = set()
    for selector in selectors(expr):
        name = selector.split("{", 1)[0]
        if name:
            names.add(name)
        names.update(re.findall(r'__name__\s*=\s*"([a-zA-Z_:][a-zA-Z0-9_:]*)"', selector))
    return names


def _skip_unless_operand(toks: list[Token], index: int) -> int:
    """Index after the ``on (...) (...)`` operand that follows an ``unless``."""
    if index < len(toks) and toks[index].text in ("on", "ignoring"):
        index = _skip_label_list(toks, index + 1)
    if index >= len(toks) or toks[index].text != "(":
        raise ValueError("strip_conditions needs the operand of 'unless' in parentheses")
    depth = 0
    for index in range(index, len(toks)):  # noqa: B020 (continue from where we are)
        depth += {"(": 1, ")": -1}.get(toks[index].text, 0)
        if depth == 0:
            return index + 1
    raise ValueError("unbalanced parentheses after 'unless'")


def strip_conditions(expr: str) -> str:
    """``expr`` without its conditions: what shows data when all is well.

    Comparisons with a number go (``> 0.8``, ``== 0``), ``absent(x)`` reads as
    ``(x)``, and ``unless (...)`` goes with its operand (an exclusion that, once
    its own comparison is gone, would exclude everything). So
    ``a / (b > 0) > 0.8 and c >= 10`` becomes ``a / (b) and c``: the same
    series and joins, without the filter that makes it empty when healthy.
    """
    toks = tokens(expr)
    out: list[Token] = []
    i = 0
    while i < len(toks):
        tok = toks[i]
        if tok.kind == "compare":
            j = i + 1
            if j < len(toks) and toks[j].text == "bool":
                j += 1
            if j < len(toks) and toks[j].text in "+-":
                j += 1
            if j < len(toks) and toks[j].kind == "number":
                i = j + 1
                continue
        if tok.kind == "ident" and tok.text == "unless":
            i = _skip_unless_operand(toks, i + 1)
            continue
        if tok.kind == "ident" and tok.text == "absent" and i + 1 < len(toks):
            i += 1  # keep the parenthesis, drop the function
            continue
        out.append(tok)
        i += 1
    text = ""
    for tok in out:
        glue = "" if not text or tok.kind in ("matchers", "range") else " "
        text += glue + tok.text
    return text


GRAFANA_DEFAULTS = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "5m",
    "__range_s": "300",
    "__interval_ms": "15000",
}


def substitute_grafana_variables(expr: str, values: dict[str, str] | None = None) -> str:
    """Replace ``$var``, ``${var}`` and ``${var:format}``: Grafana's built-ins get
    sensible durations, every other variable ``values.get(name, ".*")``."""
    values = {**GRAFANA_DEFAULTS, **(values or {})}

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return values.get(name, ".*")

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", replace, expr)
