"""Token log-prob linearity: the weight fit engine on the log-prob store, then token summaries.

The store's ``logprob`` and ``logit`` arrays are step-indexed like weights,
so ``pipeline.fit.fit_store`` fits them unchanged (each token is one
element: slope, intercept, R² and the sign-flipped null R², all from the
same engine). The fit's own "paper" selection holds the *weight* filters;
for tokens the authors keep those whose log-prob moved by more than 0.2
between the first and last checkpoint, applied here on the stored rows.
Medians and fractions are exact (a few thousand tokens, not billions of
weights, so no histogram is needed).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError, check_number, check_output
from pipeline.outputs.logprob_store import ARRAYS, KIND, LogprobStore

DEFAULT_MIN_CHANGE = 0.2  # the authors' filter: |logp(last) - logp(first)| > 0.2
THRESHOLD = 0.7
SUMMARY_FILE = "token_summary.json"
TOKENS_CSV = "tokens.csv"


@dataclass(frozen=True)
class TokenFit:
    """A token fit: per-token table (pandas), summary rows, where they were written."""

    fit_dir: Path
    steps: list[int]
    min_change: float
    table: Any  # pandas.DataFrame, one row per token
    summary: list[dict[str, Any]]


def _stats(r2: np.ndarray, null: np.ndarray) -> dict[str, Any]:
    fitted = np.isfinite(r2)
    r, nl = r2[fitted], null[fitted]
    n = int(fitted.sum())

    def med(a: np.ndarray) -> float:
        return float(np.median(a)) if a.size else math.nan

    return {"n_fitted": n, "n_static": int((~fitted).sum()),
            "median_r2": med(r), "mean_r2": float(r.mean()) if n else math.nan,
            f"frac_r2_gt_{THRESHOLD}": float((r > THRESHOLD).mean()) if n else math.nan,
            "null_median_r2": med(nl),
            f"null_frac_r2_gt_{THRESHOLD}": float((nl > THRESHOLD).mean()) if n else math.nan}


def summarize(table: Any, min_change: float) -> list[dict[str, Any]]:
    """Rows (array x selection): every token, and those that moved more than ``min_change``.

    Tokens that never moved have no R² (0/0): they are counted (``n_static``),
    never folded into the medians.
    """
    rows = []
    keep = table["selected"].to_numpy()
    for name in ARRAYS:
        r2 = table[f"{name}_r2"].to_numpy(np.float64)
        null = table[f"{name}_null_r2"].to_numpy(np.float64)
        for sel, mask in (("all", np.ones_like(keep)), (f"|change| > {min_change:g}", keep)):
            rows.append({"array": name, "selection": sel, "n_tokens": int(mask.sum()),
                         **_stats(r2[mask], null[mask])})
    return rows


def token_table(store: str | Path, fit_dir: str | Path, min_change: float) -> Any:
    """Per token: who it is, first/last log-prob of the window, each array's fit, selected."""
    from pipeline.fit import open_fit

    lps = LogprobStore(store)
    fit = open_fit(fit_dir)
    pos = [lps.steps.index(s) for s in fit.steps]
    df = lps.tokens.frame()
    values = lps.values("logprob")[pos]
    span = fit.steps[-1] - fit.steps[0]
    df["first"], df["last"] = values[0], values[-1]
    df["change"] = values[-1].astype(np.float64) - values[0]
    for name in ARRAYS:
        ds = fit[name]
        for var in ("slope", "intercept", "r2", "null_r2"):
            df[f"{name}_{var}"] = np.asarray(ds[var].values)
        # slope per unit of the paper's x = (s - s_min) / (s_max - s_min): the fitted change
        df[f"{name}_slope_normalised"] = df[f"{name}_slope"].to_numpy(np.float64) * span
    df["selected"] = np.abs(df["change"].to_numpy()) > min_change
    return df


def fit_tokens(store: str | Path, out: str | Path | None = None, *,
               min_change: float = DEFAULT_MIN_CHANGE, executor: str = "serial",
               progress: bool = False) -> TokenFit:
    """Fit every token's log-prob and logit against step; write the summary JSON and a CSV.

    ``executor`` is the fit's (``serial`` by default: a token store is small,
    and a Dask cluster would take longer to start than the fit takes).
    """
    from pipeline.fit import fit_dir_for, fit_store
    from pipeline.steps.store import StepStoreRef

    min_change = check_number(min_change, "--min-change", 0.0)
    store = Path(store)
    lps = LogprobStore(store)
    if len(lps.steps) < 2:
        raise PipelineError(f"a token fit needs at least 2 checkpoints; the store has "
                            f"{lps.steps}", store)
    fit_dir = Path(out) if out is not None else fit_dir_for(store)
    check_output(fit_dir, [("the run folder", Path(lps.attrs.get("run_dir", store))),
                           ("the probes file", Path(lps.attrs.get("probes_file", store)))],
                 option="--fit-out")  # the fit itself refuses the store
    rep = fit_store(store, fit_dir, source=StepStoreRef(str(store), KIND), executor=executor,
                    progress=progress, null_elements=True)  # the token table shows each null
    table = token_table(store, rep.fit_dir, min_change)
    summary = summarize(table, min_change)
    doc = {"store": str(store.resolve()), "steps": rep.steps, "min_change": min_change,
           "threshold": THRESHOLD, "rows": summary}
    (rep.fit_dir / SUMMARY_FILE).write_text(json.dumps(_no_nan(doc), indent=1))
    table.to_csv(rep.fit_dir / TOKENS_CSV, index=False)
    return TokenFit(rep.fit_dir, rep.steps, min_change, table, summary)


def open_token_fit(store: str | Path, fit_dir: str | Path) -> TokenFit | None:
    """A token fit written earlier (its summary names the filter), or None if there is none."""
    doc_path = Path(fit_dir) / SUMMARY_FILE
    if not doc_path.is_file():
        return None
    doc = json.loads(doc_path.read_text())
    table = token_table(store, fit_dir, float(doc["min_change"]))
    return TokenFit(Path(fit_dir), list(doc["steps"]), float(doc["min_change"]), table,
                    doc["rows"])


def _no_nan(value: Any) -> Any:
    """NaN (no token to take a median of) as JSON null: NaN is not JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


def print_summary(fit: TokenFit) -> None:
    from pipeline.console import print_table

    key = f"frac_r2_gt_{THRESHOLD}"
    print_table(f"Token log-prob linearity ({len(fit.steps)} checkpoints, "
                f"{fit.steps[0]}..{fit.steps[-1]}; null: sign-flipped increments)",
                ["array", "tokens", "static", "median R²", "null median", f"R² > {THRESHOLD}",
                 "null", "selection"],
                [[r["array"], r["n_tokens"], r["n_static"], r["median_r2"],
                  r["null_median_r2"], r[key], r[f"null_{key}"], r["selection"]]
                 for r in fit.summary])
