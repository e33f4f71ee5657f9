"""The Prometheus collector reads live stats objects (pure logic)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest

from plumbing.metrics import Histogram, Labelled, StatsCollector


@dataclass
class Stats:
    batches: int = 0
    redis_available: bool = True
    note: str = "ignored"


def test_counters_and_gauges_follow_the_stats_objects() -> None:
    stats = Stats()
    registry = CollectorRegistry()
    registry.register(StatsCollector("qscore_worker", {"worker": lambda: stats,
                                                      "queue": lambda: {"queue_depth": 7}}))
    stats.batches = 3
    text = generate_latest(registry).decode()
    assert "qscore_worker_worker_batches_total 3.0" in text
    assert "qscore_worker_worker_redis_available 1.0" in text
    assert "# TYPE qscore_worker_queue_queue_depth gauge" in text
    assert "note" not in text


@dataclass
class Timed:
    latency_s: Histogram = field(default_factory=lambda: Histogram((0.01, 0.1, 1.0)))


def test_a_histogram_exports_cumulative_buckets_sum_and_count() -> None:
    stats = Timed()
    for value in (0.005, 0.01, 0.05, 0.5, 3.0):  # 0.01 sits in its own bucket (le is <=)
        stats.latency_s.observe(value)
    assert stats.latency_s.counts == [2, 1, 1, 1] and stats.latency_s.count == 5
    registry = CollectorRegistry()
    registry.register(StatsCollector("qscore_worker", {"worker": lambda: stats}))
    text = generate_latest(registry).decode()
    assert "# TYPE qscore_worker_worker_latency_s histogram" in text
    for le, n in (("0.01", 2), ("0.1", 3), ("1.0", 4), ("+Inf", 5)):
        assert f'qscore_worker_worker_latency_s_bucket{{le="{le}"}} {n}.0' in text
    assert "qscore_worker_worker_latency_s_count 5.0" in text
    assert "qscore_worker_worker_latency_s_sum 3.565" in text
    assert repr(stats.latency_s) == "Histogram(count=5, sum=3.565)"


def test_labelled_values_export_as_one_family() -> None:
    busy = Labelled(("device",), {("cuda:0",): 1.5, ("cuda:1",): 0.25})
    registry = CollectorRegistry()
    registry.register(StatsCollector("qscore_worker", {"device": lambda: {
        "busy_seconds": busy, "lanes": Labelled(("device",), {("cuda:0",): 2}, gauge=True),
        "reasons": Labelled(("stage", "reason"))}}))
    text = generate_latest(registry).decode()
    assert 'qscore_worker_device_busy_seconds_total{device="cuda:0"} 1.5' in text
    assert 'qscore_worker_device_busy_seconds_total{device="cuda:1"} 0.25' in text
    assert "# TYPE qscore_worker_device_lanes gauge" in text
    assert 'qscore_worker_device_lanes{device="cuda:0"} 2.0' in text
    # No value yet: the family is still declared, so a dashboard's name check finds it.
    assert "# TYPE qscore_worker_device_reasons_total counter" in text


def test_levels_are_gauges() -> None:
    registry = CollectorRegistry()
    registry.register(StatsCollector("qscore_worker", {"reload": lambda: {
        "reload_state": 2.0, "reloads": 1.0}}))
    text = generate_latest(registry).decode()
    assert "qscore_worker_reload_reload_state 2.0" in text
    assert "qscore_worker_reload_reloads_total 1.0" in text
