"""The fleet on OpenVINO artifacts, end to end on the real broker and redis-server: the
tokenizer service on the INT8 artifact's tokenizer, the worker command (`qscore worker`) on one
compiled model with two lanes, and every score equal to the embedded path's (`qscore rescore`)
on the same artifact."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from engines.manifest import read_manifest
from plumbing.cache import CacheSettings
from qscore.client import QueryProducer, ScoreConsumer
from qscore.local.fleet import ServiceProcess
from tests.integration.fleet_helpers import (
    CreateTopic,
    in_process_tokenizer,
    kafka_settings,
    make_topics,
    sample_batches,
)
from tests.integration.test_fleet import Scores, expected, publish, rescore_reference

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_worker_command_on_a_two_lane_openvino_engine_scores_like_rescore(
        kafka_bootstrap: str, redis_url: str, create_topic: CreateTopic, topic_name: str,
        openvino_artifacts: dict[str, Path], tmp_path: Path) -> None:
    artifact = openvino_artifacts["int8"]
    version = read_manifest(artifact).version
    kafka = kafka_settings(kafka_bootstrap)
    topics = await make_topics(create_topic, topic_name)
    cache = CacheSettings(redis_url=redis_url, key_prefix=topic_name)
    batches = sample_batches(20, 20, max_docs=2)  # with and without docs
    args = ["worker", "--bootstrap-servers", kafka_bootstrap, "--topic-prefix", topic_name,
            "--engine", str(artifact), "--group-id", f"{topic_name}-w", "--engines", "2",
            "--threads", "1", "--redis-url", redis_url]
    if not os.environ.get("QSCORE_TEST_KAFKA"):
        args.append("--fast-groups")
    worker = ServiceProcess(name="ov-worker", args=args, log_path=tmp_path / "worker.log")
    async with (in_process_tokenizer(kafka, topics, artifact, cache, f"{topic_name}-t"),
                QueryProducer(kafka, topics) as producer,
                ScoreConsumer(kafka, topics) as consumer):
        worker.start()
        try:
            await publish(producer, batches)
            try:
                scores: Scores = await consumer.collect(expected(batches), timeout=180)
            except Exception as exc:  # say what the worker did (order-dependent failure)
                raise AssertionError(f"{exc}\nworker log:\n{worker.log_tail()}") from exc
        finally:
            code = worker.stop()
    log = (tmp_path / "worker.log").read_text()
    assert code == 0, log[-3000:]
    assert "openvino int8, cpu x2 lanes" in log, log[-3000:]
    assert sum(len(v) for v in scores.values()) == 400

    reference = rescore_reference(batches, artifact, tmp_path)
    with_docs = 0
    for b, items in scores.items():
        for item_id, got in items.items():
            want = reference[f"{b}/{item_id}"]
            assert got.error is None and got.model_version == version
            # Not bit-equal: how far a row is padded moves INT8 outputs a little (measured:
            # cosine >= 0.9998 between a doc alone and in a padded batch of 64; FP32 1e-12).
            # Far below INT8's own error (mean cosine 0.998 to FP32), so these bounds still
            # catch another engine, tokenizer or item.
            np.testing.assert_allclose(got.scores, want["scores"], atol=5e-3)
            if "embedding" in want:
                a, b_ = np.asarray(got.embedding), np.asarray(want["embedding"])
                assert a @ b_ / (np.linalg.norm(a) * np.linalg.norm(b_)) >= 0.999
            with_docs += bool(want["scores"])
    assert 0 < with_docs < 400
