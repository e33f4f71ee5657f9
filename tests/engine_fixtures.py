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


@pytest.fixture(scope="session")
def openvino_artifacts(engine_root: Path) -> dict[str, Path]:
    """The default model built for the openvino backend, FP32 and INT8 (not promoted). The
    INT8 build makes the FP32 one first; asking for FP32 afterwards finds it by content hash."""
    source = resolve_model("default")
    int8 = ensure_engine(source, engine_root, precision="int8", backend="openvino",
                         promote=False)
    fp32 = ensure_engine(source, engine_root, precision="fp32", backend="openvino",
                         promote=False)
    return {"fp32": fp32, "int8": int8}


# -- registry versions for follow/reload tests (plain helpers, not fixtures) -------------------
def copy_version(src: Path, root: Path, name: str, **manifest_changes: object) -> Path:
    """A copy of artifact `src` as version `name` of its model in registry `root` (not
    promoted), its manifest changed by `manifest_changes` (e.g. head=..., max_length=...)."""
    from dataclasses import replace

    from engines.manifest import read_manifest, write_manifest
    from engines.registry import model_dir

    manifest = read_manifest(src)
    target = model_dir(root, manifest.model_id) / name
    shutil.copytree(src, target)
    write_manifest(target, replace(manifest, version=name, **manifest_changes))  # type: ignore[arg-type]
    return target


def permuted_vocabulary(tokenizer_json: bytes) -> bytes:
    """The same tokenizer with another vocabulary: every token but the special ones (whose ids
    the post-processor names) takes the id of its mirror among them, so the text of a sequence
    is the same and its ids differ, and every id stays below the vocabulary's size (an engine
    built for the original still runs them)."""
    import orjson

    data = orjson.loads(tokenizer_json)
    vocab: dict[str, int] = data["model"]["vocab"]
    fixed = {token["id"] for token in data["added_tokens"]}
    movable = sorted(i for i in vocab.values() if i not in fixed)
    mirror = dict(zip(movable, reversed(movable), strict=True))
    data["model"]["vocab"] = dict(sorted(((t, mirror.get(i, i)) for t, i in vocab.items()),
                                         key=lambda pair: pair[1]))
    return orjson.dumps(data)


def retokenized_version(src: Path, root: Path, name: str, **manifest_changes: object) -> Path:
    """A copy of artifact `src` as version `name` in registry `root` whose tokenizer has another
    vocabulary (`permuted_vocabulary`; vocab.txt to match): another tokenizer_id, the same head
    and model files. Checksums, tokenizer_id and golden set stay consistent, so it verifies,
    promotes and loads; its scores are of course meaningless."""
    from dataclasses import replace

    from engines.manifest import hash_files, list_files, read_manifest, write_manifest
    from engines.tokenizer import artifact_tokenizer_json, tokenizer_id_of

    target = copy_version(src, root, name, **manifest_changes)
    tokenizer_json = artifact_tokenizer_json(target)
    tokenizer_json.write_bytes(permuted_vocabulary(tokenizer_json.read_bytes()))
    vocab_txt = tokenizer_json.parent / "vocab.txt"
    if vocab_txt.is_file():
        import orjson

        vocab = orjson.loads(tokenizer_json.read_bytes())["model"]["vocab"]
        vocab_txt.write_text("".join(f"{t}\n" for t in sorted(vocab, key=vocab.__getitem__)))
    manifest = read_manifest(target)
    write_manifest(target, replace(manifest, tokenizer_id=tokenizer_id_of(tokenizer_json),
                                   files=hash_files(target, list_files(target))))
    return target
