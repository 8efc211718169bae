#!/usr/bin/env bash
# Prepare, on this machine, what benchmarks/gpu.sh needs on a lent GPU machine that cannot
# reach a package registry: wheels (for its Python 3.12) of what its image lacks, in
# .gpu-wheels/ (ignored by git; carry it with .cache/tiny-runs). torch, numba, numpy,
# safetensors, transformers, xarray, typer, psutil, rich, ml-dtypes and xxhash are there.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu-wheels && mkdir -p .gpu-wheels
.venv/bin/python -m pip download -q -d .gpu-wheels --only-binary=:all: \
  --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 --platform any \
  "dask[distributed]" "zarr>=3.0,<3.2" numcodecs pydantic pyyaml pytest hypothesis tqdm
# never replace the image's own builds of these
rm -f .gpu-wheels/numpy-* .gpu-wheels/ml_dtypes-* .gpu-wheels/typing_extensions-*
du -sh .gpu-wheels
