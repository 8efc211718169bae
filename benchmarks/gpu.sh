#!/usr/bin/env bash
# On a lent GPU machine (under 8 minutes): the GPU tests, then the scale benchmark with the
# torch backend on the GPU beside the CPU's numba, with its floors. Prepared here by
# benchmarks/gpu_wheels.sh; run through the device tool as
#   run(command="bash benchmarks/gpu.sh", carry=[".gpu-wheels", ".cache/tiny-runs"], timeout_s=540)
# Results go to $OUT (gpu-tests.txt, gpu-scale.txt) when set, else to stdout only.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUTDIR=${OUT:-/tmp/gpu-out}; mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUTDIR/gpu.txt"
if [ -d .gpu-wheels ]; then
  $PY -m pip install -q --no-index --no-deps .gpu-wheels/*.whl 2>&1 | tail -3
fi
export PYTHONPATH=$PWD RLVR_LIN_TEST_CACHE=$PWD/.cache/tiny-runs
timeout 200 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -rs 2>&1 \
  | tail -25 | tee "$OUTDIR/gpu-tests.txt"
# 4 and 8 layers of Qwen2.5-1.5B's shapes, 4 steps (~3.5 and ~5 GB): CPU numba on 16
# worker processes vs the torch backend on the GPU
timeout 300 $PY benchmarks/scale.py --workdir /tmp/rlvr-scale --layers 4 8 --steps 4 \
  --workers 16 --memory-limit 6GB --backends numba torch 2>&1 \
  | grep -v "^INFO\|WARNING" | tee "$OUTDIR/gpu-scale.txt"
