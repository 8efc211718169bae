"""A stand-in trainer for the fast RL-Extra loop tests: a known move instead of GRPO.

``python tests/rl_extra_nudge_trainer.py --init DIR --out DIR --steps M --seed S``
writes ``global_step_0/`` (the init as loaded) and ``global_step_M/`` (every
float tensor + 1e-3 x a seeded standard normal) in the init's layout. It
tests the loop's bookkeeping and arithmetic in well under a second per cycle,
where ``rl_extra_trainer.py`` (real GRPO) needs a fresh torch/TRL process;
the real one runs in the slow tests. No torch import: numpy and safetensors.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    init, out = Path(a.init), Path(a.out)
    rng = np.random.default_rng(a.seed)
    for step, scale in ((0, 0.0), (a.steps, 1e-3)):
        dst = out / f"global_step_{step}"
        dst.mkdir(parents=True)
        for f in init.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name != "nominal_step.json":
                shutil.copy2(f, dst / f.name)
        w = load_file(init / "model.safetensors")
        moved = {k: (v + np.float32(scale) * rng.standard_normal(v.shape).astype(v.dtype)
                     if v.dtype.kind == "f" else v) for k, v in w.items()}
        save_file(moved, str(dst / "model.safetensors"), metadata={"format": "pt"})


if __name__ == "__main__":
    main()
