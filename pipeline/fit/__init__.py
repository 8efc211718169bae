"""Per-element least-squares fit of every weight against training step, with R² histograms.

``kernels`` is the pure arithmetic (the one place R² is computed), ``graph``
the Dask tasks, ``results`` the zarr I/O, ``histograms`` the xarray/CSV
summaries, ``names`` the layer/module parser and ``job.fit_store`` ties them
together. ``pipeline.open_fit`` reads a finished fit.
"""

from __future__ import annotations

from pipeline.fit.job import FitReport, fit_store
from pipeline.fit.results import FitResult, fit_dir_for, open_fit

__all__ = ["FitReport", "FitResult", "fit_dir_for", "fit_store", "open_fit"]
