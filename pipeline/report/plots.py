"""Figures of the fit report (matplotlib): each function returns PNG bytes.

They take the histogram Datasets from ``pipeline.fit.histograms`` and a few
raw trajectories; nothing here computes R² (that is ``pipeline.engine``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from pipeline.fit.histograms import by_layer_module, hist_median, overall
from pipeline.fit.names import NO_LAYER, module_rank

REAL = "#0072B2"
NULL = "#D55E00"


def subplots(rows: int = 1, cols: int = 1, **kw: object) -> tuple[Figure, object]:
    """A figure and its axes without pyplot: no global backend is chosen or changed.

    ``matplotlib.use`` at import time would override the user's backend in
    their notebook; a bare ``Figure`` renders PNG through Agg on its own.
    """
    fig = Figure(figsize=kw.pop("figsize", None))  # type: ignore[arg-type]
    return fig, fig.subplots(rows, cols, **kw)  # type: ignore[arg-type]


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def r2_histogram(ds: xr.Dataset) -> bytes:
    """Overall R² histogram (density) with the sign-flipped null overlaid."""
    tot = overall(ds)
    lo, hi = ds.bin_lo.values, ds.bin_hi.values
    width = hi - lo
    n = max(int(tot.n_selected), 1)
    fig, ax = subplots(figsize=(7, 4))
    real = np.asarray(tot["count"]) / n / width
    null = np.asarray(tot["null_count"]) / n / width
    ax.bar(lo, real, width=width, align="edge", color=REAL, alpha=0.75,
           label=f"weights (median {hist_median(np.asarray(tot['count'])):.2f})")
    ax.step(np.r_[lo, hi[-1]], np.r_[null, null[-1]], where="post", color=NULL, lw=2,
            label=f"null: random-sign increments (median "
                  f"{hist_median(np.asarray(tot['null_count'])):.2f})")
    ax.set_xlim(0, 1)
    ax.set_xlabel("R² of weight vs step")
    ax.set_ylabel("density")
    ax.set_title(f"{int(tot.n_selected):,} elements ({ds.attrs.get('selection', '')}); "
                 f"{int(tot.n_static):,} static not shown")
    ax.legend(loc="upper left", frameon=False)
    return png(fig)


def layer_module_heatmap(ds: xr.Dataset) -> bytes:
    """Median R² per layer (columns; '-' for embeddings/head/final norm) x module (rows)."""
    lm = by_layer_module(ds)
    layers = sorted({int(v) for v in lm.layer.values}, key=lambda v: (v == NO_LAYER, v))
    modules = sorted({str(v) for v in lm.module.values}, key=module_rank)
    grid = np.full((len(modules), len(layers)), np.nan)
    for i in range(lm.sizes["group"]):
        g = lm.isel(group=i)
        grid[modules.index(str(g.module.values)), layers.index(int(g.layer))] = hist_median(
            np.asarray(g["count"]))
    fig, ax = subplots(figsize=(max(5, 0.45 * len(layers) + 3), max(3, 0.35 * len(modules)
                                                                        + 1.5)))
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(layers)), [str(v) if v != NO_LAYER else "-" for v in layers])
    ax.set_yticks(range(len(modules)), modules)
    ax.set_xlabel("layer")
    if grid.size <= 400:
        for (r, c), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v > 0.6 else "black")
    fig.colorbar(im, ax=ax, label="median R²")
    ax.set_title("median R² by layer x module")
    return png(fig)


def static_fractions(ds: xr.Dataset, max_rows: int = 120) -> bytes:
    """Fraction of never-moving elements per tensor (per layer x module if too many tensors)."""
    if ds.sizes["tensor"] <= max_rows:
        labels = [str(t) for t in ds.tensor.values]
        frac = np.asarray(ds.n_static) / np.maximum(np.asarray(ds.n_elements), 1)
    else:
        lm = by_layer_module(ds)
        labels = [f"L{int(a)} {m}" if int(a) != NO_LAYER else str(m)
                  for a, m in zip(lm.layer.values, lm.module.values, strict=True)]
        frac = np.asarray(lm.n_static) / np.maximum(np.asarray(lm.n_elements), 1)
    fig, ax = subplots(figsize=(7, max(2.5, 0.18 * len(labels) + 1)))
    y = np.arange(len(labels))
    ax.barh(y, frac, color=REAL)
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, max(0.05, float(frac.max(initial=0)) * 1.1))
    ax.set_xlabel("static fraction (never changed in the window)")
    ax.set_title("static elements per tensor")
    return png(fig)


@dataclass(frozen=True)
class Trajectory:
    """One element's values over the window, and its fit."""

    tensor: str
    index: tuple[int, ...]
    steps: np.ndarray
    values: np.ndarray
    slope: float
    intercept: float
    r2: float
    null_r2: float


def trajectories(samples: list[Trajectory]) -> bytes:
    """Sampled element trajectories (points) with their fitted lines."""
    n = max(1, len(samples))
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.ravel()[len(samples):]:
        ax.axis("off")
    for ax, t in zip(axes.ravel(), samples, strict=False):
        ax.plot(t.steps, t.values, "o", color=REAL, ms=4, label="weight")
        ax.plot(t.steps, t.intercept + t.slope * t.steps, "--", color=NULL, lw=1.5,
                label="least squares")
        short = t.tensor.replace("model.", "").replace(".weight", "")
        ax.set_title(f"{short}{list(t.index)}\nR² {t.r2:.3f} (null {t.null_r2:.3f})",
                     fontsize=8)
        ax.tick_params(labelsize=7)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes.ravel()[0].legend(fontsize=7, frameon=False)
    fig.supxlabel("training step")
    fig.tight_layout()
    return png(fig)
