"""A compact BERT encoder with the head inside, for the PyTorch runtime (GPU, or CPU for tests).

Hugging Face's BertModel builds masks and picks attention kernels with data-dependent Python on
every call, which neither CUDA graphs nor quantized linears tolerate. This module is the same
arithmetic with fixed control flow: one fused QKV projection, `scaled_dot_product_attention`
(PyTorch's fused kernels), and the similarity or classifier head folded in, so the output
matches the ONNX artifacts' contract (L2-normalised embeddings, or positive-class probability).
Weights load from a Hugging Face BERT state dict; other architectures are refused by name.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engines.errors import BuildError

CONFIG_NAME = "encoder.json"
WEIGHTS_NAME = "weights.safetensors"
SUPPORTED_TYPES = ("bert",)
QUANTIZABLE = ("qkv", "attn_out", "ffn_in", "ffn_out")  # per layer; embeddings/head stay float


@dataclass(frozen=True, slots=True)
class EncoderConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position: int
    type_vocab_size: int
    layer_norm_eps: float
    head: str  # "similarity" | "classifier"
    num_labels: int = 0
    positive_label: int = 1

    @classmethod
    def from_hf(cls, config: dict[str, Any], *, head: str, num_labels: int | None = None,
                positive_label: int | None = None) -> EncoderConfig:
        model_type = config.get("model_type", "")
        if model_type not in SUPPORTED_TYPES:
            raise BuildError(f"the torch backend runs BERT-architecture models, not "
                             f"{model_type!r}; use --backend onnxruntime for this model")
        if config.get("hidden_act", "gelu") != "gelu":
            raise BuildError(f"hidden_act {config.get('hidden_act')!r} is not supported by the "
                             "torch backend (exact GELU only)")
        return cls(
            vocab_size=int(config["vocab_size"]), hidden_size=int(config["hidden_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=int(config["num_attention_heads"]),
            intermediate_size=int(config["intermediate_size"]),
            max_position=int(config.get("max_position_embeddings", 512)),
            type_vocab_size=int(config.get("type_vocab_size", 2)),
            layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)), head=head,
            num_labels=int(num_labels or 0),
            positive_label=int(positive_label if positive_label is not None else 1))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def read(cls, path: Path) -> EncoderConfig:
        return cls(**json.loads(Path(path).read_text()))

    @property
    def output_dim(self) -> int:
        return self.hidden_size if self.head == "similarity" else 1

    def parameter_count(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        layer = 4 * h * h + 4 * h + 2 * h * i + i + h + 4 * h
        embed = (self.vocab_size + self.max_position + self.type_vocab_size) * h + 2 * h
        head = (h * h + h + h * max(self.num_labels, 1) + max(self.num_labels, 1)
                if self.head == "classifier" else 0)
        return embed + self.num_layers * layer + head

    def linear_names(self) -> list[str]:
        return [f"layers.{n}.{name}" for n in range(self.num_layers) for name in QUANTIZABLE]


class EncoderLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.heads = cfg.num_heads
        self.qkv = nn.Linear(h, 3 * h)
        self.attn_out = nn.Linear(h, h)
        self.ln1 = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.ffn_in = nn.Linear(h, cfg.intermediate_size)
        self.ffn_out = nn.Linear(cfg.intermediate_size, h)
        self.ln2 = nn.LayerNorm(h, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        qkv = self.qkv(x).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=keep)
        x = self.ln1(x + self.attn_out(attn.transpose(1, 2).reshape(b, s, h)))
        return self.ln2(x + self.ffn_out(F.gelu(self.ffn_in(x))))


class Encoder(nn.Module):
    """input_ids, attention_mask, token_type_ids [b, s] int -> float32 head output."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.word = nn.Embedding(cfg.vocab_size, h)
        self.position = nn.Embedding(cfg.max_position, h)
        self.token_type = nn.Embedding(cfg.type_vocab_size, h)
        self.embed_ln = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))
        if cfg.head == "classifier":
            self.pooler = nn.Linear(h, h)
            self.classifier = nn.Linear(h, max(cfg.num_labels, 1))
        self.register_buffer("position_ids", torch.arange(cfg.max_position), persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        s = input_ids.shape[1]
        x = (self.word(input_ids) + self.position(self.position_ids[:s])
             + self.token_type(token_type_ids))
        x = self.embed_ln(x)
        # Boolean [b, 1, 1, s]: keys each query may attend to (SDPA's fused kernels take it).
        keep = (attention_mask != 0)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, keep)
        if self.cfg.head == "similarity":
            m = attention_mask.unsqueeze(-1).to(torch.float32)
            pooled = (x.float() * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return F.normalize(pooled, p=2.0, dim=-1)
        logits = self.classifier(torch.tanh(self.pooler(x[:, 0]))).float()
        if logits.shape[-1] == 1:
            return torch.sigmoid(logits[:, 0])
        return torch.softmax(logits, dim=-1)[:, self.cfg.positive_label]


def state_from_hf(hf_state: dict[str, torch.Tensor], cfg: EncoderConfig) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face BERT state dict to Encoder's, fusing Q, K and V into one weight."""
    prefix = "bert." if any(k.startswith("bert.") for k in hf_state) else ""

    def take(name: str) -> torch.Tensor:
        key = prefix + name
        if key not in hf_state:
            raise BuildError(f"the model has no {key!r} weight: not a BERT checkpoint the "
                             "torch backend can load")
        return hf_state[key]

    out = {
        "word.weight": take("embeddings.word_embeddings.weight"),
        "position.weight": take("embeddings.position_embeddings.weight"),
        "token_type.weight": take("embeddings.token_type_embeddings.weight"),
        "embed_ln.weight": take("embeddings.LayerNorm.weight"),
        "embed_ln.bias": take("embeddings.LayerNorm.bias"),
    }
    for n in range(cfg.num_layers):
        src, dst = f"encoder.layer.{n}.", f"layers.{n}."
        for part in ("weight", "bias"):
            out[dst + "qkv." + part] = torch.cat(
                [take(f"{src}attention.self.{p}.{part}") for p in ("query", "key", "value")])
            out[dst + "attn_out." + part] = take(f"{src}attention.output.dense.{part}")
            out[dst + "ln1." + part] = take(f"{src}attention.output.LayerNorm.{part}")
            out[dst + "ffn_in." + part] = take(f"{src}intermediate.dense.{part}")
            out[dst + "ffn_out." + part] = take(f"{src}output.dense.{part}")
            out[dst + "ln2." + part] = take(f"{src}output.LayerNorm.{part}")
    if cfg.head == "classifier":
        for part in ("weight", "bias"):
            out["pooler." + part] = take(f"pooler.dense.{part}")
            out["classifier." + part] = hf_state[f"classifier.{part}"]
    return {k: v.detach().contiguous() for k, v in out.items()}


def save_encoder(directory: Path, cfg: EncoderConfig, state: dict[str, torch.Tensor],
                 dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    directory.joinpath(CONFIG_NAME).write_text(cfg.to_json())
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()},
              str(directory / WEIGHTS_NAME))


