"""Only the fleet chooses where it writes: reply topics against the allow-list."""

from __future__ import annotations

import pytest

from plumbing.kafka import ReplyTopicError, Topics, check_reply_topic

FLEET = Topics.with_prefix("fleet")


@pytest.mark.parametrize("topic", [None, "fleet.scores", "fleet.scores.team-a",
                                   "fleet.scores.a.b"])
def test_the_score_topic_and_topics_under_it_are_allowed(topic: str | None) -> None:
    check_reply_topic(topic, FLEET.reply_patterns())


@pytest.mark.parametrize("topic", ["no-such-topic-1", "__consumer_offsets", "fleet.scoresX",
                                   "fleet.tokens", "fleet.dead-letter", "qscore.scores"])
def test_any_other_topic_is_refused_with_the_allow_list_in_the_reason(topic: str) -> None:
    with pytest.raises(ReplyTopicError) as info:
        check_reply_topic(topic, FLEET.reply_patterns())
    assert info.value.rule == "forbidden_topic" and info.value.field == "reply_topic"
    assert topic in str(info.value) and "fleet.scores.*" in str(info.value)


def test_a_configured_allow_list_replaces_the_default() -> None:
    check_reply_topic("team-b.results", ("team-*.results",))
    with pytest.raises(ReplyTopicError):
        check_reply_topic("fleet.scores", ("team-*.results",))
