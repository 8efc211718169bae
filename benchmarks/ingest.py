"""Ingest benchmark: throughput vs ``cp``, peak RSS vs largest tensor, compression ratio.

Usage (a run made by the project's generator, or an existing one)::

    python benchmarks/ingest.py --run RUN_DIR
    python benchmarks/ingest.py --make /tmp/bigrun --hidden-size 1024 --layers 8 \\
        --intermediate-size 4096 --rl-steps 20 --save-every 2

Goals: >= 0.5x cp throughput, peak RSS < 4x the largest tensor, store <= 30%.
RSS is the sum over this process and its Dask workers, sampled every 50 ms;
both the absolute peak and the peak above the idle cluster are printed.
``--repeat N`` times cp and ingest N times each, interleaved, and keeps each
one's fastest (a shared machine makes single timings noisy). Both include a
``sync``, so both pay for getting their bytes to the disk, and both start
after a ``sync``, so neither is throttled by the other's dirty pages.

``--cold`` (root only) drops the page cache before each timed run, so both
read the checkpoints from the disk: the "disk speed" a user ingesting a run
that was just written (or lives on another machine's disk) sees. Without it
both read from a warm page cache, where cp is a memcpy (1.3-1.9 GB/s on the
2-core VM) and ingest is bound by compression alone.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rss import PeakRSS, tree_rss


def weight_bytes(run: Path) -> tuple[int, int]:
    """(total weight-file bytes, largest tensor bytes) over all checkpoints."""
    from pipeline.checkpoints import CheckpointReader, discover_checkpoints

    total, largest = 0, 0
    for cp in discover_checkpoints(run):
        r = CheckpointReader(cp.path)
        total += r.total_bytes
        largest = max(largest, max(i.nbytes for i in r.tensors.values()))
    return total, largest


def settle(cold: bool) -> None:
    """Flush dirty pages (and with ``cold`` drop the page cache) before a timed run."""
    subprocess.run(["sync"], check=True)
    if cold:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run", type=Path, help="existing run directory")
    ap.add_argument("--make", type=Path, help="generate a run here with make-tiny-run")
    ap.add_argument("--hidden-size", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--intermediate-size", type=int, default=4096)
    ap.add_argument("--rl-steps", type=int, default=20)
    ap.add_argument("--save-every", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tmp", type=Path, default=None, help="where the store and cp copy go")
    ap.add_argument("--repeat", type=int, default=1, help="best of N timings of each")
    ap.add_argument("--cold", action="store_true",
                    help="drop the page cache before each timed run (root): read from disk")
    a = ap.parse_args()
    run = a.run
    if run is None:
        if a.make is None:
            ap.error("give --run or --make")
        if not (a.make / "metrics.json").exists():
            subprocess.run([sys.executable, "-m", "pipeline", "make-tiny-run", str(a.make),
                            "--hidden-size", str(a.hidden_size), "--layers", str(a.layers),
                            "--intermediate-size", str(a.intermediate_size),
                            "--rl-steps", str(a.rl_steps), "--save-every", str(a.save_every)],
                           check=True)
        run = a.make
    from pipeline.compute import dask_client
    from pipeline.store.ingest import ingest

    total, largest = weight_bytes(run)
    if a.tmp:
        Path(a.tmp).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=a.tmp))
    try:
        t_cp = t_ing = float("inf")
        with dask_client(n_workers=a.workers) as client:
            # import what the tasks need first: "above idle" is then ingest's working memory,
            # not the one-off import of numcodecs/zarr in each worker
            client.run(lambda: __import__("pipeline.store.tasks"))
            time.sleep(0.5)
            idle = tree_rss()
            for _ in range(max(1, a.repeat)):
                shutil.rmtree(tmp / "copy", ignore_errors=True)
                shutil.rmtree(tmp / "run.zarr", ignore_errors=True)
                # cp of the same files to the same disk, page cache warm (or cold) for both
                settle(a.cold)
                t = time.perf_counter()
                subprocess.run(["cp", "-r", str(run), str(tmp / "copy")], check=True)
                subprocess.run(["sync"], check=True)
                t_cp = min(t_cp, time.perf_counter() - t)
                settle(a.cold)
                with PeakRSS() as peak:
                    t = time.perf_counter()
                    rep = ingest(run, tmp / "run.zarr", client=client, progress=False)
                    subprocess.run(["sync"], check=True)
                    t_ing = min(t_ing, time.perf_counter() - t)
        mb = 1e6
        print(f"run                     {run}  (page cache {'cold' if a.cold else 'warm'})")
        print(f"checkpoints             {len(rep.steps)} steps, {total / mb:.1f} MB of weights")
        print(f"largest tensor          {largest / mb:.2f} MB")
        print(f"cp -r                   {t_cp:.2f} s  ({total / mb / t_cp:.0f} MB/s)")
        print(f"ingest                  {t_ing:.2f} s  ({total / mb / t_ing:.0f} MB/s)")
        print(f"throughput vs cp        {t_cp / t_ing:.2f}x   (goal >= 0.5x)")
        print(f"peak RSS (all procs)    {peak.peak / mb:.0f} MB = "
              f"{peak.peak / largest:.1f}x largest tensor")
        print(f"peak RSS above idle     {(peak.peak - idle) / mb:.0f} MB = "
              f"{(peak.peak - idle) / largest:.1f}x largest tensor   (goal < 4x)")
        print(f"store bytes written     {rep.store_bytes / mb:.1f} MB for "
              f"{rep.checkpoint_bytes / mb:.1f} MB of checkpoint files")
        print(f"store / checkpoints     {rep.ratio:.3f}   (goal <= 0.30)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
