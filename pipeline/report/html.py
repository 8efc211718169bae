"""The fit report: one self-contained HTML page (PNGs embedded as base64), no server needed.

Inputs are the finished fit (histograms and per-element results) and the
store, from which only a handful of element trajectories are read.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from pipeline.console import progress_bar
from pipeline.errors import PipelineError, check_output
from pipeline.fit.histograms import summary_frames
from pipeline.fit.job import element_results
from pipeline.fit.names import display_name
from pipeline.fit.results import NULL_FIELD, FitResult
from pipeline.fit.source import StoreRef
from pipeline.report import plots

PAGE = "index.html"


def sample_trajectories(store: str | Path, fit: FitResult, selection_ds, n: int,
                        seed: int = 0) -> list[plots.Trajectory]:
    """``n`` moving elements spread over R² quantiles, from the tensors with most elements.

    Reads one row (all steps) per sample from the store, nothing more.
    """
    from pipeline.store.reader import open_run

    if n <= 0:
        return []
    src = open_run(store)
    steps = fit.steps
    positions = list(steps)  # read_block takes a list of training steps
    ds = selection_ds
    order = np.argsort(-np.asarray(ds.n_selected), kind="stable")
    raw = {display_name(t): t for t in fit.tensor_names}  # histograms hold display names
    names = [raw.get(str(ds.tensor.values[i]), str(ds.tensor.values[i]))
             for i in order if int(ds.n_selected[i]) > 0][:n]
    rng = np.random.default_rng(seed)
    out: list[plots.Trajectory] = []
    quantiles = np.linspace(0.1, 0.9, n)
    for k in range(n):
        if not names:
            break
        name = names[k % len(names)]
        res = fit[name]
        shape = src.shape(name)
        r2 = np.asarray(res.r2.values).reshape(-1)
        ok = np.flatnonzero(np.isfinite(r2))
        if ok.size == 0:
            continue
        target = np.quantile(r2[ok], quantiles[k])
        near = ok[np.argsort(np.abs(r2[ok] - target), kind="stable")[:50]]
        flat = int(rng.choice(near))
        idx = np.unravel_index(flat, shape) if shape else ()
        rows = slice(int(idx[0]), int(idx[0]) + 1) if shape else None
        block = src.read_block(name, positions, rows).astype(np.float64)
        col = int(np.ravel_multi_index((0, *idx[1:]), (1, *shape[1:]))) if shape else 0
        values = block.reshape(len(positions), -1)[:, col]
        at = [float(np.asarray(res[v].values).reshape(-1)[flat])
              for v in ("slope", "intercept", "r2")]
        if NULL_FIELD in res:
            null = float(np.asarray(res[NULL_FIELD].values).reshape(-1)[flat])
        else:  # a fit without each element's null: fit the sampled element's row again
            again = element_results(fit, name, int(idx[0]) if shape else 0, StoreRef.of(store))
            null = float(again[NULL_FIELD][col])
        out.append(plots.Trajectory(display_name(name), tuple(int(i) for i in idx),
                                    np.asarray(steps, float), values, *at, null))
    return out


REPORT_FILES = (PAGE, "backtest.csv", "backtest.png")  # what a report writes into its folder


def check_report_out(store: str | Path, fit_dir: str | Path, out: str | Path) -> None:
    """Refuse a report folder inside the store, the fit's arrays or a checkpoint folder."""
    from pipeline.fit.results import ELEMENTS, HISTOGRAMS
    from pipeline.fit.source import store_inputs
    from pipeline.store.reader import open_run

    fit_dir = Path(fit_dir)
    try:
        src = open_run(store)
    except PipelineError:
        src = None  # only the trajectories need the store; its path is still protected
    inputs = [("the fit's arrays", fit_dir / ELEMENTS),
              ("the fit's histograms", fit_dir / HISTOGRAMS), *store_inputs(store, src)]
    check_output(out, inputs, writes=REPORT_FILES)


def _img(png: bytes, alt: str) -> str:
    return (f'<img alt="{html.escape(alt)}" src="data:image/png;base64,'
            f'{base64.b64encode(png).decode()}">')


def write_report(store: str | Path, fit_dir: str | Path, out: str | Path, *,
                 paper_filters: bool = False, n_samples: int = 6,
                 progress: Callable[[str], None] | None = None,
                 extra_images: Sequence[tuple[str, Path]] = ()) -> Path:
    """Render the report into ``out/index.html`` and return its path.

    ``extra_images`` are (title, PNG path) pairs made by other stages (the
    backtest), embedded after the fit's own figures so the page stays one file.
    """
    fit = FitResult(fit_dir)
    check_report_out(store, fit_dir, out)
    selection = "paper" if paper_filters else "moving"
    ds = fit.histograms(selection)
    if ds.sizes["tensor"] == 0:
        raise PipelineError("the fit has no tensors", fit_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    frames = summary_frames(ds)
    sections: list[str] = []
    jobs: list[tuple[str, Callable[[], str]]] = [
        ("R² histogram", lambda: _img(plots.r2_histogram(ds), "R² histogram with null")),
        ("Median R² by layer x module", lambda: _img(plots.layer_module_heatmap(ds), "heatmap")),
        ("Static elements", lambda: _img(plots.static_fractions(ds), "static fractions")),
        ("Sampled trajectories", lambda: _img(plots.trajectories(
            sample_trajectories(store, fit, ds, n_samples)), "trajectories")),
    ]
    jobs += [(title, lambda p=png, t=title: _img(Path(p).read_bytes(), t))
             for title, png in extra_images]
    for title, make in progress_bar(desc="report", iterable=jobs):
        sections.append(f"<h2>{html.escape(title)}</h2>\n{make()}")
    tot = frames["overall"].iloc[0]
    lead = (f"{int(tot.n_selected):,} of {int(tot.n_elements):,} elements "
            f"({'after the authors filters' if paper_filters else 'every element that moved'}); "
            f"{int(tot.n_static):,} static ({tot.static_fraction:.2%}). Median R² "
            f"{tot['median']:.3f} vs {tot.null_median:.3f} for the sign-flipped null; "
            f"{tot['frac_gt_0.7']:.1%} above 0.7 (null {tot['null_frac_gt_0.7']:.1%}).")
    tables = "".join(
        f"<h2>{html.escape(t)}</h2>" + frames[k].to_html(index=False, float_format="%.3f",
                                                          classes="t", na_rep="-")
        for t, k in (("Overall", "overall"), ("Layer x module", "layer_module"),
                     ("Tensors", "tensors")))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Weight linearity report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
img{{max-width:100%}} table.t{{border-collapse:collapse;font-size:12px}}
table.t td,table.t th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}</style>
</head><body>
<h1>Weight linearity: {html.escape(str(store))}</h1>
<p>Steps {fit.steps[0]}..{fit.steps[-1]} ({len(fit.steps)} checkpoints). {html.escape(lead)}</p>
{''.join(sections)}
{tables}
</body></html>
"""
    path = out / PAGE
    path.write_text(page)
    if progress:
        progress(str(path))
    return path
