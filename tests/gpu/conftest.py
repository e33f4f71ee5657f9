"""Tests that need a CUDA GPU: collected everywhere, skipped unless torch sees a GPU.

On a GPU host without the default model's package, set QSCORE_TEST_MODEL to a model directory
(scripts/gpu_check.sh sets it to the carried FP16 copy of all-MiniLM-L6-v2): every engine here,
the ONNX Runtime FP32 reference included, is then built from that directory.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engines.build import ensure_engine
from engines.loader import load_engine
from engines.protocol import Engine
from engines.source import ModelSource, resolve_model
from engines.tokenizer import QueryTokenizer

MODEL_ENV = "QSCORE_TEST_MODEL"
HERE = Path(__file__).resolve().parent
GPU = torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def gpu_source() -> ModelSource:
    """The default model, or the directory QSCORE_TEST_MODEL names."""
    return resolve_model(os.environ.get(MODEL_ENV) or "default")


@pytest.fixture(scope="session")
def onnx_reference(gpu_source: ModelSource, engine_root: Path) -> Engine:
    """ONNX Runtime FP32 on CPU: the reference every GPU engine is held to."""
    return load_engine(ensure_engine(gpu_source, engine_root), threads=4)


@pytest.fixture(scope="session")
def gpu_artifact(gpu_source: ModelSource, engine_root: Path) -> Callable[[str], Path]:
    """`gpu_artifact("fp16")`: the torch-backend artifact at that precision, built on first
    use (on the GPU, so the build's accuracy check runs there too)."""
    built: dict[str, Path] = {}

    def get(precision: str) -> Path:
        if precision not in built:
            built[precision] = ensure_engine(gpu_source, engine_root, precision=precision,
                                             backend="torch", promote=False)
        return built[precision]

    return get


@pytest.fixture(scope="session")
def gpu_tokenizer(gpu_artifact: Callable[[str], Path], gpu_source: ModelSource) -> QueryTokenizer:
    return QueryTokenizer(gpu_artifact("fp16") / "tokenizer" / "tokenizer.json",
                          gpu_source.max_length, pairs=False)
