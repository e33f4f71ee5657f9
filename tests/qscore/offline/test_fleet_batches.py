"""The pure parts of `rescore --fleet`: batch ids and parts, answers routed to their windows,
the fleet's errors merged into the rejected lines (qscore.offline.windowbatches, replies)."""

from __future__ import annotations

import io
import time

import numpy as np
import orjson
import pytest

from qscore.offline.querylog import LogRecord
from qscore.offline.replies import FleetVersionChanged, Replies
from qscore.offline.rescore import Window
from qscore.offline.windowbatches import (
    WindowAnswers,
    batch_prefix,
    copy_rejects,
    envelope_bytes,
    plan_parts,
    sendable,
    window_of,
)
from schemas import ItemScore, Limits, QueryBatch, QueryItem, ScoreBatch, Timings
from schemas import encode_query_batch as encode

PREFIX = batch_prefix("0123456789abcdef")
REPLY = "qscore.scores.rescore-0123456789abcdef"


def _window(items: list[QueryItem], first_line: int = 1) -> Window:
    return Window(lines=list(range(first_line, first_line + len(items))), items=items,
                  last_line=first_line + len(items) - 1)


def _answers(window: Window, parts: list[list[int]]) -> WindowAnswers:
    pending = WindowAnswers.of(window, window.lines[0], 0)
    for k, indices in enumerate(parts):
        pending.add_part(f"{PREFIX}{window.last_line}-{k}", indices)
    return pending


def _scores(batch_id: str, ids: list[str], version: str = "v1", model: str = "m",
            error: str | None = None) -> ScoreBatch:
    return ScoreBatch(batch_id, tuple(ItemScore(i, (0.1, 0.2), cached=False, model_version=version,
                                                error=error) for i in ids),
                      model, time.time(), Timings())


def test_batch_ids_name_their_window() -> None:
    assert window_of(f"{PREFIX}2048-3", PREFIX) == 2048
    assert window_of(f"{PREFIX}probe-1a2b", PREFIX) is None
    assert window_of("rescore-other-2048-0", PREFIX) is None


def test_parts_fit_a_message_keep_ids_unique_and_input_order() -> None:
    limits = Limits(max_message_bytes=40_000)
    items = [QueryItem(f"q{i}", f"query {i}", ("doc " * (300 + 200 * (i % 5)),) * 2)
             for i in range(60)]
    items[30] = QueryItem("q3", "the same id again", None)  # after a short dedupe window
    window = _window(items)
    envelope = envelope_bytes(PREFIX, REPLY)
    parts = plan_parts(window, batch_items=25, limits=limits, envelope=envelope)
    assert [i for part in parts for i in part] == list(range(60))
    assert len(parts) > 60 // 25 + 1  # the size, not the count, closes most parts
    for k, part in enumerate(parts):
        ids = [items[i].id for i in part]
        assert len(ids) == len(set(ids)) and len(ids) <= 25
        batch = QueryBatch(f"{PREFIX}{window.last_line}-{k}", tuple(items[i] for i in part),
                           submitted_at=time.time(), reply_topic=REPLY, priority="offline",
                           embedding_format="base64")
        encode(batch, limits)  # raises if it does not fit
    # The same window planned again (a resumed run): the same parts, so the same ids.
    assert plan_parts(window, batch_items=25, limits=limits, envelope=envelope) == parts


def test_an_item_too_large_for_a_message_is_rejected_as_it_is_read() -> None:
    limits = Limits(max_message_bytes=20_000)
    big = QueryItem("big", "q", ("x" * 8000, "y" * 8000, "z" * 8000))
    records = [LogRecord(1, QueryItem("a", "q"), None, b"a"), LogRecord(2, big, None, b"big")]
    out = list(sendable(iter(records), limits, envelope_bytes(PREFIX, REPLY)))
    assert out[0] is records[0]
    assert out[1].item is None and out[1].raw == b"big"
    assert "too large to send to the fleet" in (out[1].error or "")


