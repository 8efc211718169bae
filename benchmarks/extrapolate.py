"""Benchmark: streaming two-point export vs `cp` time and vs the authors' full-load memory.

    .venv/bin/python benchmarks/extrapolate.py [--layers 12] [--workdir .cache/bench-extrapolate]

Builds a Qwen2 model from a config (random weights, no download), saves it as
two bf16 checkpoints (the second one nudged, like an RL step), then measures:

* ``cp``: copying both source checkpoints (reads 2 models, writes 2), and one
  checkpoint (reads 1, writes 1);
* our export (`rlvr-lin extrapolate --from-checkpoints ...`, reads 2, writes 1),
  wall time and peak RSS of its process;
* the authors' approach (``from_pretrained`` both models in float32, Eq. 2 on
  the state dicts, ``save_pretrained`` in bf16), peak RSS and time.

Each measured job runs in its own process; peak RSS and CPU time (user +
system, less sensitive than wall time to other jobs on a shared machine)
come from ``wait4``. The ``cp`` jobs and ours alternate within each repeat.
The page cache is warmed by reading the sources first, so every job sees
the same (warm) cache; nothing calls fsync.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

AUTHORS = r"""
import sys, torch
from transformers import AutoModelForCausalLM
c0, c1, out, alpha = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
kw = dict(dtype=torch.float32, device_map="cpu", low_cpu_mem_usage=True)
m0 = AutoModelForCausalLM.from_pretrained(c0, **kw)
sd1 = AutoModelForCausalLM.from_pretrained(c1, **kw).state_dict()
sd0 = m0.state_dict()
new = {}
with torch.no_grad():
    for k, w0 in sd0.items():
        if "norm" in k.lower():
            new[k] = sd1[k].to(torch.bfloat16)
        else:
            new[k] = (w0 + alpha * (sd1[k] - w0)).to(torch.bfloat16)
