"""Which input offsets may be committed: only those whose every output is acknowledged.

Messages of a partition finish out of order (micro-batches mix messages, engines run in
parallel), but a Kafka commit is a single position per partition. So we commit up to the first
unfinished offset: everything below it is done, and a crash redelivers from there (at-least-
once). Pure bookkeeping; the services own the consumer and call commit themselves.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from aiokafka import TopicPartition


@dataclass(slots=True)
class _Partition:
    pending: set[int] = field(default_factory=set)
    highest_seen: int = -1
    committed: int = -1  # next offset to read, as last committed; -1: never

    def position(self) -> int:
        """Next offset to commit: the lowest pending one, or one past everything seen."""
        return min(self.pending) if self.pending else self.highest_seen + 1


class OffsetTracker:
    """Tracks in-flight offsets per partition and computes safe commit positions."""

    def __init__(self) -> None:
        self._parts: dict[TopicPartition, _Partition] = {}

    def start(self, tp: TopicPartition, offset: int) -> None:
        part = self._parts.setdefault(tp, _Partition())
        part.pending.add(offset)
        part.highest_seen = max(part.highest_seen, offset)

    def finish(self, tp: TopicPartition, offset: int) -> None:
        part = self._parts.get(tp)
        if part is not None:  # a revoked partition's late result: nothing to do
            part.pending.discard(offset)

    def in_flight(self, tp: TopicPartition | None = None) -> int:
        if tp is not None:
            part = self._parts.get(tp)
            return len(part.pending) if part else 0
        return sum(len(p.pending) for p in self._parts.values())

    def committable(self) -> dict[TopicPartition, int]:
        """Partitions whose safe position moved since the last `mark_committed`."""
        out = {}
        for tp, part in self._parts.items():
            position = part.position()
            if part.highest_seen >= 0 and position > part.committed:
                out[tp] = position
        return out

    def mark_committed(self, positions: dict[TopicPartition, int]) -> None:
        for tp, position in positions.items():
            if part := self._parts.get(tp):
                part.committed = max(part.committed, position)

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        """Drop partitions we no longer own: their unfinished offsets will be redelivered to
        the new owner, so nothing may be committed past them from here."""
        for tp in tps:
            self._parts.pop(tp, None)

    def partitions(self) -> list[TopicPartition]:
        return list(self._parts)
