"""The fleet on the torch runtime, on CPU: the GPU worker's whole path short of CUDA.

The same end-to-end check tests/gpu runs on a GPU (tokenizer service -> broker -> ScoringWorker
whose engine is a two-lane TorchEngine -> score topic, each score within FP16's bound of the
FP32 ONNX Runtime engine), here with the engine on the CPU so every CI run covers it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engines.protocol import Engine
from engines.tokenizer import QueryTokenizer
from engines.torch_runtime import TorchEngine, TorchOptions
from tests.gpu.test_worker_gpu import fleet_matches_reference
from tests.integration.fleet_helpers import CreateTopic

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_worker_on_a_two_lane_torch_engine_scores_like_onnx_fp32(
        kafka_bootstrap: str, create_topic: CreateTopic, topic_name: str, redis_url: str,
        torch_artifacts: dict[str, Path], default_engine: Engine,
        default_tokenizer: QueryTokenizer) -> None:
    artifact = torch_artifacts["fp16"]
    engine = TorchEngine(artifact, options=TorchOptions(device="cpu", lanes=2))
    assert engine.lanes == 2 and not engine.graphs
    await fleet_matches_reference(kafka_bootstrap, create_topic, topic_name, redis_url,
                                  artifact, engine, default_engine, default_tokenizer,
                                  n_batches=6, per_batch=20)
