"""Session fixtures that build real engines once per test run (default model, tiny classifier)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engines.build import ensure_engine
from engines.loader import load_engine
from engines.protocol import Engine
from engines.source import default_model_path, resolve_model
from engines.tokenizer import QueryTokenizer


@pytest.fixture(scope="session")
def engine_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="session")
def default_engine_path(engine_root: Path) -> Path:
    return ensure_engine(resolve_model("default"), engine_root)


@pytest.fixture(scope="session")
def default_engine(default_engine_path: Path) -> Engine:
    return load_engine(default_engine_path, threads=2)


@pytest.fixture(scope="session")
def default_tokenizer(default_engine: Engine) -> QueryTokenizer:
    return QueryTokenizer(default_engine.path / "tokenizer" / "tokenizer.json",
                          default_engine.manifest.max_length, pairs=False)


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer BERT cross-encoder with the default model's vocabulary."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(1234)
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128,
                        max_position_embeddings=128, num_labels=2)
    model = BertForSequenceClassification(config).eval()
    out = tmp_path_factory.mktemp("tiny-classifier")
    model.save_pretrained(out)
    src = default_model_path()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "vocab.txt"):
        shutil.copy2(src / name, out / name)
    return out


@pytest.fixture(scope="session")
def classifier_engine(tiny_classifier_dir: Path, engine_root: Path) -> Engine:
    source = resolve_model(tiny_classifier_dir, max_length=64)
    return load_engine(ensure_engine(source, engine_root), threads=2)


@pytest.fixture(scope="session")
def torch_artifacts(engine_root: Path) -> dict[str, Path]:
    """The default model built for the torch backend at each GPU precision (checked on CPU)."""
    source = resolve_model("default")
    return {p: ensure_engine(source, engine_root, precision=p, backend="torch", promote=False)
            for p in ("fp16", "int8", "fp8")}
