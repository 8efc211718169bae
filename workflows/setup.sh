#!/usr/bin/env bash
# Create ./.venv with everything the pipeline and its tests need, from nothing
# but Python 3.11 and pip. Idempotent: re-running only reinstalls when
# pyproject.toml changed. The CPU build of torch is pinned and installed first
# so that no multi-GB CUDA build is pulled in as a dependency.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
# numba's kernels compiled into its on-disk cache (pipeline/**/__pycache__) at install, not
# by the first job or test session (~90 s on 2 cores); a no-op load once they are there
warm() { .venv/bin/python -c "from pipeline.engine import warm_all; warm_all()"; }
if [ -f "$stamp" ]; then warm; exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e ".[dev]"
rm -f .venv/.installed-*
touch "$stamp"
warm
echo "setup: .venv ready" >&2
