"""bench/engine_gpu.py end to end on CPU (--quick): every part runs and returns its rows.

The GPU figures come from a GPU host (scripts/gpu_check.sh); this only proves the script. To
stay fast, part b runs on a tiny random BERT instead of the default model (same code path)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.common import BENCHMARKS_MD
from bench.engine_gpu import JSON_PATH, main, random_bert
from engines.source import default_model_path

pytestmark = pytest.mark.slow


def _snapshot(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


def test_quick_cpu_run_has_every_part_and_writes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = random_bert(tmp_path / "tiny-bert", default_model_path(), quick=True)
    before = _snapshot(BENCHMARKS_MD), _snapshot(JSON_PATH)
    result = main(["--device", "cpu", "--quick", "--seq", "64", "--n", "80", "--iters", "2",
                   "--warmup", "0", "--precisions", "fp16,int8", "--model", str(model),
                   "--max-drop", "0.3", "--engine-root", str(tmp_path / "engines")])
    printed = capsys.readouterr().out

    meta = result["meta"]
    # --device cpu: no device name or capability is read, whatever the host has; "cuda" is the
    # CUDA version torch was built with ("none" for a CPU-only build, as here).
    assert (meta["device"], meta["device_name"], meta["capability"]) == ("cpu", "CPU only", "n/a")
    assert meta["cuda"] == (torch.version.cuda or "none")
    synthetic = result["synthetic"]
    for batch in (10, 64):
        engines = [r["engine"] for r in synthetic if r["batch"] == batch]
        assert engines[0].startswith("HF BertModel eager")
        assert any("FP16" in e for e in engines) and any("INT8" in e for e in engines)
        assert any("2 lanes" in e for e in engines)
    assert all(r["seq_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0 for r in synthetic)
    # Same weights, same inputs: our engine computes what Hugging Face does.
    assert all(r["min_cos_vs_hf"] > 0.999 for r in synthetic)

    real = result["real"]
    assert real[0]["engine"].startswith("HF AutoModel eager")
    assert {(r.get("precision"), r.get("lanes")) for r in real[1:]} == {
        ("fp16", 1), ("fp16", 2), ("int8", 1), ("int8", 2)}
    assert all(r["items_per_s"] > 0 for r in real)
    assert all(r["min_cos"] > 0.999 for r in real if r.get("precision") == "fp16")

    assert len(result["memory"]) == 8  # one load per engine row: 4 in part a, 4 in part b
    assert all(m["estimate_mib"] > 0 and m["ok"] is None for m in result["memory"])
    names = [c["check"] for c in result["checks"]]
    assert any("two lanes" in n for n in names) and any("batch 64" in n for n in names)
    assert "## GPU engine" in printed and "PASS" in printed
    assert (_snapshot(BENCHMARKS_MD), _snapshot(JSON_PATH)) == before  # no --write on CPU