def test_answers_go_to_their_window_first_one_wins_others_are_dropped() -> None:
    items = [QueryItem(f"q{i}", "q") for i in range(4)]
    window = _window(items, first_line=33)  # lines 33-36
    pending = _answers(window, [[0, 1], [2, 3]])
    replies = Replies(PREFIX, REPLY, registered_through=32, allow_version_change=False)
    replies.model = ("m", "v1")
    # A resumed run reads the previous attempt's answers before it reads their window...
    replies.offer(_scores(f"{PREFIX}36-1", ["q2", "q3"]))
    # ...and those of windows it wrote already, or of other runs, are dropped.
    replies.offer(_scores(f"{PREFIX}32-0", ["x"]))
    replies.offer(_scores("someone-else", ["q0"]))
    assert list(replies.early) == [f"{PREFIX}36-1"]
    replies.register(pending)
    assert not replies.early and pending.missing == 2
    replies.offer(_scores(f"{PREFIX}36-0", ["q0"]))
    replies.offer(_scores(f"{PREFIX}36-0", ["q0", "q1"], version="v1"))  # a redelivery too
    assert pending.complete and not replies.parts and replies.failure is None
    rows = pending.rows("m")
    assert rows.ids == ["q0", "q1", "q2", "q3"] and rows.lines == [33, 34, 35, 36]
    # float32, as the embedded path writes them
    assert rows.scores[0] == np.asarray([0.1, 0.2], np.float32).tolist() != [0.1, 0.2]


def test_another_version_fails_the_run_unless_allowed() -> None:
    window = _window([QueryItem("q0", "q"), QueryItem("q1", "q")])
    for allowed in (False, True):
        pending = _answers(window, [[0, 1]])
        replies = Replies(PREFIX, REPLY, registered_through=0, allow_version_change=allowed)
        replies.model = ("m", "v1")
        replies.register(pending)
        replies.offer(_scores(f"{PREFIX}2-0", ["q0", "q1"], version="v2"))
        if allowed:
            assert pending.complete and pending.rows("m").versions == ["v2", "v2"]
        else:
            assert isinstance(replies.failure, FleetVersionChanged) and not pending.complete
    replies = Replies(PREFIX, REPLY, registered_through=0, allow_version_change=True)
    replies.model = ("m", "v1")
    replies.register(_answers(window, [[0, 1]]))
    replies.offer(_scores(f"{PREFIX}2-0", ["q0"], model="other"))  # another model: never
    assert isinstance(replies.failure, FleetVersionChanged)


def test_items_the_fleet_could_not_score_join_the_rejected_lines_in_order() -> None:
    window = _window([QueryItem(f"q{i}", "q") for i in range(3)], first_line=2)  # 2, 3, 4
    window.lines = [2, 4, 6]
    pending = _answers(window, [[0, 1, 2]])
    replies = Replies(PREFIX, REPLY, registered_through=0, allow_version_change=False)
    replies.model = ("m", "v1")
    replies.register(pending)
    replies.offer(_scores(f"{PREFIX}{window.last_line}-0", ["q0", "q2"]))
    replies.offer(_scores(f"{PREFIX}{window.last_line}-0", ["q1"], error="engine failed"))
    assert pending.complete and pending.rows("m").ids == ["q0", "q2"]
    spool = io.BytesIO(b"".join(orjson.dumps({"line": n, "reason": "bad", "raw": ""}) + b"\n"
                                for n in (1, 3, 5)))
    rej = io.BytesIO()
    copy_rejects(spool, 0, len(spool.getvalue()), pending.errors(), rej)
    lines = [orjson.loads(r) for r in rej.getvalue().splitlines()]
    assert [r["line"] for r in lines] == [1, 3, 4, 5]
    assert lines[2]["reason"] == "the fleet could not score it: engine failed"
    assert orjson.loads(lines[2]["raw"]) == {"id": "q1", "query": "q"}
    # No errors: the spool's bytes, as they are.
    copy_rejects(spool, 0, len(spool.getvalue()), [], rej2 := io.BytesIO())
    assert rej2.getvalue() == spool.getvalue()


@pytest.mark.parametrize("batch_items", [1, 7, 1024])
def test_parts_never_pass_the_batch_limit(batch_items: int) -> None:
    items = [QueryItem(f"q{i}", "q") for i in range(2000)]
    parts = plan_parts(_window(items), batch_items=batch_items, limits=Limits(),
                       envelope=envelope_bytes(PREFIX, REPLY))
    assert max(map(len, parts)) == min(batch_items, Limits().max_items, 2000)
