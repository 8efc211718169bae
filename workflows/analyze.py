"""Ingest, fit, report and extrapolate one run on any cluster: ``rlvr-lin analyze`` as a script.

For batch submission where the CLI is not on PATH, e.g. on a SLURM login node:

    python workflows/analyze.py NAME --cluster workflows/clusters/slurm.yaml

(the scheduler runs in this process; workers are sbatch jobs). Same options
as ``rlvr-lin analyze --help``; errors are one line and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone, uninstalled

from pipeline.cli import app  # noqa: E402

if __name__ == "__main__":
    app(args=["analyze", *sys.argv[1:]], prog_name="workflows/analyze.py")