m0 = m0.to(torch.bfloat16)
m0.load_state_dict(new)
m0.save_pretrained(out)
"""


def run(cmd: list[str]) -> tuple[float, int, float]:
    """(wall seconds, peak RSS bytes, CPU seconds user + system) of a child process.

    Dirty pages of the previous job are flushed first (``sync``) so one job's
    writeback is not billed to the next. ``ru_maxrss`` of a child counts the
    parent's RSS at fork time, which is why this parent never imports torch.
    """
    subprocess.run(["sync"], check=True)
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        err = proc.stderr.read().decode() if proc.stderr else ""
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err[-2000:]}")
    return wall, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def make_checkpoints(work: Path, layers: int, hidden: int, inter: int) -> tuple[Path, Path]:
    """Two bf16 checkpoints of a random Qwen2 model; the second moved by a small random step."""
    c0, c1 = work / "global_step_0", work / "global_step_100"
    if (c1 / "config.json").exists():
        return c0, c1
    import torch

    from pipeline.rl.char_tokenizer import build_char_tokenizer
    from pipeline.rl.tiny_model import ModelSize, build_model

    tok = build_char_tokenizer()
    size = ModelSize(hidden, layers, inter, 16, 8)
    model = build_model("qwen2", size, tok, tie=False, seed=0).to(torch.bfloat16)
    model.save_pretrained(c0)
    tok.save_pretrained(c0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * 1e-3)
    model.save_pretrained(c1)
    tok.save_pretrained(c1)
    return c0, c1


def median_runs(cmds: dict[str, list[str]], repeat: int, before: list[str] | None = None
                ) -> dict[str, tuple[float, int, float]]:
    """Median wall time, max peak RSS and median CPU time of each command over ``repeat`` rounds.

    The commands alternate within each round (in reversed order every other
    round), so a load change on this shared machine hits all of them alike
    and their ratios stay meaningful. ``before`` runs untimed before each job.
    """
    runs: dict[str, list[tuple[float, int, float]]] = {k: [] for k in cmds}
    for i in range(repeat):
        names = list(cmds) if i % 2 == 0 else list(reversed(cmds))
        for k in names:
            if before:
                subprocess.run(before, check=True)
            runs[k].append(run(cmds[k]))
    return {k: (statistics.median(r[0] for r in v), max(r[1] for r in v),
                statistics.median(r[2] for r in v)) for k, v in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=REPO / ".cache" / "bench-extrapolate")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden-size", type=int, default=2048)
    ap.add_argument("--intermediate-size", type=int, default=5632)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per job (median)")
    ap.add_argument("--skip-authors", action="store_true", help="skip the full-load baseline")
    ap.add_argument("--make-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    if args.make_only:  # a child process, so the parent's RSS stays small
        make_checkpoints(work, args.layers, args.hidden_size, args.intermediate_size)
        return
    subprocess.run([sys.executable, __file__, "--make-only", "--workdir", str(work),
                    "--layers", str(args.layers), "--hidden-size", str(args.hidden_size),
                    "--intermediate-size", str(args.intermediate_size)], check=True)
    c0, c1 = work / "global_step_0", work / "global_step_100"
    model_bytes = dir_bytes(c0)
    for f in [*c0.glob("*.safetensors"), *c1.glob("*.safetensors")]:
        with f.open("rb") as fh:  # warm the page cache for every job alike
            while fh.read(1 << 24):
                pass
    scratch = work / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    clean = ["sh", "-c", f"rm -rf {scratch} && mkdir {scratch}"]
    results: dict[str, float | int | str] = {"model_bytes": model_bytes}
    cli = [sys.executable, "-m", "pipeline", "extrapolate", "--from-checkpoints", str(c0),
           str(c1), "--to", "150", "--out", str(scratch / "ours"), "--no-progress"]
    r = args.repeat
    med = median_runs({"cp_two": ["cp", "-r", str(c0), str(c1), str(scratch)],
                       "cp_one": ["cp", "-r", str(c1), str(scratch)], "ours": cli}, r, clean)
    for k, (wall, _rss, cpu) in med.items():
        results[f"{k}_s"], results[f"{k}_cpu_s"] = wall, cpu
    results["ours_rss"] = med["ours"][1]
    subprocess.run(clean, check=True)
    _, results["python_import_rss"], _ = run([sys.executable, "-c", "import pipeline."
                                              "extrapolate.export, pipeline.cli"])
    results["load_avg_1min"] = os.getloadavg()[0]
    if not args.skip_authors:
        results["authors_s"], results["authors_rss"], results["authors_cpu_s"] = run(
            [sys.executable, "-c", AUTHORS, str(c0), str(c1), str(scratch / "authors"), "1.5"])
    shutil.rmtree(scratch)
    gb = 1e9
    print(f"model: {model_bytes / gb:.2f} GB bf16 per checkpoint "
          f"(qwen2, {args.layers} layers, hidden {args.hidden_size}, "
          f"intermediate {args.intermediate_size})")
    print(f"cp of both sources      {results['cp_two_s']:.2f} s  "
          f"(CPU {results['cp_two_cpu_s']:.2f} s)")
    print(f"cp of one checkpoint    {results['cp_one_s']:.2f} s  "
          f"(CPU {results['cp_one_cpu_s']:.2f} s)")
    print(f"our export              {results['ours_s']:.2f} s  (CPU {results['ours_cpu_s']:.2f} s)"
          f" = {results['ours_s'] / results['cp_two_s']:.2f}x cp(both sources), "
          f"{results['ours_s'] / results['cp_one_s']:.2f}x cp(one)")
    print(f"our peak RSS            {results['ours_rss'] / gb:.2f} GB "
          f"(bare interpreter + imports: {results['python_import_rss'] / gb:.2f} GB)")
    if not args.skip_authors:
        print(f"authors' full load      {results['authors_s']:.2f} s, "
              f"peak RSS {results['authors_rss'] / gb:.2f} GB")
        print(f"memory ratio ours/full  {results['ours_rss'] / results['authors_rss']:.3f}")
    print(f"1-min load average at the end: {results['load_avg_1min']:.1f} "
          f"on {os.cpu_count()} cores (other jobs share this machine)")
    print(json.dumps(results))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
