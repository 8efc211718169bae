"""Decoding with one checkpoint, or with two by logits extrapolation (the paper's Eq. 1).

With an early model A and a late model B the next token is drawn from

    z = z_A + alpha * (z_B - z_A)        (raw logits, then temperature, top-k, top-p)

where both models run on the same prefix, each with its own KV cache, and the
drawn token is fed to both. The mix is computed as ``torch.lerp(z_A, z_B,
alpha)``, which is exactly z_B at alpha = 1 and exactly z_A at alpha = 0, so a
pair at alpha 1 (0) reproduces the late (early) model's own decoding token for
token, sampled as well as greedy: the draws are counter-based (see
``sampling``), so equal logits mean equal tokens.

Batching: the unique prompts of a batch are left-padded and prefilled once,
then their KV caches are gathered into k rows each (no k-fold prefill).
Position ids follow ``transformers``' generate (cumulative attention mask), so
greedy decoding of one model equals ``model.generate(do_sample=False)``.
Finished rows are fed pad tokens and, once a quarter of a batch is done,
dropped from the caches, so long tails do not pay for finished rows.

``LogitsExtrapolation`` offers the same mix as a ``transformers``
``LogitsProcessor`` for the late model's own ``generate``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.errors import PipelineError, check_int, check_number
from pipeline.outputs.models import LoadedModel, check_same_vocab
from pipeline.outputs.sampling import Sampling, check_sampling, choose, uniforms

__all__ = ["Completion", "LogitsExtrapolation", "Sampling", "alpha_for_steps", "decode",
           "extrapolation_processors", "mix_logits", "pair_alpha"]

FINISH = ("eos", "stop", "length")
COMPACT_FRACTION = 0.25  # drop finished rows from the caches once this share of a batch is done


@dataclass(frozen=True)
class Completion:
    """One sampled continuation; ids are the truth, ``text`` is for people."""

    prompt_index: int
    sample: int
    prompt_ids: list[int]  # exactly what the model saw (no padding)
    token_ids: list[int]  # generated ids, EOS excluded
    text: str  # decoded token_ids (skip special tokens)
    finish: str  # "eos" | "stop" | "length"


def mix_logits(z_a: torch.Tensor, z_b: torch.Tensor, alpha: float) -> torch.Tensor:
    """z_a + alpha (z_b - z_a) in float32, bitwise z_b at alpha 1 and z_a at alpha 0.

    ``torch.lerp`` evaluates ``end - (end - start) * (1 - w)`` for w >= 0.5, so
    w = 1 returns ``end`` itself; the textbook form would round.
    """
    return torch.lerp(z_a.float(), z_b.float(), float(alpha))


def alpha_for_steps(a: float, b: float, t: float) -> float:
    """alpha = (t - a) / (b - a): the target step t on the line through steps a and b."""
    if a == b:
        raise PipelineError(f"--steps must be two different steps, got {a:g} {b:g}")
    return (t - a) / (b - a)


def pair_alpha(t0: float | None, t1: float | None, alpha: float | None, to: float | None,
               allow_negative: bool = False) -> tuple[float, float | None]:
    """(alpha, target step) of an (early, late) pair: from ``alpha``, or from ``to`` and steps.

    Exactly one of ``alpha`` and ``to`` is given; ``to`` needs both steps. A
    negative alpha walks away from the late model, past the early one: almost
    always a mistake (swapped models or steps), so it needs ``allow_negative``.
    """
    if (alpha is None) == (to is None):
        raise PipelineError("two models are a logits-extrapolation pair: give --alpha or --to "
                            "(one of them)")
    if t0 is not None and t1 is not None:
        alpha_for_steps(t0, t1, t1)  # refuses equal steps
        if t0 > t1:
            raise PipelineError(f"give the early model first (steps {t0:g} then {t1:g})")
    if to is not None:
        to = check_number(to, "--to")
        if t0 is None or t1 is None:
            raise PipelineError("--to needs the steps of both models (--steps A B, RUN@STEP or "
                                "global_step_N folder names), or give --alpha")
        a = check_number(alpha_for_steps(t0, t1, to), "alpha from the steps and --to")
        target: float | None = to
    else:
        a = check_number(alpha, "--alpha")
        target = None if t0 is None or t1 is None else t0 + a * (t1 - t0)
    if a < 0 and not allow_negative:
        raise PipelineError(f"alpha {a:g} is negative (past the early checkpoint, away from "
                            "the late one); pass --allow-negative to decode anyway")
    return a, target


def _eos_ids(m: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for v in (getattr(m.model.generation_config, "eos_token_id", None),
              m.tokenizer.eos_token_id):
        if v is not None:
            ids.update(v if isinstance(v, list | tuple) else [v])
    return ids


def _device(m: LoadedModel) -> torch.device:
    return next(m.model.parameters()).device


def _check_models(models: Sequence[LoadedModel], alpha: float) -> None:
    if len(models) not in (1, 2):
        raise PipelineError(f"decode takes one model or two (early, late), got {len(models)}")
    check_number(alpha, "--alpha")
    if len(models) == 1 and alpha != 1.0:
        raise PipelineError(f"alpha {alpha:g} needs two models (early and late)")
    if len(models) == 2:
        a, b = models
        check_same_vocab(a, b)
        if _device(a) != _device(b):
            raise PipelineError(f"the two models are on different devices ({_device(a)}, "
                                f"{_device(b)})", b.path)


def _tokenize(models: Sequence[LoadedModel], prompts: Sequence[str], max_new_tokens: int
              ) -> list[list[int]]:
    """Each prompt's ids (the late model's tokenizer, as its users call it), refused when
    empty or too long, with the new tokens, for either model's context."""
    tok = models[-1].tokenizer
    limits = [(m.max_positions, m.path) for m in models if m.max_positions is not None]
    out = []
    for i, text in enumerate(prompts):
        ids = list(tok(text, add_special_tokens=True)["input_ids"])
        if not ids:
            raise PipelineError(f"prompt {i} has no tokens")
        for limit, path in limits:
            if len(ids) + max_new_tokens > limit:
                raise PipelineError(f"prompt {i} has {len(ids)} tokens; with --max-new-tokens "
                                    f"{max_new_tokens} that exceeds the model's context of "
                                    f"{limit} positions", path)
        out.append(ids)
    return out


