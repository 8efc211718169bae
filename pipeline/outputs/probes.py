"""Probe sets: fixed responses sampled once from one checkpoint, to teacher-force through all.

Token log-prob linearity (the paper's output-space finding) needs the *same*
token sequences scored by every checkpoint. A probe keeps the ids exactly as
``decode`` produced them (never re-tokenised text) together with the
sampling settings and checkpoint that made them, so a probe file is a
self-describing input for the log-prob pass.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import check_output
from pipeline.outputs.generate import FINISH, GenerateReport, check_device, decode
from pipeline.outputs.models import LoadedModel, load_model
from pipeline.outputs.records import Probe, Prompt, read_prompts, write_probes
from pipeline.outputs.sampling import Sampling, check_sampling


def sampling_meta(s: Sampling) -> dict[str, Any]:
    return {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
            "max_new_tokens": s.max_new_tokens, "seed": s.seed, "stop": list(s.stop)}


def sample_probes(model: LoadedModel, prompts: Sequence[Prompt], k: int, sampling: Sampling,
                  batch_size: int = 32, progress: bool = False) -> Iterator[Probe]:
    """k probes per prompt, in (prompt, sample) order; ``meta`` says how each was made."""
    base = {"checkpoint": str(model.path), **sampling_meta(sampling)}
    for c in decode([model], [p.text for p in prompts], k, sampling, batch_size=batch_size,
                    progress=progress):
        p = prompts[c.prompt_index]
        meta = {**base, "prompt_id": p.id, "finish": c.finish}
        if p.answer is not None:
            meta["answer"] = p.answer
        yield Probe(c.prompt_index, c.sample, p.text, c.prompt_ids, c.text, c.token_ids, meta)


def probes_file(checkpoint: str | Path, prompts_file: str | Path, out: str | Path, k: int,
                sampling: Sampling, batch_size: int = 32, device: str = "cpu",
                dtype: str = "auto", progress: bool = True) -> GenerateReport:
    """``rlvr-lin probes``: sample and write the probe file atomically (all or nothing)."""
    check_sampling(sampling)
    check_device(device)
    check_output(out, [("the prompts file", prompts_file), ("the checkpoint", checkpoint)])
    prompts = read_prompts(prompts_file)
    model = load_model(checkpoint, device, dtype)
    finish = dict.fromkeys(FINISH, 0)
    count = [0, 0]
    t0 = time.perf_counter()

    def counted() -> Iterator[Probe]:
        for probe in sample_probes(model, prompts, k, sampling, batch_size, progress):
            finish[probe.meta["finish"]] += 1
            count[0] += 1
            count[1] += len(probe.response_ids)
            yield probe

    write_probes(out, counted())
    return GenerateReport(Path(out), count[0], count[1], finish, time.perf_counter() - t0)
