#!/usr/bin/env bash
# Run ON a GPU host, from the repo root, with .whl/ and .carry/ (scripts/gpu_kit.sh) carried:
#
#   bash scripts/gpu_check.sh [all|tests|bench] [extra bench/engine_gpu.py arguments]
#
# Installs the carried wheels into /tmp/site, unpacks the carried FP16 default model into
# /tmp/all-MiniLM-L6-v2-fp16 (exported as QSCORE_TEST_MODEL), prints the GPU and versions, runs
# `pytest tests/gpu` and then `bench/engine_gpu.py` (which rewrites docs/benchmarks.md and
# docs/engine_gpu.json), and copies those two files and the logs into $OUT when it is set.
# Exit status: 2 if the set-up failed, 1 if the tests or the bench failed, else 0.
# What each step proves: docs/gpu_check.md.
set -uo pipefail
cd "$(dirname "$0")/.."
step=${1:-all}
[ $# -gt 0 ] && shift
logs=/tmp/qscore-gpu-logs
mkdir -p "$logs"

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || { echo "gpu_check: installing .whl/*.whl failed"; exit 2; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1

model=/tmp/all-MiniLM-L6-v2-fp16  # its name is the model id the bench and builds report
if [ ! -f "$model/model.safetensors" ]; then
  mkdir -p "$model" && cp -r .carry/minilm-fp16/. "$model/" && python3 - "$model" <<'EOF' || exit 2
import lzma, shutil, sys
from pathlib import Path
packed = Path(sys.argv[1]) / "model.safetensors.xz"
with lzma.open(packed) as src, open(packed.with_suffix(""), "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
packed.unlink()
EOF
fi
export QSCORE_TEST_MODEL=$model

{
  nvidia-smi
  python3 - <<'EOF'
import sys
import pytest, torch, transformers, onnxruntime, aiokafka, pytest_asyncio
from packaging.version import Version
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}, onnxruntime {onnxruntime.__version__}, "
      f"pytest {pytest.__version__}, pytest-asyncio {pytest_asyncio.__version__}, "
      f"aiokafka {aiokafka.__version__}")
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA GPU")
p = torch.cuda.get_device_properties(0)
print(f"{p.name}: compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
      f"{p.multi_processor_count} SMs")
if Version(pytest.__version__) < Version("8.4"):
    sys.exit(f"gpu_check: pytest-asyncio 1.5 needs pytest >= 8.4, the host has {pytest.__version__}")
EOF
} 2>&1 | tee "$logs/env.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 2

rc_tests=0 rc_bench=0
if [ "$step" = all ] || [ "$step" = tests ]; then
  python3 -m pytest -q -rs -p no:cacheprovider --durations=15 tests/gpu 2>&1 \
    | tee "$logs/pytest_gpu.log"
  rc_tests=${PIPESTATUS[0]}
fi
if [ "$step" = all ] || [ "$step" = bench ]; then
  python3 bench/engine_gpu.py --queries .carry/msmarco_dev_small_queries.tsv "$@" 2>&1 \
    | tee "$logs/bench_gpu.log"
  rc_bench=${PIPESTATUS[0]}
fi

if [ -n "${OUT:-}" ]; then
  cp "$logs"/*.txt "$logs"/*.log "$OUT"/ 2>/dev/null
  cp docs/benchmarks.md docs/engine_gpu.json "$OUT"/ 2>/dev/null
  ls -la "$OUT"
fi
echo "gpu_check: tests exit $rc_tests, bench exit $rc_bench"
[ "$rc_tests" -eq 0 ] && [ "$rc_bench" -eq 0 ]
