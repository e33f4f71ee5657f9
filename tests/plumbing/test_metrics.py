"""The Prometheus collector reads live stats objects (pure logic)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest

from plumbing.metrics import StatsCollector


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
