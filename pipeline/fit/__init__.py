"""Per-element least-squares fit of every weight against training step, with R² histograms.

``pipeline.engine`` is the fused one-pass kernel (R² is computed in
``numba_backend._r2``; ``torch_backend`` mirrors it), ``kernels`` the streaming
numpy fit export uses and the histogram helpers, ``tasks`` the fit tasks,
``results`` the zarr I/O, ``histograms`` the xarray/CSV summaries, ``names``
the layer/module parser and ``job.fit_store`` ties them together.
``pipeline.open_fit`` reads a finished fit.
"""

from __future__ import annotations

from pipeline.fit.job import FitReport, fit_store
from pipeline.fit.results import FitResult, fit_dir_for, open_fit

__all__ = ["FitReport", "FitResult", "fit_dir_for", "fit_store", "open_fit"]
