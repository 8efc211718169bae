"""Importing the package changes nothing global: a user's notebook keeps its backend and filters."""

from __future__ import annotations

import os
import subprocess
import sys

# Third-party libraries add their own warning filters when imported (zarr, torch, sympy):
# they are imported first, so only what the package itself changes is seen.
SCRIPT = r"""
import importlib, pkgutil, warnings, matplotlib
for dep in ("zarr", "numcodecs", "torch", "transformers", "trl", "datasets", "dask",
            "distributed", "xarray", "sympy", "safetensors", "transformers.modeling_utils",
            "trl.trainer.grpo_trainer"):
    importlib.import_module(dep)
matplotlib.use("svg")
filters = list(warnings.filters)
import pipeline
names = sorted(m.name for m in pkgutil.walk_packages(pipeline.__path__, "pipeline.")
               if m.name != "pipeline.__main__")  # that one runs the CLI
for name in names:
    importlib.import_module(name)
    assert matplotlib.get_backend() == "svg", (name, matplotlib.get_backend())
    assert list(warnings.filters) == filters, (name, warnings.filters[:2])
print(len(names))
"""


def test_importing_every_module_leaves_backend_and_warning_filters_alone():
    env = {**os.environ, "PYTHONWARNINGS": ""}
    env.pop("MPLBACKEND", None)
    p = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert int(p.stdout.split()[-1]) > 40  # every module was imported, not an empty walk
