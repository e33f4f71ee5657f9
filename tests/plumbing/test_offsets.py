"""OffsetTracker: commit only below the first unfinished offset (pure logic)."""

from __future__ import annotations

from aiokafka import TopicPartition
from hypothesis import given
from hypothesis import strategies as st

from plumbing.offsets import OffsetTracker

TP = TopicPartition("t", 0)


def test_out_of_order_finishes_commit_only_the_contiguous_prefix() -> None:
    t = OffsetTracker()
    for off in (10, 11, 12, 13):
        t.start(TP, off)
    t.finish(TP, 11)
    t.finish(TP, 12)
    assert t.committable() == {TP: 10}  # 10 still running: nothing past it
    t.mark_committed(t.committable())
    t.finish(TP, 10)
    assert t.committable() == {TP: 13}
    t.finish(TP, 13)
    assert t.committable() == {TP: 14}
    t.mark_committed({TP: 14})
    assert t.committable() == {}


def test_revoked_partition_is_forgotten_and_late_results_ignored() -> None:
    t = OffsetTracker()
    t.start(TP, 5)
    t.forget([TP])
    t.finish(TP, 5)  # the abandoned record's work finished after the revoke
    assert t.committable() == {} and t.in_flight() == 0


@given(st.permutations(list(range(30))), st.integers(0, 30))
def test_never_commits_past_an_unfinished_offset(order: list[int], n_done: int) -> None:
    t = OffsetTracker()
    for off in range(30):
        t.start(TP, off)
    done = set(order[:n_done])
    for off in order[:n_done]:
        t.finish(TP, off)
    position = t.committable().get(TP, 0)
    assert all(off in done for off in range(position))  # everything below is finished
    assert position == 30 or position not in done  # and it stops at the first unfinished
