"""Token panels for the report: token R² beside its null, and example log-prob trajectories.

Each panel is written as a PNG so ``pipeline.report.html.write_report``
can take them as ``extra_images``; nothing here computes R² (the fit engine
does, ``pipeline.outputs.token_fit`` tabulates it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.outputs.logprob_store import LogprobStore
from pipeline.report.plots import NULL, REAL, png, subplots

BIN_EDGES = np.linspace(0.0, 1.0, 41)
R2_PNG = "token_r2.png"
TRAJECTORIES_PNG = "token_trajectories.png"


def r2_panel(table: Any, min_change: float) -> bytes:
    """Log-prob R² histograms (density) with the sign-flipped null: all tokens, filtered."""
    fig, axes = subplots(1, 2, figsize=(11, 3.8), squeeze=False)
    keep = table["selected"].to_numpy()
    for ax, (title, mask) in zip(axes[0], (("all tokens", np.ones_like(keep)),
                                           (f"|logp(last) - logp(first)| > {min_change:g}",
                                            keep)), strict=True):
        r2 = table["logprob_r2"].to_numpy(np.float64)[mask]
        null = table["logprob_null_r2"].to_numpy(np.float64)[mask]
        fitted = np.isfinite(r2)
        r2, null = r2[fitted], null[fitted]
        if r2.size:
            ax.hist(r2, bins=BIN_EDGES, density=True, color=REAL, alpha=0.75,
                    label=f"tokens (median {np.median(r2):.2f})")
            ax.hist(null, bins=BIN_EDGES, density=True, histtype="step", color=NULL, lw=2,
                    label=f"null: random-sign increments (median {np.median(null):.2f})")
            ax.legend(loc="upper left", frameon=False, fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_xlabel("R² of token log-prob vs step")
        ax.set_title(f"{title}: {r2.size:,} tokens, {int((~fitted).sum()):,} static",
                     fontsize=9)
    axes[0][0].set_ylabel("density")
    return png(fig)


def pick_examples(table: Any, n: int) -> list[int]:
    """Up to ``n`` tokens spread over the R² range (selected ones first), lowest to highest."""
    r2 = table["logprob_r2"].to_numpy(np.float64)
    pool = np.flatnonzero(table["selected"].to_numpy() & np.isfinite(r2))
    if pool.size == 0:
        pool = np.flatnonzero(np.isfinite(r2))
    if pool.size == 0 or n <= 0:
        return []
    ordered = pool[np.argsort(r2[pool], kind="stable")]
    at = np.unique(np.linspace(0, ordered.size - 1, min(n, ordered.size)).round().astype(int))
    return [int(ordered[i]) for i in at]


def trajectory_panel(store: LogprobStore, table: Any, steps: list[int], n: int = 6) -> bytes:
    """Example tokens: log-prob at each checkpoint, the fitted line, the token in context."""
    picks = pick_examples(table, n)
    cols = max(1, min(3, len(picks)))
    rows = max(1, -(-len(picks) // cols))
    fig, axes = subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.ravel()[len(picks):]:
        ax.axis("off")
    pos = [store.steps.index(s) for s in steps]
    values = store.values("logprob")[pos]
    x = np.asarray(steps, np.float64)
    for ax, k in zip(axes.ravel(), picks, strict=False):
        row = table.iloc[k]
        ax.plot(x, values[:, k], "o", color=REAL, ms=4, label="log-prob")
        fit = row["logprob_intercept"] + row["logprob_slope"] * (x - x[0])
        ax.plot(x, fit, "--", color=NULL, lw=1.5, label="least squares")
        ax.set_title(f"{store.tokens.context(k)!r} -> {str(row['text'])!r}\n"
                     f"probe {int(row['probe'])}, token {int(row['position'])}: "
                     f"R² {row['logprob_r2']:.3f} (null {row['logprob_null_r2']:.3f})",
                     fontsize=8)
        ax.tick_params(labelsize=7)
    if picks:
        axes.ravel()[0].legend(fontsize=7, frameon=False)
    fig.supxlabel("training step")
    fig.supylabel("log-prob of the token")
    fig.tight_layout()
    return png(fig)


def write_token_panels(store: str | Path, fit: Any, out: str | Path,
                       n_examples: int = 6) -> list[tuple[str, Path]]:
    """Both panels as PNGs in ``out``: (title, path) pairs for ``write_report(extra_images=)``.

    ``fit`` is a ``pipeline.outputs.token_fit.TokenFit``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lps = LogprobStore(store)
    r2_path, traj_path = out / R2_PNG, out / TRAJECTORIES_PNG
    r2_path.write_bytes(r2_panel(fit.table, fit.min_change))
    traj_path.write_bytes(trajectory_panel(lps, fit.table, fit.steps, n_examples))
    return [("Token log-prob R² (teacher-forced probes) vs the null", r2_path),
            ("Example token log-prob trajectories", traj_path)]