def _left_pad(rows: Sequence[list[int]], pad: int, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as ``transformers``' generate makes them: 0 at the first real token."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


def _cache_kwarg(model: Any) -> str:
    """The forward argument that takes the KV cache (``cache`` since transformers 5.2x)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class _Stepper:
    """One model with its own KV cache, advanced in place by each forward pass."""

    def __init__(self, model: Any) -> None:
        from transformers import DynamicCache

        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.kwarg = _cache_kwarg(model)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                         use_cache=True, logits_to_keep=1, **{self.kwarg: self.cache})
        return out.logits[:, -1]

    def select(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)


class _Batch:
    """The rows of one batch: (prompt index, sample) pairs decoded together."""

    def __init__(self, rows: list[tuple[int, int]], prompt_ids: list[list[int]],
                 models: Sequence[LoadedModel], sampling: Sampling, alpha: float) -> None:
        self.rows, self.prompt_ids, self.s, self.alpha = rows, prompt_ids, sampling, alpha
        late = models[-1]
        self.tok = late.tokenizer
        self.pad = late.tokenizer.pad_token_id
        self.eos = _eos_ids(late)
        if self.pad is None:
            self.pad = min(self.eos) if self.eos else 0
        self.device = _device(late)
        self.steppers = [_Stepper(m.model) for m in models]
        # a stop string of L characters spans at most 4L tokens (byte-level BPE: 4 per char)
        self.stop_window = 4 * max((len(x) for x in sampling.stop), default=0) + 4

    def _mixed(self, logits: list[torch.Tensor]) -> torch.Tensor:
        if len(logits) == 1:
            return logits[0].float()
        return mix_logits(logits[0], logits[1], self.alpha)

    def run(self) -> list[Completion]:
        uniq = sorted({p for p, _ in self.rows})
        where = {p: i for i, p in enumerate(uniq)}
        ids, mask = _left_pad([self.prompt_ids[p] for p in uniq], self.pad, self.device)
        pos = _positions(mask)
        src = torch.tensor([where[p] for p, _ in self.rows], device=self.device)
        logits = []
        for st in self.steppers:  # prefill each unique prompt once, then k rows from its cache
            logits.append(st.forward(ids, mask, pos)[src])
            st.select(src)
        mask, last = mask[src], pos[src, -1]
        n = len(self.rows)
        live = np.arange(n)  # batch row -> index into self.rows
        p_idx = np.array([p for p, _ in self.rows], dtype=np.int64)
        s_idx = np.array([s for _, s in self.rows], dtype=np.int64)
        tokens: list[list[int]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        for step in range(self.s.max_new_tokens):
            z = self._mixed(logits)
            u = None if self.s.greedy else torch.from_numpy(
                uniforms(self.s.seed, p_idx[live], s_idx[live], step))
            nxt = choose(z, self.s, u).tolist()
            for j, r in enumerate(live):
                if finish[r] is not None:
                    nxt[j] = self.pad
                    continue
                tok = nxt[j]
                if tok in self.eos:
                    finish[r] = "eos"
                    continue
                tokens[r].append(tok)
                if self.s.stop and self._stopped(tokens[r]):
                    finish[r] = "stop"
                elif step == self.s.max_new_tokens - 1:
                    finish[r] = "length"
            done = np.array([finish[r] is not None for r in live])
            if done.all():
                break
            if done.mean() >= COMPACT_FRACTION:
                keep = torch.from_numpy(np.flatnonzero(~done)).to(self.device)
                live = live[~done]
                for st in self.steppers:
                    st.select(keep)
                mask, last = mask[keep], last[keep]
                nxt = [nxt[j] for j in keep.tolist()]
            step_ids = torch.tensor(nxt, dtype=torch.long, device=self.device)[:, None]
            mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
            last = last + 1
            logits = [st.forward(step_ids, mask, last[:, None]) for st in self.steppers]
        return [Completion(p, s, list(self.prompt_ids[p]), tokens[r],
                           self.tok.decode(tokens[r], skip_special_tokens=True), finish[r] or
                           "length")
                for r, (p, s) in enumerate(self.rows)]

    def _stopped(self, toks: list[int]) -> bool:
        tail = self.tok.decode(toks[-self.stop_window:], skip_special_tokens=True)
        return any(x in tail for x in self.s.stop)


def decode(models: Sequence[LoadedModel], prompts: Sequence[str], k: int, sampling: Sampling,
           alpha: float = 1.0, batch_size: int = 32, *,
           rows: Sequence[tuple[int, int]] | None = None, progress: bool = False
           ) -> Iterator[Completion]:
    """One model: its own decoding. Two models (early, late): logits z_a + alpha (z_b - z_a).

    Yields k completions per prompt in order (prompt 0 samples 0..k-1, prompt
    1, ...). ``batch_size`` counts rows (prompt x sample) decoded together;
    a batch prefills each of its unique prompts once. ``rows`` restricts the
    job to some (prompt, sample) pairs, e.g. the ones a resumed evaluation
    still lacks: each gets the completion it has in the full job, since the
    draws are keyed by (seed, prompt, sample, step), not by batch. Everything
    is checked before the first forward pass, so bad input fails with nothing
    generated.
    """
    check_sampling(sampling)
    check_int(k, "-k", 1)
    check_int(batch_size, "--batch-size", 1)
    _check_models(models, alpha)
    prompt_ids = _tokenize(models, prompts, sampling.max_new_tokens)
    if rows is None:
        rows = [(p, s) for p in range(len(prompt_ids)) for s in range(k)]
    bad = [r for r in rows if not (0 <= r[0] < len(prompt_ids) and 0 <= r[1] < k)]
    if bad:
        raise PipelineError(f"row {bad[0]} is outside {len(prompt_ids)} prompts x k={k}")
    return _decode(models, prompt_ids, list(rows), sampling, alpha, batch_size, progress)


def _decode(models: Sequence[LoadedModel], prompt_ids: list[list[int]],
            rows: list[tuple[int, int]], sampling: Sampling, alpha: float, batch_size: int,
            progress: bool) -> Iterator[Completion]:
    from pipeline.console import progress_bar

    with torch.inference_mode(), progress_bar(len(rows), "generate", unit="seq",
                                              enabled=progress) as bar:
        for i in range(0, len(rows), batch_size):
            batch = _Batch(rows[i:i + batch_size], prompt_ids, models, sampling, alpha)
            done = batch.run()
            bar.update(len(done))
            yield from done


class LogitsExtrapolation:
    """A ``transformers`` logits processor: mixes the late model's scores with an early model's.

    Pass it to the late model's ``generate(logits_processor=[...])``; it runs
    ``early`` incrementally on the same ``input_ids`` with its own KV cache
    and returns ``lerp(z_early, scores, alpha)``. It must see raw logits, so
    it has to come before any temperature/top-k/top-p warper: generate runs
    its own warpers (from ``temperature=``, ``top_p=`` ...) *before* custom
    processors, so leave those at their neutral values and use
    ``extrapolation_processors`` instead. With left-padded prompts pass the
    prompts' ``attention_mask`` (rows are repeated for num_return_sequences).
    """

    def __init__(self, early: Any, alpha: float, attention_mask: torch.Tensor | None = None
                 ) -> None:
        self.model = getattr(early, "model", early)  # a LoadedModel or a PreTrainedModel
        self.alpha = check_number(alpha, "alpha")
        self.prompt_mask = attention_mask
        self._stepper: _Stepper | None = None
        self._ids: torch.Tensor | None = None  # the prefix the early model has seen
        self._mask: torch.Tensor | None = None
        self._last: torch.Tensor | None = None

    def _start_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.prompt_mask is None:
            return torch.ones_like(input_ids)
        m = self.prompt_mask.to(input_ids.device)
        if m.shape[0] != input_ids.shape[0]:
            m = m.repeat_interleave(input_ids.shape[0] // m.shape[0], dim=0)
        pad = input_ids.shape[1] - m.shape[1]
        return torch.cat([m, torch.ones_like(input_ids[:, :pad])], dim=1) if pad > 0 else m

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        st, seen = self._stepper, self._ids
        if st is None or seen is None or seen.shape[0] != input_ids.shape[0] \
                or seen.shape[1] + 1 != input_ids.shape[1] \
                or not torch.equal(seen, input_ids[:, :-1]):  # a new call: prefill it all
            st = self._stepper = _Stepper(self.model)
            self._mask = self._start_mask(input_ids)
            pos = _positions(self._mask)
            z = st.forward(input_ids, self._mask, pos)
            self._last = pos[:, -1]
        else:
            assert self._last is not None and self._mask is not None
            self._mask = torch.cat([self._mask, torch.ones_like(input_ids[:, -1:])], dim=1)
            self._last = self._last + 1
            z = st.forward(input_ids[:, -1:], self._mask, self._last[:, None])
        self._ids = input_ids
        return mix_logits(z, scores, self.alpha).to(scores.dtype)


def extrapolation_processors(early: Any, alpha: float, sampling: Sampling | None = None,
                             attention_mask: torch.Tensor | None = None) -> Any:
    """``LogitsProcessorList``: the mix first, then ``sampling``'s warpers in generate's order.

    Use with ``do_sample=True, temperature=1.0, top_p=1.0, top_k=0`` (or
    ``do_sample=False`` for greedy) so generate adds no warper of its own.
    """
    from transformers import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs: list[Any] = [LogitsExtrapolation(early, alpha, attention_mask)]
    if sampling is not None and not sampling.greedy:
        if sampling.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k > 0:
            procs.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1.0:
            procs.append(TopPLogitsWarper(sampling.top_p))
    return LogitsProcessorList(procs)


DEVICES = ("cpu", "cuda")


def check_device(device: str) -> str:
    """``cpu`` or ``cuda[:N]``, refused up front when no GPU is there to take it."""
    kind = device.split(":", 1)[0]
    if kind not in DEVICES:
        raise PipelineError(f"unknown --device {device!r} (expected cpu or cuda)")
    if kind == "cuda" and not torch.cuda.is_available():
        raise PipelineError("--device cuda: no CUDA device is available")
    return device


@dataclass(frozen=True)
class GenerateReport:
    out: Any  # Path
    completions: int
    new_tokens: int
    finish: dict[str, int]
    seconds: float


def generate_file(checkpoints: Sequence[Any], prompts_file: Any, out: Any, k: int,
                  sampling: Sampling, alpha: float = 1.0, batch_size: int = 32,
                  device: str = "cpu", dtype: str = "auto", progress: bool = True
                  ) -> GenerateReport:
    """``rlvr-lin generate``: completions of every prompt, written atomically as JSONL.

    One line per completion, in (prompt, sample) order, with the prompt's
    ``id`` and ``answer`` carried along so a scorer needs nothing else. The
    file appears only once every completion is written.
    """
    import time
    from pathlib import Path

    from pipeline.errors import check_output
    from pipeline.outputs.models import load_model
    from pipeline.outputs.records import read_prompts, write_jsonl

    check_sampling(sampling)
    check_device(device)
    check_output(out, [("the prompts file", prompts_file),
                       *(("a checkpoint", c) for c in checkpoints)])
    prompts = read_prompts(prompts_file)
    models = [load_model(c, device, dtype) for c in checkpoints]
    completions = decode(models, [p.text for p in prompts], k, sampling, alpha, batch_size,
                         progress=progress)
    finish = dict.fromkeys(FINISH, 0)
    count = [0, 0]
    t0 = time.perf_counter()

    def records() -> Iterator[dict[str, Any]]:
        for c in completions:
            p = prompts[c.prompt_index]
            finish[c.finish] += 1
            count[0] += 1
            count[1] += len(c.token_ids)
            yield {"prompt_index": c.prompt_index, "sample": c.sample, "id": p.id,
                   "prompt": p.text, "answer": p.answer, "alpha": alpha, "text": c.text,
                   "finish": c.finish, "prompt_ids": c.prompt_ids, "token_ids": c.token_ids}

    write_jsonl(out, records())
    return GenerateReport(Path(out), count[0], count[1], finish, time.perf_counter() - t0)
