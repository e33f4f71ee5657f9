"""Prometheus exposition of a service's stats objects.

Services keep plain counters (dataclasses, cheap to bump on the hot path, easy to assert on in
tests); this collector reads them at scrape time, so there is one source of truth and nothing
to keep in sync. Each service gets its own registry (several can live in one process).

A stats field (or a dict value) exports by its type: a number as a counter (a gauge if its name
is in GAUGES), a `Histogram` as a histogram, a `Labelled` as one family with labels (per device,
per consumer group, per dead-letter reason). Histograms here are plain bucket arrays rather
than prometheus_client's `Histogram`: observing one on the event loop costs a bisect and two
adds (no lock, no registry), the stats object stays the one thing tests assert on, and a
service needs no registry of its own, only `metrics()` sources.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from plumbing.health import MetricsPort

# Fields that are levels, not running totals.
GAUGES = frozenset({"queue_depth", "in_flight", "redis_available", "busy_slots",
                    "engine_generation", "reload_state", "reload_pending_since",
                    "retiring_pools"})

# Fixed bucket bounds (upper, seconds / sequences); +Inf is implied.
LATENCY_BUCKETS_S = (0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25,
                     0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Histogram:
    """Counts of observations per fixed bucket, and their sum: cheap enough to observe once
    per record or engine call on the event loop. Exported cumulative, as Prometheus wants."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(sorted(bounds))  # upper bounds, inclusive (Prometheus `le`)
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def __repr__(self) -> str:  # short in log lines that print a stats object
        return f"Histogram(count={self.count}, sum={self.sum:.6g})"


@dataclass(slots=True)
class Labelled:
    """One metric family with labels: a value per tuple of label values (e.g. per device).
    Its values must be few and bounded (devices, groups, rule names), never ids or free text."""

    labels: tuple[str, ...]
    values: dict[tuple[str, ...], float] = field(default_factory=dict)
    gauge: bool = False  # else a counter


class StatsCollector(Collector):
    def __init__(self, prefix: str, sources: Mapping[str, Callable[[], Any]]) -> None:
        self.prefix = prefix
        self.sources = sources  # metric group -> callable returning a dataclass or a dict

    def collect(self) -> Iterable[Metric]:
        for group, read in self.sources.items():
            stats = read()
            values = ({f.name: getattr(stats, f.name) for f in fields(stats)}
                      if is_dataclass(stats) else dict(stats))
            for name, value in values.items():
                metric, doc = f"{self.prefix}_{group}_{name}", f"{group} {name}"
                if isinstance(value, Histogram):
                    yield _histogram(metric, doc, value)
                    continue
                if isinstance(value, Labelled):
                    yield _labelled(metric, doc, value)
                    continue
                if isinstance(value, bool):
                    value = int(value)
                if not isinstance(value, int | float):
                    continue
                if name in GAUGES:
                    yield GaugeMetricFamily(metric, doc, value=value)
                else:
                    yield CounterMetricFamily(metric, doc, value=value)


def _histogram(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
    counts = list(h.counts)  # one snapshot: the loop may observe while a scrape reads
    buckets, total = [], 0
    for bound, n in zip((*h.bounds, float("inf")), counts, strict=True):
        total += n
        buckets.append((floatToGoString(bound), total))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=h.sum)


def _labelled(name: str, doc: str, value: Labelled) -> Metric:
    family: GaugeMetricFamily | CounterMetricFamily = (
        GaugeMetricFamily(name, doc, labels=value.labels) if value.gauge
        else CounterMetricFamily(name, doc, labels=value.labels))
    for labels, v in list(value.values.items()):  # a copy: the loop may add a key meanwhile
        family.add_metric(list(labels), v)
    return family


def serve_metrics(port: int | MetricsPort, prefix: str, sources: Mapping[str, Callable[[], Any]],
                  host: str = "127.0.0.1") -> MetricsPort:
    """Expose `sources` at /metrics of `port`: a MetricsPort opened already (before a long
    engine load, so probes answer through it), or a port number to open one on `host` (a
    daemon thread). /healthz and /readyz answer beside it (plumbing.health)."""
    opened = port if isinstance(port, MetricsPort) else MetricsPort(port, host)
    opened.expose(StatsCollector(prefix, sources))
    return opened
