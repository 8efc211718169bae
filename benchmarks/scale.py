"""Scale: ingest and fit a random walk with 1.5B-model shapes at two sizes; memory per worker.

    .venv/bin/python benchmarks/scale.py              # 14 and 28 layers, 4 steps (~6 + 12 GB)
    .venv/bin/python benchmarks/scale.py --layers 2 4 --steps 3  # a quick look
    .venv/bin/python benchmarks/scale.py --backends numba torch  # on a GPU machine: GPU vs CPU

Each size is a run of Qwen2.5-1.5B's real shapes (hidden 1536, intermediate
8960, vocab 151936, 12/2 heads, q/k/v biases, tied embeddings; 28 layers is
the real model, 3.09 GB per bf16 checkpoint), ``--steps`` checkpoints of
random +-1 ULP moves (``synthetic.py``: a throughput workload, no linearity
claim), generated once under ``--workdir``. For each size, in one process:

* ingest into a fresh store, then fit it from scratch (null, filters and
  histograms included), on a LocalCluster of ``--workers`` processes with
  ``--memory-limit`` each (or on ``--cluster``);
* throughput (checkpoint GB/s), and cost per (step x element) relative to
  the smallest size: linear growth reads ~1.0;
* every worker's peak RSS (sampled every 50 ms from this machine) against
  its memory limit, and whether any worker was restarted (the nanny restarts
  one that passes the limit). "within limit" is the goal.

With a CUDA device and ``--backends ... torch``, the torch backend's fit is
also compared with the CPU's and with two floors: the store's bytes over
the measured pinned host-to-device bandwidth (data out of core), and the
decoded bits over HBM bandwidth (``--hbm-gbs``, 4800 for an H200: data
already on the device). Goal on GPU: within 3x of the floor.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

from rss import PeakRSS
from synthetic import QWEN25_1_5B, write_random_walk

from pipeline.compute import dask_client
from pipeline.fit import fit_store
from pipeline.store.ingest import ingest
from pipeline.store.integrity import store_bytes


class WorkerPeaks:
    """Peak RSS of each (local) Dask worker while the block runs (``rss.PeakRSS`` per worker),
    and the workers that were restarted."""

    def __init__(self, client, every: float = 0.05) -> None:
        self.client = client
        self.pids = dict(client.run(os.getpid))  # address -> pid
        info = client.scheduler_info()["workers"]
        self.limits = {a: int(w.get("memory_limit") or 0) for a, w in info.items()}
        self.samplers = {pid: PeakRSS(pid, every) for pid in self.pids.values()}

    def __enter__(self) -> WorkerPeaks:
        for sampler in self.samplers.values():
            sampler.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for sampler in self.samplers.values():
            sampler.__exit__()
        self.peak = {pid: sampler.peak for pid, sampler in self.samplers.items()}
        self.restarted = sorted(set(self.pids.values()) - set(self.client.run(os.getpid).values()))

    def rows(self) -> list[tuple[str, int, int]]:
        return [(a, self.peak[pid], self.limits.get(a, 0)) for a, pid in self.pids.items()]

    def within(self) -> bool:
        return not self.restarted and all(lim == 0 or peak < lim for _, peak, lim in self.rows())


def checkpoint_bytes(run: Path) -> int:
    return sum(f.stat().st_size for f in run.rglob("*.safetensors"))


def h2d_bandwidth() -> float:
    """Pinned host-to-device copy bandwidth in bytes/s (best of 5 copies of 1 GiB)."""
    import torch

    src = torch.empty(1 << 30, dtype=torch.uint8).pin_memory()
    dst = torch.empty_like(src, device="cuda")
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return src.numel() / best


def measure(run: Path, work: Path, args: argparse.Namespace) -> dict:
    store, fits = work / f"{run.name}.zarr", work / f"{run.name}.fits"
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(fits, ignore_errors=True)
    res: dict = {"run": run.name, "checkpoint_bytes": checkpoint_bytes(run), "fit": {}}
    with dask_client(args.cluster, n_workers=args.workers, memory_limit=args.memory_limit) as c:
        with WorkerPeaks(c) as mem:
            t0 = time.perf_counter()
            rep = ingest(run, store, client=c, progress=False)
            res["ingest"] = {"seconds": time.perf_counter() - t0, "mem": mem}
        res["steps"] = len(rep.steps)
        res["store_bytes"] = store_bytes(store)
        for backend in args.backends:
            # compiled kernels load once per worker (numba's disk cache), untimed
            c.run(lambda b=backend: __import__("pipeline.engine", fromlist=["x"]).get_backend(b))
            with WorkerPeaks(c) as mem:
                t0 = time.perf_counter()
                frep = fit_store(store, fits / backend, client=c, full=True, progress=False,
                                 backend=backend, block_bytes=int(args.block_mb * (1 << 20)))
                secs = time.perf_counter() - t0
            tot = frep.histograms["moving"]
            res["elements"] = int(tot.n_elements.sum())
            res["fit"][backend] = {"seconds": secs, "mem": mem, "tasks": frep.tasks}
    if not args.keep:
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(fits, ignore_errors=True)
    return res


def print_size(r: dict) -> None:
    gb = r["checkpoint_bytes"] / 1e9
    print(f"\n{r['run']}: {gb:.2f} GB of checkpoints, {r['steps']} steps x {r['elements']:,} "
          f"elements; store {r['store_bytes'] / 1e9:.2f} GB "
          f"({r['store_bytes'] / r['checkpoint_bytes']:.3f} of the checkpoints)")
    jobs = [("ingest", r["ingest"])] + [(f"fit {b}", f) for b, f in r["fit"].items()]
    print(f"{'job':14s} {'seconds':>9s} {'GB/s':>7s}  worker peak RSS / limit (GB)")
    for name, j in jobs:
        mem = j["mem"]
        peaks = ", ".join(f"{p / 1e9:.2f}/{lim / 1e9:.2f}" for _, p, lim in mem.rows())
        flag = "within limit" if mem.within() else f"OVER (restarted {mem.restarted})"
        print(f"{name:14s} {j['seconds']:9.1f} {gb / j['seconds']:7.3f}  {peaks}  {flag}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/rlvr-scale"))
    ap.add_argument("--layers", type=int, nargs="+", default=[14, 28],
                    help="model sizes to measure, as numbers of layers (28 = the real 1.5B)")
    ap.add_argument("--steps", type=int, default=4, help="checkpoints per run")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-limit", default="4GB", help="per worker")
    ap.add_argument("--cluster", default=None, help="as rlvr-lin --cluster (default: local)")
    ap.add_argument("--backends", nargs="+", default=["numba"])
    ap.add_argument("--block-mb", type=float, default=4.0)
    ap.add_argument("--hbm-gbs", type=float, default=4800.0, help="device memory GB/s")
    ap.add_argument("--keep", action="store_true", help="keep stores and fits")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for layers in sorted(args.layers):
        shapes = replace(QWEN25_1_5B, layers=layers)
        run = args.workdir / f"qwen2.5-1.5b-L{layers}-s{args.steps}"
        if not (run / f"global_step_{10 * (args.steps - 1)}" / "config.json").exists():
            t0 = time.perf_counter()
            shutil.rmtree(run, ignore_errors=True)
            write_random_walk(run, shapes, args.steps)
            print(f"generated {run} ({checkpoint_bytes(run) / 1e9:.2f} GB) in "
                  f"{time.perf_counter() - t0:.0f} s")
        results.append(measure(run, args.workdir, args))
        print_size(results[-1])
    base = results[0]
    if len(results) > 1:
        print("\ncost per (step x element), relative to the smallest size (linear: ~1.0):")
        for r in results:
            units = r["steps"] * r["elements"]
            bu = base["steps"] * base["elements"]
            rel = r["ingest"]["seconds"] / units / (base["ingest"]["seconds"] / bu)
            cells = [f"ingest {rel:.2f}"]
            cells += [f"fit {b} {f['seconds'] / units / (base['fit'][b]['seconds'] / bu):.2f}"
                      for b, f in r["fit"].items()]
            print(f"  {r['run']}: " + ", ".join(cells))
    big = results[-1]
    if "torch" in big["fit"] and len(big["fit"]) > 1:
        import torch

        if torch.cuda.is_available():
            bw = h2d_bandwidth()
            decoded = 2 * big["steps"] * big["elements"]
            t_gpu = big["fit"]["torch"]["seconds"]
            for b, f in big["fit"].items():
                if b != "torch":
                    print(f"GPU fit speed-up over {b}: {f['seconds'] / t_gpu:.2f}x")
            floor_h2d = big["store_bytes"] / bw
            floor_hbm = decoded / (args.hbm_gbs * 1e9)
            print(f"pinned H2D {bw / 1e9:.1f} GB/s: floor (store bytes / H2D) {floor_h2d:.2f} s, "
                  f"GPU fit / floor {t_gpu / floor_h2d:.1f}x (goal <= 3)")
            print(f"HBM floor (decoded bits / {args.hbm_gbs:g} GB/s) {floor_hbm:.3f} s, "
                  f"GPU fit / HBM floor {t_gpu / floor_hbm:.0f}x")


if __name__ == "__main__":
    main()
