"""examples/grafana-dashboard.json queries only what the services really export.

The registries are built as the services build them: ``EdgeMetrics`` and
``AggregatorMetrics`` (their exporters on port 0, closed after) and the bridge's
``BridgeMetrics`` on examples/bridge.toml. Metric names are read from the rendered exposition
text, where counters carry their ``_total`` suffix; label names from the metric families.
Every metric named in a panel or variable query must be exported, every label in a matcher
or a ``by (...)`` must be one the metric has (or Prometheus' own ``instance``/``job``), and
every exported metric has a panel.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aggregator.metrics import AggregatorMetrics
from edge.metrics import EdgeMetrics
from fedcore.exporter import Metric, Registry
from firmware_bridge.config import load_bridge_config
from firmware_bridge.runtime import BridgeMetrics

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DASHBOARD = EXAMPLES / "grafana-dashboard.json"
SCRAPE_LABELS = {"instance", "job"}  # added by Prometheus to every scraped series
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}

# ------------------------------------------------------------------ PromQL, as far as needed

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_NUMBER = re.compile(r"(?<![\w:])\d[\w.]*")  # 0.5, 1e3, and durations: offset 5m
_TOKEN = re.compile(
    r"(?P<selector>[A-Za-z_:][\w:]*)\s*\{(?P<matchers>[^}]*)\}"  # name{label="..."}
    r"|(?P<function>[A-Za-z_:][\w:]*)(?=\s*\()"  # sum(, rate(, label_values(
    r"|(?P<bare>[A-Za-z_:][\w:]*)"  # a name without matchers, or a keyword
)
_LABEL = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def parse_promql(expr: str) -> tuple[dict[str, set[str]], set[str]]:
    """({metric name: label names in its matchers}, label names in by/without/on clauses)."""
    text = _STRING.sub('""', expr)
    grouping = {label.strip() for clause in _GROUPING.findall(text)
                for label in clause.split(",") if label.strip()}
    text = _NUMBER.sub(" ", _RANGE.sub("", _GROUPING.sub(" ", text)))
    selectors: dict[str, set[str]] = {}
    for token in _TOKEN.finditer(text):
        if token["selector"]:
            selectors.setdefault(token["selector"], set()).update(_LABEL.findall(token["matchers"]))
        elif token["bare"] and token["bare"].lower() not in _KEYWORDS:
            selectors.setdefault(token["bare"], set())
    return selectors, grouping


def test_the_promql_reader_itself() -> None:
    selectors, grouping = parse_promql(
        'sum by (instance, reason) (increase(fedgate_edge_rejected_total{instance=~"$gw", job!="x{y}"}[$__rate_interval]))'
        " > bool 1e3 or time() - fedgate_round offset 5m")
    assert selectors == {"fedgate_edge_rejected_total": {"instance", "job"}, "fedgate_round": set()}
    assert grouping == {"instance", "reason"}
    assert parse_promql("label_values(fedgate_edge_connected, instance)")[0] == {
        "fedgate_edge_connected": set(), "instance": set()}


# ------------------------------------------------------------------ what the services export


def _families(registry: Registry, owner: object) -> dict[str, tuple[str, ...]]:
    rendered = set(re.findall(r"^# TYPE (\S+) \w+$", registry.render().decode(), re.MULTILINE))
    labels = {m.name + ("_total" if m.kind == "counter" else ""): m.labels
              for m in vars(owner).values() if isinstance(m, Metric)}
    assert set(labels) == rendered, "every metric family is an attribute of its owner"
    return labels


@pytest.fixture(scope="module")
def exported() -> Iterator[dict[str, dict[str, tuple[str, ...]]]]:
    """service -> {exported metric name: label names}."""
    edge, aggregator = EdgeMetrics(0), AggregatorMetrics(0)
    bridge_registry = Registry()
    bridge = BridgeMetrics(bridge_registry, load_bridge_config(EXAMPLES / "bridge.toml"))
    try:
        yield {"edge": _families(edge.registry, edge),
               "aggregator": _families(aggregator.registry, aggregator),
               "bridge": _families(bridge_registry, bridge)}
    finally:
        edge.close()
        aggregator.close()


# ------------------------------------------------------------------ the dashboard


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    nested = [p for row in dashboard["panels"] for p in row.get("panels", [])]
    return [p for p in dashboard["panels"] + nested if p["type"] != "row"]


def _queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    out = [(f"panel {p['title']!r}", t["expr"]) for p in _panels(dashboard) for t in p["targets"]]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"] if isinstance(var["query"], str) else var["query"]["query"]
            out.append((f"variable ${var['name']}", query))
    return out


def test_every_metric_a_query_names_is_exported(dashboard: dict[str, Any],
                                                exported: dict[str, dict[str, tuple[str, ...]]]) -> None:
    known = {name for families in exported.values() for name in families}
    missing = []
    for where, expr in _queries(dashboard):
        selectors, _ = parse_promql(expr)
        names = set(selectors) - (SCRAPE_LABELS if expr.startswith("label_values(") else set())
        assert names, f"{where}: no metric in {expr!r}"
        missing += [f"{where}: {name}" for name in sorted(names - known)]
    assert not missing, "not exported by any service:\n" + "\n".join(missing)


def test_every_label_a_query_uses_is_one_the_metric_has(
        dashboard: dict[str, Any], exported: dict[str, dict[str, tuple[str, ...]]]) -> None:
    labels_of = {name: set(labels) for families in exported.values() for name, labels in families.items()}
    problems = []
    for where, expr in _queries(dashboard):
        selectors, grouping = parse_promql(expr)
        metrics = {name: labels for name, labels in selectors.items() if name in labels_of}
        for name, used in metrics.items():
            problems += [f"{where}: {name} has no label {label!r}"
                         for label in sorted(used - labels_of[name] - SCRAPE_LABELS)]
        available = set().union(*(labels_of[name] for name in metrics)) | SCRAPE_LABELS
        problems += [f"{where}: groups by {label!r}, which none of {sorted(metrics)} has"
                     for label in sorted(grouping - available)]
        for match in re.finditer(r"\{\{\s*(\w+)\s*\}\}", json.dumps(_legends(dashboard, expr))):
            if match[1] not in available:
                problems.append(f"{where}: legend uses {{{{{match[1]}}}}}, not a label of {sorted(metrics)}")
    assert not problems, "\n".join(problems)


def _legends(dashboard: dict[str, Any], expr: str) -> list[str]:
    return [t.get("legendFormat", "") for p in _panels(dashboard) for t in p["targets"] if t["expr"] == expr]


def test_every_exported_metric_has_a_panel(dashboard: dict[str, Any],
                                           exported: dict[str, dict[str, tuple[str, ...]]]) -> None:
    shown = {name for _, expr in _queries(dashboard) for name in parse_promql(expr)[0]}
    for service, families in exported.items():
        assert not set(families) - shown, f"{service} metrics without a panel: {sorted(set(families) - shown)}"


def test_the_dashboard_model(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    source = variables["DS_PROMETHEUS"]
    assert source["type"] == "datasource" and source["query"] == "prometheus"
    assert len(dashboard["description"].splitlines()) == 2
    panels = _panels(dashboard)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"] == DATASOURCE
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]
    for panel in panels:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["description"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            for name in re.findall(r"\$(\w+)", target["expr"]):
                assert name.startswith("__") or name in variables, f"{panel['title']!r}: ${name} undefined"
