#!/usr/bin/env bash
# GPU checks and timings of the segmented LoRA kernels, for a machine with a CUDA device, CuPy and
# torch but no Rust toolchain and no network. The wheel is built beforehand where Rust is
# (`maturin build --release`, into target/wheels) and carried along with the checkout.
#
#   bash benches/gpu_suite.sh [OUT_DIR]     # OUT_DIR defaults to $OUT, else /tmp/chunkwise-gpu
#
# Installs the newest target/wheels/chunkwise-*.whl into /tmp/site (no dependencies, no index),
# runs tests/test_kernels.py with the GPU tests required (a missing device fails instead of
# skipping), then python -m benches.gpu_timing. Logs, JUnit XML and JSON timings go to OUT_DIR; the
# exit status is the tests', else the timing's.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT_DIR=${1:-${OUT:-/tmp/chunkwise-gpu}}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1

wheel=$(ls -t target/wheels/chunkwise-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
    echo "no wheel in target/wheels: run 'maturin build --release' where Rust is, and carry target/wheels" >&2
    exit 2
fi
echo "== installing $wheel into /tmp/site"
rm -rf /tmp/site
"$PY" -m pip install -q --no-deps --no-index --no-compile --target /tmp/site "$wheel"
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}

echo "== device and versions"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true
"$PY" - <<'PYEOF' 2>&1 | tee "$OUT_DIR/env.txt" || true
import torch
import chunkwise
import chunkwise.kernels as k
print("chunkwise", chunkwise.__version__, "from", chunkwise.__file__)
print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
try:
    import cupy
    print("cupy", cupy.__version__, "CUDA runtime", cupy.cuda.runtime.runtimeGetVersion())
except Exception as exc:
    print("cupy:", type(exc).__name__, exc)
print("kernels unavailable because:", k.cuda_unavailable_reason())
print("include dirs:", k.cuda_include_dirs())
PYEOF

echo "== tests/test_kernels.py (GPU tests required)"
set +e
CHUNKWISE_REQUIRE_GPU=1 "$PY" -m pytest tests/test_kernels.py -q -rs -p no:cacheprovider \
    --junitxml="$OUT_DIR/gpu_tests.xml" 2>&1 | tee "$OUT_DIR/gpu_tests.log"
rc_tests=${PIPESTATUS[0]}

echo "== python -m benches.gpu_timing"
"$PY" -m benches.gpu_timing --out "$OUT_DIR/gpu_timing.json" 2>&1 | tee "$OUT_DIR/gpu_timing.log"
rc_timing=${PIPESTATUS[0]}
set -e

echo "== tests rc=$rc_tests, timing rc=$rc_timing; logs in $OUT_DIR"
if [ "$rc_tests" -ne 0 ]; then exit "$rc_tests"; fi
exit "$rc_timing"
