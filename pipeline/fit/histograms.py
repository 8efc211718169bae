"""R² histograms as xarray Datasets, their layer x module and overall sums, CSVs, a table.

Fixed bin edges on [0, 1] make every histogram additive, so per-layer and
overall figures are plain sums of per-tensor counts. Means and the
fractions above 0.7 / 0.9 are exact (kept as sums and counts per tensor);
medians are read off the histogram by linear interpolation inside the bin
(error well below one bin width, 0.01 with the default 100 bins).
Static elements are a count of their own, never a bin; so are elements with
a NaN or inf value somewhere in the window (``n_nonfinite``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from pipeline.engine.spec import THRESHOLDS
from pipeline.fit.names import NO_LAYER, NameInfo, display_name, module_rank, parse_name

COUNT_VARS = ("n_elements", "n_static", "n_nonfinite", "n_selected", "removed_min_change",
              "removed_distinct", "r2_sum", "null_r2_sum") + tuple(
                  f"n_above_{t}" for t in THRESHOLDS) + tuple(
                  f"null_above_{t}" for t in THRESHOLDS)


def bin_edges(n_bins: int) -> np.ndarray:
    """Fixed edges on [0, 1] so histograms add across blocks, tensors, layers and runs."""
    return np.linspace(0.0, 1.0, n_bins + 1)


def hist_median(hist: np.ndarray) -> float:
    """Median of a fixed-bin histogram on [0, 1], interpolated linearly inside its bin."""
    total = hist.sum()
    if total == 0:
        return float("nan")
    cum = np.cumsum(hist)
    half = total / 2.0
    i = int(np.searchsorted(cum, half))
    below = cum[i - 1] if i else 0
    width = 1.0 / hist.shape[0]
    return float((i + (half - below) / hist[i]) * width)


def build_dataset(names: list[str], summaries: Mapping[str, Any], selection: str,
                  n_bins: int, attrs: dict[str, Any],
                  labels: Mapping[str, tuple[int, str]] | None = None) -> xr.Dataset:
    """Dataset (tensor x bin) of one selection from per-tensor ``TensorSummary`` objects.

    ``labels`` (name -> (layer, module)) come from the source (a log-prob store
    labels its arrays its own way); by default they are parsed from weight names.
    """
    infos = [NameInfo(*labels[n]) if labels is not None else parse_name(n) for n in names]
    edges = bin_edges(n_bins)
    sel = [summaries[n].selections[selection] for n in names]
    data: dict[str, Any] = {
        "count": (("tensor", "bin"), np.stack([s.hist for s in sel]) if sel
                  else np.zeros((0, n_bins), np.int64)),
        "null_count": (("tensor", "bin"), np.stack([s.null_hist for s in sel]) if sel
                       else np.zeros((0, n_bins), np.int64)),
        "n_elements": ("tensor", np.array([summaries[n].n_elements for n in names], np.int64)),
        "n_static": ("tensor", np.array([summaries[n].n_static for n in names], np.int64)),
        "n_nonfinite": ("tensor", np.array([summaries[n].n_nonfinite for n in names],
                                           np.int64)),
        "n_selected": ("tensor", np.array([s.n_selected for s in sel], np.int64)),
        "removed_min_change": ("tensor", np.array([s.removed_min_change for s in sel], np.int64)),
        "removed_distinct": ("tensor", np.array([s.removed_distinct for s in sel], np.int64)),
        "r2_sum": ("tensor", np.array([s.r2_sum for s in sel], np.float64)),
        "null_r2_sum": ("tensor", np.array([s.null_sum for s in sel], np.float64)),
    }
    for i, t in enumerate(THRESHOLDS):
        data[f"n_above_{t}"] = ("tensor", np.array([s.n_above[i] for s in sel], np.int64))
        data[f"null_above_{t}"] = ("tensor", np.array([s.null_above[i] for s in sel], np.int64))
    coords = {
        "tensor": np.array([display_name(n) for n in names], dtype=object),
        "layer": ("tensor", np.array([i.layer for i in infos], np.int64)),
        "module": ("tensor", np.array([i.module for i in infos], dtype=object)),
        "bin": np.arange(n_bins),
        "bin_lo": ("bin", edges[:-1]),
        "bin_hi": ("bin", edges[1:]),
    }
    return xr.Dataset(data, coords=coords, attrs={**attrs, "selection": selection})


def by_layer_module(ds: xr.Dataset) -> xr.Dataset:
    """Counts summed per (layer, module): dims ``group`` x ``bin`` with layer/module coords.

    Summed with ``np.add.at`` over one group index per tensor: xarray's groupby
    cost about a second per call on a few dozen tensors, more than the fit.
    """
    layers = np.asarray(ds.layer.values, np.int64)
    modules = [str(m) for m in ds.module.values]
    order = sorted(set(zip(layers.tolist(), modules, strict=True)),
                   key=lambda k: (k[0] if k[0] != NO_LAYER else 10**9, module_rank(k[1])))
    index = {k: i for i, k in enumerate(order)}
    gidx = np.array([index[k] for k in zip(layers.tolist(), modules, strict=True)], np.intp)
    data = {}
    for name, var in ds.data_vars.items():
        vals = np.asarray(var.values)
        out = np.zeros((len(order), *vals.shape[1:]), vals.dtype)
        np.add.at(out, gidx, vals)
        data[name] = (("group", *var.dims[1:]), out)
    coords = {k: v for k, v in ds.coords.items() if "tensor" not in v.dims}
    coords["layer"] = ("group", np.array([k[0] for k in order], np.int64))
    coords["module"] = ("group", np.array([k[1] for k in order], dtype=object).astype(str))
    return xr.Dataset(data, coords=coords, attrs=dict(ds.attrs))


def overall(ds: xr.Dataset) -> xr.Dataset:
    """Every tensor summed: the run's overall histogram (dims ``bin``)."""
    return ds.drop_vars(["layer", "module"]).sum("tensor")


