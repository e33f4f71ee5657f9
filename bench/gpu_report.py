"""Targets and tables of bench/engine_gpu.py: PASS/FAIL lines and the docs/benchmarks.md section."""

from __future__ import annotations

from typing import Any

from bench.common import markdown_table

# From the issue: FP16 per-item cosine, INT8/FP8 budget, speed-ups at seq 256 over HF eager
# FP16, and two lanes over one (FP16 with graphs, batch 10).
TARGETS = {"fp16_min_cosine": 0.999, "quant_mean_cosine": 0.995, "quant_p1_cosine": 0.98,
           "speedup_batch10": 4.0, "speedup_batch64": 1.5, "two_lanes": 1.2}


def checks(synthetic: list[dict[str, Any]], real: list[dict[str, Any]],
           memory: list[dict[str, Any]], failures: list[str]) -> list[dict[str, Any]]:
    out = [{"check": f, "ok": False} for f in failures]

    def add(name: str, ok: bool, value: str) -> None:
        out.append({"check": name, "ok": bool(ok), "value": value})

    for r in real:
        if r.get("precision") == "fp16":
            add(f"real: {r['engine']} min cosine >= {TARGETS['fp16_min_cosine']}",
                r["min_cos"] >= TARGETS["fp16_min_cosine"], f"{r['min_cos']:.6f}")
        elif r.get("precision") in ("int8", "fp8"):
            add(f"real: {r['engine']} mean cosine >= {TARGETS['quant_mean_cosine']} and p1 "
                f">= {TARGETS['quant_p1_cosine']}",
                r["mean_cos"] >= TARGETS["quant_mean_cosine"]
                and r["p1_cos"] >= TARGETS["quant_p1_cosine"],
                f"mean {r['mean_cos']:.6f}, p1 {r['p1_cos']:.6f}")
    ours = [r for r in synthetic if "precision" in r]
    for batch, key in ((10, "speedup_batch10"), (64, "speedup_batch64")):
        mine = [r for r in ours if r["batch"] == batch]
        if mine:
            best = max(mine, key=lambda r: r["speedup"])
            add(f"seq {best['seq']} batch {batch}: best of ours vs HF eager >= "
                f"{TARGETS[key]}x", best["speedup"] >= TARGETS[key],
                f"{best['speedup']:.2f}x ({best['engine']})")
    graphs = any(r["graphs"] for r in ours)  # on CPU no row has graphs
    pick = {r["lanes"]: r for r in ours if r["batch"] == 10 and r["precision"] == "fp16"
            and r["graphs"] == graphs}
    if 1 in pick and 2 in pick:
        ratio = pick[2]["seq_per_s"] / pick[1]["seq_per_s"]
        add(f"batch 10, FP16: two lanes >= {TARGETS['two_lanes']}x one lane",
            ratio >= TARGETS["two_lanes"], f"{ratio:.2f}x")
    for m in memory:
        if m["ok"] is not None:
            add(f"memory: {m['part']} {m['engine']} estimate >= measured peak", m["ok"],
                f"estimate {m['estimate_mib']} MiB, peak {m['peak_allocated_mib']} MiB")
    return out


def tables(result: dict[str, Any]) -> str:
    meta = result["meta"]
    parts = ["## GPU engine (`bench/engine_gpu.py`)\n",
             f"Device: {meta['device_name']} ({meta['device']}, compute capability "
             f"{meta['capability']}); torch {meta['torch']}, CUDA {meta['cuda']}, transformers "
             f"{meta['transformers']}; host {meta['machine']}; {meta['date']}.\n"]
    if result["synthetic"]:
        parts += [
            f"### a. Random-weight BERT {meta['synthetic_shape']}, fixed random ids, full "
            "masks\n",
            "A call is one batch through the model with mean pooling and normalisation, numpy "
            "in and host numpy out (H2D and D2H copies included), timed with a wall clock; "
            f"{meta['iters']} timed calls per row after {meta['warmup']} warm-up calls (per "
            "lane), shared out over the lanes' threads. bucket: the shape our engine pads the "
            "batch to. min cos vs HF: our output against the HF row's on the same batch.\n",
            markdown_table(
                ["engine", "batch x seq", "bucket", "sequences/s", "p50 ms", "p99 ms",
                 "vs HF eager", "min cos vs HF"],
                [[r["engine"], f"{r['batch']} x {r['seq']}", r.get("bucket", "-"),
                  f"{r['seq_per_s']:,.0f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
                  f"{r['speedup']:.2f}x", f"{r['min_cos_vs_hf']:.4f}"]
                 for r in result["synthetic"]]) + "\n"]
    if result["real"]:
        parts += [
            "### b. Default model, real queries\n",
            f"Model: {meta['model_id']} (`{meta['model']}`). {meta['real_data']}. Each row "
            "runs every batch once untimed, then once timed (two lanes: two threads pulling "
            "from one queue). Cosine per item against HF AutoModel FP32 on the same device.\n",
            markdown_table(
                ["engine", "items/s", "p50 batch ms", "p99 batch ms", "vs HF eager",
                 "mean cos", "p1 cos", "min cos"],
                [[r["engine"], f"{r['items_per_s']:,.0f}", f"{r['p50_ms']:.2f}",
                  f"{r['p99_ms']:.2f}", f"{r['speedup']:.2f}x", f"{r['mean_cos']:.6f}",
                  f"{r['p1_cos']:.6f}", f"{r['min_cos']:.6f}"] for r in result["real"]]) + "\n"]
    if result["memory"]:
        parts += [
            "### c. Device memory per engine\n",
            "Caching-allocator peak (torch.cuda.max_memory_allocated) from before the load "
            "until after graph capture, against the engine's estimate (`memory_bytes`); "
            "held: still allocated after the load; reserved: what the allocator then holds "
            "from the device.\n",
            markdown_table(
                ["part", "engine", "load + capture s", "estimate MiB", "peak allocated MiB",
                 "held MiB", "reserved MiB", "estimate covers the peak"],
                [[m["part"], m["engine"], f"{m['load_s']:.1f}", f"{m['estimate_mib']:,}",
                  _na(m["peak_allocated_mib"]), _na(m["held_mib"]), _na(m["reserved_mib"]),
                  {True: "yes", False: "NO", None: "n/a"}[m["ok"]]]
                 for m in result["memory"]]) + "\n"]
    parts += ["### Targets\n", "\n".join(
        f"- {'PASS' if c['ok'] else 'FAIL'}: {c['check']}"
        + (f" ({c['value']})" if c.get("value") else "") for c in result["checks"]) + "\n",
              f"Command: `{meta['command']}`"]
    return "\n".join(parts) + "\n"


def _na(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,}"