def read_weights(directory: Path, *, resident: bool = False) -> dict[str, torch.Tensor]:
    """The artifact's weights as host tensors, in their stored dtype.

    Mapped from the file by default (pages are read as they are first touched, and several
    processes share them); `resident` reads every byte now into the process's own memory, so
    the read is over before a copy to the device starts (a hot load times them apart)."""
    from safetensors.torch import load_file

    from engines.load_copy import host_copy

    state = load_file(str(directory / WEIGHTS_NAME), device="cpu")
    return {k: host_copy(v) for k, v in state.items()} if resident else state


def encoder_from_state(cfg: EncoderConfig, state: dict[str, torch.Tensor], *,
                       dtype: torch.dtype, device: torch.device | str,
                       where: Path | str = "weights") -> Encoder:
    """The Encoder over `state` (tensors already on `device`), cast to `dtype` there."""
    with torch.device("meta"):
        model = Encoder(cfg)
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise BuildError(f"{where}: weights are missing {sorted(missing)[:5]}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    model.position_ids = torch.arange(cfg.max_position, device=device)
    return model.eval().requires_grad_(False)


def load_encoder(directory: Path, *, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> Encoder:
    """Build the Encoder from an artifact directory, weights cast to `dtype` on `device`
    (read straight onto the device: the simple path, for builds and as the tests' reference;
    the runtime reads to host and copies in paced chunks, engines.load_copy)."""
    from safetensors.torch import load_file

    cfg = EncoderConfig.read(directory / CONFIG_NAME)
    state = load_file(str(directory / WEIGHTS_NAME), device=str(device))
    return encoder_from_state(cfg, state, dtype=dtype, device=device, where=directory)
