"""An external trainer for the RL-Extra loop's tests: m real GRPO steps from an init folder.

Run as a separate process, as verl would be: ``python tests/rl_extra_trainer.py
--init DIR --out DIR --steps M --seed S`` trains the project's tiny GRPO run
from the model in ``--init`` (no warm start) and writes ``global_step_0/`` and
``global_step_M/`` into ``--out``. ``--seed`` varies the sampler and the
rollouts per cycle (the loop passes ``{cycle}``); the task split stays fixed.
"""

from __future__ import annotations

import argparse

from pipeline.rl.tiny_run import TinyRunConfig, make_tiny_run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    cfg = TinyRunConfig(sft_steps=0, rl_steps=a.steps, save_every=a.steps, prompts_per_step=4,
                        generations=4, n_heldout=8)
    make_tiny_run(a.out, cfg, log=lambda _m: None, progress=False, init_model=a.init,
                  grpo_args={"seed": a.seed, "data_seed": a.seed})


if __name__ == "__main__":
    main()
