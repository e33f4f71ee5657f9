"""PyTorch -> ONNX export with the head folded into the graph, then ONNX Runtime fusion.

Folding pooling/normalisation (similarity) or softmax (classifier) into the graph keeps the
runtime's output small (one vector or one probability per sequence) and lets every backend
share one contract. Needs torch + transformers (the `build` extra); loading an engine does not.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from engines.errors import BuildError
from engines.source import ModelSource

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "output"
OPSET = 17

# Real text of varied length, including a pair long enough to be truncated: every build is
# checked against PyTorch on it before the artifact is written.
CHECK_TEXTS = (
    "how long to boil an egg",
    "symptoms of vitamin d deficiency in adults",
    "cheap flights from london to lisbon in march",
    "python list comprehension with if else",
    "what is the capital of australia",
    "Boil the eggs for nine minutes, then cool them in iced water so they peel cleanly.",
    "Canberra is the capital city of Australia, chosen as a compromise between Sydney and "
    "Melbourne.",
    "The stock market closed higher on Tuesday as technology shares rallied. " * 40,
)


def _load_torch_model(source: ModelSource) -> Any:
    try:
        import torch
        from transformers import AutoModel, AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise BuildError("building an engine needs torch and transformers: "
                         "pip install 'qscore[build]' torch") from exc
    hf_logging.disable_progress_bar()  # a build reports its own progress
    cls = AutoModelForSequenceClassification if source.head == "classifier" else AutoModel
    # Eager attention exports to the MatMul/Softmax pattern ONNX Runtime fuses into Attention.
    model = cls.from_pretrained(str(source.path), attn_implementation="eager")
    model.eval()
    torch.set_grad_enabled(False)
    return model


def head_module(source: ModelSource, model: Any) -> Any:
    """Wrap the encoder so its output is the head's output: embeddings or probabilities."""
    import torch

    class SimilarityHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = model

        def forward(self, input_ids, attention_mask, token_type_ids):  # type: ignore[no-untyped-def]
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=-1)

    class ClassifierHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = model

        def forward(self, input_ids, attention_mask, token_type_ids):  # type: ignore[no-untyped-def]
            logits = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).logits
            if logits.shape[-1] == 1:
                return torch.sigmoid(logits[:, 0])
            return torch.softmax(logits, dim=-1)[:, source.positive_label]

    wrapped = SimilarityHead() if source.head == "similarity" else ClassifierHead()
    return wrapped.eval()


def export_onnx(source: ModelSource, out_path: Path) -> Any:
    """Export the model with its head; returns the PyTorch module for the accuracy check."""
    import torch

    module = head_module(source, _load_torch_model(source))
    dummy = torch.ones((2, 8), dtype=torch.long)
    axes = {"batch": 0, "seq": 1}
    dynamic = {name: {axes["batch"]: "batch", axes["seq"]: "seq"} for name in INPUT_NAMES}
    dynamic[OUTPUT_NAME] = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The TorchScript exporter emits the op patterns ORT's BERT fusions recognise.
        torch.onnx.export(
            module, (dummy, dummy, torch.zeros_like(dummy)), str(out_path),
            input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
            dynamic_axes=dynamic, opset_version=OPSET, dynamo=False,
        )
    return module


def optimize_onnx(source: ModelSource, in_path: Path, out_path: Path) -> dict[str, int]:
    """Fuse attention, LayerNorm and GELU with ONNX Runtime's transformer optimiser."""
    from onnxruntime.transformers import optimizer

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    model = optimizer.optimize_model(
        str(in_path), model_type="bert", num_heads=source.num_heads,
        hidden_size=source.hidden_size, opt_level=0,
    )
    stats = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
    model.save_model_to_file(str(out_path))
    return stats
