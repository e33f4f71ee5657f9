"""The Grafana dashboard asks only for metrics the services export.

Every PromQL expression in deploy/grafana/dashboards/qscore.json is parsed for metric names,
and each name is checked against what a real ScoringWorker and TokenizerService expose
through plumbing.metrics.StatsCollector (built in-process with an unreachable broker, as the
`qscore worker` and `qscore tokenizer` commands build them): no list of names is kept here.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from engines.manifest import Manifest, read_manifest
from plumbing.cache import CacheSettings
from plumbing.kafka import KafkaSettings, Topics
from plumbing.metrics import StatsCollector
from tokenizer_svc.service import TokenizerService, TokenizerServiceSettings
from workers.reload import Reloader, ReloadSettings
from workers.service import ScoringWorker, WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "qscore.json"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
UNREACHABLE = KafkaSettings(bootstrap_servers="127.0.0.1:1")
# The prefixes `qscore worker` and `qscore tokenizer` serve their metrics under
# (qscore/cli/services.py).
WORKER, TOKENIZER = "qscore_worker", "qscore_tokenizer"

# -- reading the dashboard -------------------------------------------------------------------
_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")  # [5m], [$__rate_interval], subqueries [1h:1m]
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
# A name that starts a token: not inside a number (1e3, 5m) or a $variable.
_NAME = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(\s*\()?")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan", "by", "without",
                       "on", "ignoring", "group_left", "group_right"})
# What each type of family is queried as (prometheus_client's exposition, OpenMetrics names).
_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"),
             "summary": ("", "_sum", "_count"), "info": ("_info",), "unknown": ("",)}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, label names in
    groupings and matchers, durations and numbers left out)."""
    if "__name__" in expr:
        raise ValueError(f"{expr!r}: a __name__ matcher cannot be checked; name the metric")
    text = _STRINGS.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    return {m.group(1) for m in _NAME.finditer(text)
            if not m.group(2) and m.group(1).lower() not in _KEYWORDS}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL expression) of every target."""
    return [(p.get("title", ""), t["expr"]) for p in panels(dashboard)
            for t in p.get("targets", []) if t.get("expr")]


def unknown_metrics(dashboard: dict[str, Any], exported: set[str]) -> list[str]:
    """"panel: name" for each metric a query names that `exported` lacks."""
    return sorted({f"{title}: {name}" for title, expr in queries(dashboard)
                   for name in metric_names(expr) if name not in exported})


def exported_names(families: list[Metric]) -> set[str]:
    """The names a Prometheus query can select from these families (a counter's _total, a
    histogram's _bucket/_sum/_count, ...), families without samples yet included."""
    names: set[str] = set()
    for family in families:
        queryable = {family.name + s for s in _SUFFIXES[family.type]}
        assert {s.name for s in family.samples} <= queryable, family  # the rule above holds
        names |= queryable
    return names


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


# -- the services' exporters, in-process -----------------------------------------------------
class _Engine:
    """An engine on a two-stream GPU that is never called: what the exporters see of one."""

    device, lanes = "cuda:0", 2

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest

    def run(self, batch: Any, lane: int = 0) -> np.ndarray:
        raise AssertionError("not called")

    def health(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture
async def exported(default_engine_path: Path) -> set[str]:
    """Every name the worker's and the tokenizer's /metrics can hold, with every optional
    group present: a worker following the registry and writing the cache, a tokenizer
    following it too."""
    worker = ScoringWorker(WorkerSettings(
        kafka=UNREACHABLE, cache=CacheSettings(redis_url="redis://127.0.0.1:1")),
        [_Engine(read_manifest(default_engine_path))])
    worker.reloader = Reloader(worker, lambda: None, lambda path, threads: [],
                               ReloadSettings(), load_sample=worker.load_sample)
    tokenizer = TokenizerService(TokenizerServiceSettings(
        kafka=UNREACHABLE, topics=Topics(), cache=CacheSettings(),
        artifact=default_engine_path, processes=1))
    tokenizer.follow = lambda: default_engine_path
    try:
        registry = CollectorRegistry()
        registry.register(StatsCollector(WORKER, worker.metrics()))
        registry.register(StatsCollector(TOKENIZER, tokenizer.metrics()))
        return exported_names(list(registry.collect()))
    finally:
        await worker.stop()
        await tokenizer.stop()


# -- tests -----------------------------------------------------------------------------------
def test_metric_names_are_read_from_promql() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, group) (rate(a_seconds_bucket{job="w",'
            'x=~"b|c{1}"}[$__rate_interval]))) / on (group) group_left(device) '
            'max without (instance) (b_lanes offset 5m) * 1e3 + c:recorded:ratio '
            'unless d_total > bool 60 and label_replace(e, "dst", "$1", "src", "(.*)")')
    assert metric_names(expr) == {"a_seconds_bucket", "b_lanes", "c:recorded:ratio",
                                  "d_total", "e"}
    with pytest.raises(ValueError, match="__name__"):
        metric_names('sum({__name__=~"qscore_.*"})')


async def test_every_dashboard_metric_is_exported(exported: set[str]) -> None:
    dashboard = load_dashboard()
    found = queries(dashboard)
    assert found, "the dashboard has no queries"
    for title, expr in found:  # a parser that finds nothing would pass anything
        assert metric_names(expr), f"{title}: no metric in {expr!r}"
    assert unknown_metrics(dashboard, exported) == []


async def test_a_metric_the_services_do_not_export_is_caught(exported: set[str]) -> None:
    dashboard = load_dashboard()
    broken = copy.deepcopy(dashboard)
    (panel, *_) = [p for p in panels(broken) if p.get("targets")]
    target = panel["targets"][0]
    (name, *_) = sorted(metric_names(target["expr"]))
    target["expr"] = target["expr"].replace(name, name + "_typo")
    broken["panels"].append({"type": "row", "title": "collapsed", "collapsed": True,
                             "panels": [{"title": "gpu memory", "targets": [{
                                 "refId": "A", "expr": "max(qscore_worker_gpu_memory_bytes)"}]}]})
    assert unknown_metrics(broken, exported) == sorted([
        f"{panel['title']}: {name}_typo", "gpu memory: qscore_worker_gpu_memory_bytes"])
    # A histogram's suffixes belong to histograms only, a counter's _total to counters.
    assert "qscore_worker_worker_e2e_seconds_bucket" in exported
    assert "qscore_worker_worker_e2e_seconds_total" not in exported
    assert "qscore_worker_worker_items_total" in exported
    assert "qscore_worker_worker_items_bucket" not in exported


def test_the_dashboard_is_provisioned_with_its_data_source() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 39
    (variable,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["name"] == "DS_PROMETHEUS" and variable["query"] == "prometheus"
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        for source in (panel.get("datasource"),
                       *(t.get("datasource") for t in panel.get("targets", []))):
            assert source == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
    # The provisioned data source is the variable's default; the provider reads the folder
    # compose mounts deploy/grafana/dashboards at.
    datasources = (PROVISIONING / "datasources" / "prometheus.yaml").read_text()
    assert re.search(rf"^\s+uid: {variable['current']['value']}$", datasources, re.M)
    provider = (PROVISIONING / "dashboards" / "qscore.yaml").read_text()
    assert re.search(r"^\s+path: /var/lib/grafana/dashboards$", provider, re.M)