def _row(ds: Mapping[str, Any]) -> dict[str, Any]:
    """Headline figures of one tensor, one group or the total (values by variable name)."""
    n = int(ds["n_selected"])
    ne = int(ds["n_elements"])
    row: dict[str, Any] = {
        "n_elements": ne,
        "n_static": int(ds["n_static"]),
        "static_fraction": int(ds["n_static"]) / ne if ne else float("nan"),
        "n_nonfinite": int(ds["n_nonfinite"]) if "n_nonfinite" in ds else 0,
        "removed_min_change": int(ds["removed_min_change"]),
        "removed_distinct": int(ds["removed_distinct"]),
        "n_selected": n,
        "mean": float(ds["r2_sum"]) / n if n else float("nan"),
        "median": hist_median(np.asarray(ds["count"])),
    }
    for t in THRESHOLDS:
        row[f"frac_gt_{t}"] = int(ds[f"n_above_{t}"]) / n if n else float("nan")
    row["null_mean"] = float(ds["null_r2_sum"]) / n if n else float("nan")
    row["null_median"] = hist_median(np.asarray(ds["null_count"]))
    for t in THRESHOLDS:
        row[f"null_frac_gt_{t}"] = int(ds[f"null_above_{t}"]) / n if n else float("nan")
    return row


def _rows(ds: xr.Dataset, dim: str) -> list[dict[str, Any]]:
    """``_row`` of every index along ``dim``, on numpy arrays (``isel`` per row cost ms)."""
    arrays = {k: np.asarray(v.values) for k, v in ds.data_vars.items()}
    return [_row({k: a[i] for k, a in arrays.items()}) for i in range(ds.sizes[dim])]


def summary_frames(ds: xr.Dataset) -> dict[str, pd.DataFrame]:
    """Per tensor, per layer x module, and overall summaries as DataFrames."""
    per_tensor = pd.DataFrame(
        [{"tensor": str(t), "layer": int(ds.layer.values[i]), "module": str(ds.module.values[i]),
          **row} for i, (t, row) in enumerate(zip(ds.tensor.values, _rows(ds, "tensor"),
                                                  strict=True))])
    lm = by_layer_module(ds)
    per_lm = pd.DataFrame(
        [{"layer": int(lm.layer.values[i]), "module": str(lm.module.values[i]), **row}
         for i, row in enumerate(_rows(lm, "group"))])
    total = pd.DataFrame([{"selection": ds.attrs.get("selection", ""),
                           **_row({k: np.asarray(v.values).sum(0)
                                   for k, v in ds.data_vars.items()})}])
    return {"tensors": per_tensor, "layer_module": per_lm, "overall": total}


def write_outputs(fit_dir: str | Path, datasets: Mapping[str, xr.Dataset]) -> None:
    """Save each selection's Dataset to a fresh histograms.zarr and its CSV summaries.

    The folder is replaced whole: an older fit of other tensors left groups that
    xarray's per-group mode "w" keeps, and appending a selection of another
    tensor count to one failed at the very end of a fit (found by the benchmark).
    """
    import shutil

    from pipeline.fit.results import HISTOGRAMS

    fit_dir = Path(fit_dir)
    shutil.rmtree(fit_dir / HISTOGRAMS, ignore_errors=True)
    for sel, ds in datasets.items():
        ds.to_zarr(str(fit_dir / HISTOGRAMS), group=sel, mode="a",
                   zarr_format=3, consolidated=False)
        for kind, df in summary_frames(ds).items():
            df.to_csv(fit_dir / f"summary_{kind}_{sel}.csv", index=False)


def headline_rows(ds: xr.Dataset) -> tuple[list[str], list[list[Any]]]:
    """Rows for the terminal table: overall, then one per module type (all layers)."""
    cols = ["group", "elements", "static", "selected", "median R²", "> 0.7", "> 0.9",
            "null median", "null > 0.7"]

    def fmt(name: str, r: dict[str, Any]) -> list[Any]:
        return [name, r["n_elements"], r["n_static"], r["n_selected"], r["median"],
                r["frac_gt_0.7"], r["frac_gt_0.9"], r["null_median"], r["null_frac_gt_0.7"]]

    rows = [fmt("overall", _row(overall(ds)))]
    mods = sorted(set(str(m) for m in ds.module.values), key=module_rank)
    for m in mods:
        sub = ds.isel(tensor=np.flatnonzero(ds.module.values == m))
        rows.append(fmt(m, _row(overall(sub))))
    return cols, rows


def print_headline(ds: xr.Dataset) -> None:
    """The figures people look for first, as an aligned terminal table."""
    from pipeline.console import print_table

    cols, rows = headline_rows(ds)
    sel = ds.attrs.get("selection", "")
    title = f"R² of weight trajectories ({sel} elements; null = sign-flipped increments)"
    print_table(title, cols, rows)
    if sel == "paper":
        tot = overall(ds)
        print_table("authors' filters", ["filter", "elements removed"], [
            ["static (never moved)", int(tot.n_static)],
            ["NaN/inf value", int(tot.n_nonfinite) if "n_nonfinite" in tot else 0],
            ["max - min <= 1e-4", int(tot.removed_min_change)],
            ["< 4 distinct values", int(tot.removed_distinct)],
        ])
