"""Fit throughput and peak memory vs the authors' approach and vs one read pass of the store.

    .venv/bin/python benchmarks/fit.py --run RUN_DIR [--store S] [--workers 2]
    .venv/bin/python benchmarks/fit.py --synthetic-gb 0.3 0.6 --workdir /tmp/fitbench
    .venv/bin/python benchmarks/fit.py --issue-run --workdir /tmp/fitbench

Measures, each in its own process tree with RSS sampled every 20 ms
(peak = largest sum of RSS over the tree, Dask workers and nannies included):

* baseline: the authors' method on ALL elements: every checkpoint loaded as
  torch tensors, then per tensor a float64 ``torch.linalg.lstsq`` against the
  normalised step plus their Pearson R²;
* read pass: every chunk of the store read and decoded once (same Dask plan,
  same workers, no arithmetic) -- the floor for any out-of-core fit; the
  workers import the reader's modules first, untimed (printed apart: a
  one-off per worker process, mostly ml_dtypes, that used to be most of it);
* fit: ``fit_store`` into a new folder (null, filters, histograms included), with
  the fused kernel backend ``--backend`` (default numba, one thread per Dask
  worker process); also reported: bytes the fit wrote per element. As for the
  read pass, the workers first import the fit's modules and load its kernels
  from numba's cache, untimed and printed apart (a one-off per worker process,
  1-2 s here; the baseline's clock also starts after its imports);
* refit: the same fit again, into the folder the fit left: what ``ingest
  --watch --fit`` does after each step (same layout, so the result files are
  overwritten in place; written in the background, ``store.background_writes``).

``--issue-run`` writes (once) and measures the fit issue's own workload:
0.5B-model shapes, 4 bf16 random-walk checkpoints, 2.4 GB. With several
``--synthetic-gb`` sizes, each is measured in turn and the fit's seconds per
(step x element) are compared across sizes (linear growth means a ratio near 1).

Throughput is checkpoint bytes (safetensors files of the fitted steps) per
second. ``--synthetic-gb`` writes a bf16 run whose elements move by a few
ULPs at random (a throughput workload only; it says nothing about linearity).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rss import PeakRSS

REPO = Path(__file__).resolve().parents[1]


def measure(mode: str, args: argparse.Namespace) -> dict:
    """Run one mode in a fresh interpreter, return its JSON result plus peak RSS."""
    cmd = [sys.executable, __file__, "--_mode", mode, "--run", str(args.run), "--store",
           str(args.store), "--workers", str(args.workers), "--block-mb", str(args.block_mb),
           "--backend", args.backend, "--threads", str(args.threads)]
    subprocess.run(["sync"], check=True)  # no mode is throttled by the dirty pages of another
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
    with PeakRSS(p.pid, every=0.02) as mem:
        out, _ = p.communicate()
    if p.returncode:
        raise SystemExit(f"{mode} failed ({p.returncode})")
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_rss"] = mem.peak
    return res


# -- the three workloads (run inside the child process) -------------------------------------------


def _checkpoint_bytes(run: Path) -> int:
    from pipeline.checkpoints.discover import discover_checkpoints

    return sum(f.stat().st_size for cp in discover_checkpoints(run)
               for f in cp.path.glob("*.safetensors"))


def run_baseline(run: Path) -> dict:
    """The authors' weight_linearity.py, on every element instead of a 0.1% sample."""
    import torch
    from safetensors.torch import load_file

    from pipeline.checkpoints.discover import discover_checkpoints

    t0 = time.perf_counter()
    cps = discover_checkpoints(run)
    sds = []
    for cp in cps:
        sd = {}
        for f in sorted(cp.path.glob("*.safetensors")):
            sd.update(load_file(str(f)))
        sds.append(sd)
    steps = torch.tensor([c.step for c in cps], dtype=torch.float64)
    xn = (steps - steps.min()) / (steps.max() - steps.min())
    a = torch.stack([torch.ones_like(xn), xn], 1)
    n_above = n = 0
    for name in sds[0]:
        y = torch.stack([sd[name].reshape(-1) for sd in sds]).double()
        try:  # as the authors: lstsq, falling back to the pseudo-inverse when LAPACK refuses
            beta = torch.linalg.lstsq(a, y).solution
        except RuntimeError:
            beta = torch.linalg.pinv(a) @ y
        _ = a @ beta
        xc = xn - xn.mean()
        yc = y - y.mean(0, keepdim=True)
        ystd = y.std(0)
        ystd = torch.where(ystd > 1e-10, ystd, torch.ones_like(ystd))
        r = (xc[:, None] * yc).sum(0) / ((len(xn) - 1) * xn.std() * ystd + 1e-10)
        r2 = torch.clamp(r * r, 0, 1)
        n_above += int((r2 > 0.7).sum())
        n += r2.numel()
        del y, beta, yc
    return {"seconds": time.perf_counter() - t0, "frac_above_0.7": n_above / max(n, 1)}


