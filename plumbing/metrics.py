"""Prometheus exposition of a service's stats objects.

Services keep plain counters (dataclasses, cheap to bump on the hot path, easy to assert on in
tests); this collector reads them at scrape time, so there is one source of truth and nothing
to keep in sync. Each service gets its own registry (several can live in one process).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields, is_dataclass
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# Fields that are levels, not running totals.
GAUGES = frozenset({"queue_depth", "in_flight", "redis_available", "busy_slots"})


class StatsCollector(Collector):
    def __init__(self, prefix: str, sources: Mapping[str, Callable[[], Any]]) -> None:
        self.prefix = prefix
        self.sources = sources  # metric group -> callable returning a dataclass or a dict

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        for group, read in self.sources.items():
            stats = read()
            values = ({f.name: getattr(stats, f.name) for f in fields(stats)}
                      if is_dataclass(stats) else dict(stats))
            for name, value in values.items():
                if isinstance(value, bool):
                    value = int(value)
                if not isinstance(value, int | float):
                    continue
                metric = f"{self.prefix}_{group}_{name}"
                if name in GAUGES:
                    yield GaugeMetricFamily(metric, f"{group} {name}", value=value)
                else:
                    yield CounterMetricFamily(metric, f"{group} {name}", value=value)


def serve_metrics(port: int, prefix: str, sources: Mapping[str, Callable[[], Any]],
                  host: str = "127.0.0.1") -> CollectorRegistry:
    """Expose `sources` on http://host:port/metrics (a daemon thread); returns the registry."""
    registry = CollectorRegistry()
    registry.register(StatsCollector(prefix, sources))
    start_http_server(port, addr=host, registry=registry)
    return registry