def _read_task(store: str, pieces: list, n_steps: int) -> int:
    from pipeline.fit.source import StoreRef
    from pipeline.fit.tasks import READ_BUDGET_BYTES

    src = StoreRef(store).open(n_steps)
    total = 0
    for p in pieces:
        rows = slice(p.start, p.stop) if src.shape(p.name) else None
        batch = max(1, READ_BUDGET_BYTES // max(1, p.nbytes))
        for i in range(0, n_steps, batch):
            total += src.read_block(p.name, slice(i, min(i + batch, n_steps)), rows).nbytes
    return total


def _import_read_modules() -> None:
    """What ``_read_task`` imports (ml_dtypes alone is 1.3-2 s per process here), and the
    store's decode kernels, loaded from numba's cache on first use."""
    import pipeline.fit.source
    import pipeline.fit.tasks
    import pipeline.store.reader  # noqa: F401
    from pipeline.store.zigzag import warm_up

    warm_up()


def run_read_pass(store: Path, workers: int, block_bytes: int) -> dict:
    from pipeline.compute import dask_client
    from pipeline.fit.results import TensorPlan
    from pipeline.fit.tasks import fit_rows, plan_tasks
    from pipeline.store.reader import open_run

    src = open_run(store)
    plans = [TensorPlan(n, src.shape(n), src.dtype(n), fit_rows(src.shape(n), src.chunk_rows(n)))
             for n in src.tensor_names]
    tasks = plan_tasks(plans, block_bytes)
    with dask_client(n_workers=workers) as c:
        # imports are a one-off per worker process, untimed (the fit warms its backend too)
        t0 = time.perf_counter()
        c.run(_import_read_modules)
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        futs = [c.submit(_read_task, str(store), t, len(src.steps), pure=False) for t in tasks]
        total = sum(c.gather(futs))
        return {"seconds": time.perf_counter() - t0, "bytes": total, "tasks": len(tasks),
                "import_seconds": warm}


def _folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _warm_fit(backend: str) -> None:
    """What a fit task loads once per worker process: its modules, and the kernels."""
    import pipeline.fit.results  # noqa: F401
    from pipeline.engine import warm_up

    _import_read_modules()
    warm_up(backend)


def run_fit(store: Path, workers: int, block_bytes: int, backend: str, threads: int) -> dict:
    from pipeline.compute import dask_client
    from pipeline.fit import fit_store

    out = store.with_name("bench.fit")
    with dask_client(n_workers=workers, threads_per_worker=threads) as c:
        # imports and numba's kernels (loaded from its on-disk cache), once per worker, untimed
        t0 = time.perf_counter()
        c.run(_warm_fit, backend)
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        rep = fit_store(store, out, client=c, full=True, block_bytes=block_bytes, progress=False,
                        backend=backend)
        secs = time.perf_counter() - t0
    tot = rep.histograms["moving"]
    n_el = int(tot.n_elements.sum())
    return {"seconds": secs, "tasks": rep.tasks, "n_elements": n_el, "n_steps": len(rep.steps),
            "import_seconds": warm,
            "written_per_element": _folder_bytes(out) / n_el,
            "frac_above_0.7": float(tot["n_above_0.7"].sum()) / float(tot.n_selected.sum())}


# -- synthetic run ------------------------------------------------------------------------------


def make_synthetic(out: Path, gb: float, n_steps: int = 12) -> Path:
    """A bf16 random-walk run (Qwen2-like names) of about ``gb`` GB (``synthetic.py``)."""
    from synthetic import Qwen2Shapes, write_random_walk

    per_step = gb * 1e9 / n_steps / 2  # bf16 elements per step
    hidden, inter = 512, 1408
    layer_elems = 4 * hidden * hidden + 3 * hidden * inter
    # a quarter in the embeddings, the rest in layers: sizes scale by ~3 M elements
    shapes = Qwen2Shapes(hidden=hidden, intermediate=inter,
                         layers=max(1, round(per_step * 0.75 / layer_elems)),
                         vocab=max(64, int(per_step * 0.25 / 2 / hidden)), heads=8, kv_heads=8,
                         bias=False, tie=False)
    return write_random_walk(out, shapes, n_steps)


def measure_size(args: argparse.Namespace) -> dict:
    """Every mode on one run (ingested first if needed); prints the table, returns the results."""
    if not args.store.exists():
        from pipeline.compute import dask_client
        from pipeline.store.ingest import ingest

        t0 = time.perf_counter()
        with dask_client(n_workers=args.workers) as c:
            ingest(args.run, args.store, client=c, progress=False)
        print(f"ingest: {time.perf_counter() - t0:.1f} s")
    nbytes = _checkpoint_bytes(args.run)
    shutil.rmtree(args.store.with_name("bench.fit"), ignore_errors=True)  # "fit" is fresh
    res = {m: measure(m, args) for m in (["read", "fit", "refit"] if args.skip_baseline
                                          else ["baseline", "read", "fit", "refit"])}
    gb = nbytes / 1e9
    f = res["fit"]
    print(f"\n{args.run}: checkpoint bytes {gb:.2f} GB, {f['n_steps']} steps x "
          f"{f['n_elements']:,} elements; {args.workers} workers x {args.threads} threads; "
          f"block {args.block_mb} MB; backend {args.backend}")
    print(f"{'':10s} {'seconds':>9s} {'GB/s':>8s} {'peak RSS GB':>12s}")
    for m, r in res.items():
        print(f"{m:10s} {r['seconds']:9.2f} {gb / r['seconds']:8.3f} {r['peak_rss'] / 1e9:12.2f}")
    print(f"(workers' imports first, untimed: read pass {res['read']['import_seconds']:.2f} s, "
          f"fit {f['import_seconds']:.2f} s)")
    if "baseline" in res:
        b = res["baseline"]
        print(f"fit / baseline throughput: {b['seconds'] / f['seconds']:.2f}x (goal >= 10); "
              f"peak RSS fit / baseline: {f['peak_rss'] / b['peak_rss']:.2f} (goal <= 0.1)")
    print(f"fit time / read pass time: {f['seconds'] / res['read']['seconds']:.2f} (goal <= 2); "
          f"refit: {res['refit']['seconds'] / res['read']['seconds']:.2f}")
    print(f"bytes written by the fit per element: {f['written_per_element']:.2f}")
    shutil.rmtree(args.store.with_name("bench.fit"), ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="checkpoint run directory")
    ap.add_argument("--synthetic-gb", type=float, nargs="+",
                    help="generate a bf16 run of each size (GB) and measure each")
    ap.add_argument("--issue-run", action="store_true",
                    help="the fit issue's run: 0.5B shapes, 4 bf16 steps (2.4 GB)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/rlvr-fit-bench"))
    ap.add_argument("--store", type=Path, help="store to use (ingested if missing)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="threads per Dask worker")
    ap.add_argument("--backend", default="numba", help="fused kernel backend")
    ap.add_argument("--block-mb", type=float, default=16.0)  # fit_store's default
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--_mode", help=argparse.SUPPRESS)
    args = ap.parse_args()
    block = int(args.block_mb * (1 << 20))
    if args._mode:
        res = {"baseline": lambda: run_baseline(args.run),
               "read": lambda: run_read_pass(args.store, args.workers, block),
               "fit": lambda: run_fit(args.store, args.workers, block, args.backend,
                                      args.threads)}[{"refit": "fit"}.get(args._mode, args._mode)]()
        print(json.dumps(res))
        return
    if args.run is not None:
        args.store = args.store or args.workdir / "run.zarr"
        measure_size(args)
        return
    if args.issue_run:
        from synthetic import ISSUE_0_5B, write_random_walk

        args.run, args.store = args.workdir / "run-issue", args.workdir / "run-issue.zarr"
        if not args.run.exists():
            print(f"writing the issue's 4-step 0.5B-shaped bf16 run to {args.run}")
            write_random_walk(args.run, ISSUE_0_5B, 4)
        measure_size(args)
        return
    if args.synthetic_gb is None:
        ap.error("give --run, --issue-run or --synthetic-gb")
    per_unit = []
    for size in args.synthetic_gb:
        args.run = args.workdir / f"run-{size:g}gb"
        args.store = args.workdir / f"run-{size:g}gb.zarr"
        if not args.run.exists():
            print(f"writing a {size} GB synthetic bf16 run to {args.run}")
            make_synthetic(args.run, size)
        f = measure_size(args)["fit"]
        per_unit.append((size, f["seconds"] / (f["n_steps"] * f["n_elements"])))
    if len(per_unit) > 1:
        base = per_unit[0][1]
        print("\nfit cost per (step x element), relative to the smallest size: " + ", ".join(
            f"{size:g} GB: {c / base:.2f}" for size, c in per_unit) + " (linear growth: ~1)")


if __name__ == "__main__":
    mp.freeze_support()
    main()
