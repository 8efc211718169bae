"""The token log-prob store: one StepStore row per checkpoint, the token table beside it.

::

    run.logprobs.zarr/          a StepStore of kind "logprobs" (``pipeline.steps.store``)
      arrays/logprob/           float32 (n_steps, n_tokens): log p(token | prefix)
      arrays/logit/             float32 (n_steps, n_tokens): the chosen token's raw logit
      tokens/                   the token table, written once before the first row:
                                probe, position, token_id, text, prompt_index, sample
                                (one per token) and line, prompt (one per probe)

Token k of the table is column k of every row, so the fit sees each token
as one element (``pipeline.outputs.token_fit``). The root attributes hold a
fingerprint of the probes and of the vocabulary: a re-run with another
probes file, a checkpoint with another vocabulary or a different compute
dtype is refused rather than mixed into the same columns. Only missing
checkpoints are computed; a run that died mid-checkpoint resumes at that
row (the StepStore commit marker is written last).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.checkpoints.discover import Checkpoint, discover_checkpoints
from pipeline.errors import PipelineError, check_int, check_output
from pipeline.outputs.records import Probe, read_probes
from pipeline.outputs.teacher_forcing import (
    DEFAULT_BATCH_TOKENS,
    DEFAULT_VOCAB_CHUNK,
    check_head,
    input_length,
    teacher_force,
)
from pipeline.steps.store import ArraySpec, StepStore

KIND = "logprobs"
ARRAYS = ("logprob", "logit")
TOKENS_GROUP = "tokens"
TOKEN_CHUNK = 1 << 20  # tokens per stored chunk (4 MB of float32)
PER_TOKEN = ("probe", "position", "token_id", "text", "prompt_index", "sample")
PER_PROBE = ("line", "prompt")


@dataclass(frozen=True)
class TokenTable:
    """Which token each column is: per-token arrays and, per probe, its line and prompt."""

    probe: np.ndarray  # int64: index of the probe in the probes file (0-based)
    position: np.ndarray  # int64: index of the token in its response
    token_id: np.ndarray  # int64
    text: np.ndarray  # str: the token decoded on its own
    prompt_index: np.ndarray  # int64
    sample: np.ndarray  # int64
    line: np.ndarray  # int64, per probe: its line in the probes file
    prompt: np.ndarray  # str, per probe

    def __len__(self) -> int:
        return int(self.token_id.shape[0])

    @staticmethod
    def from_probes(probes: Sequence[Probe], lines: Sequence[int], tokenizer: Any) -> TokenTable:
        cache: dict[int, str] = {}

        def text(i: int) -> str:
            if i not in cache:
                cache[i] = tokenizer.decode([i]) or str(tokenizer.convert_ids_to_tokens(i))
            return cache[i]

        n = [len(p.response_ids) for p in probes]
        rep = np.repeat(np.arange(len(probes)), n)
        return TokenTable(
            probe=rep.astype(np.int64),
            position=np.concatenate([np.arange(k) for k in n]).astype(np.int64),
            token_id=np.array([i for p in probes for i in p.response_ids], np.int64),
            text=np.array([text(i) for p in probes for i in p.response_ids], dtype=object),
            prompt_index=np.array([p.prompt_index for p in probes], np.int64)[rep],
            sample=np.array([p.sample for p in probes], np.int64)[rep],
            line=np.asarray(lines, np.int64),
            prompt=np.array([p.prompt for p in probes], dtype=object))

    def context(self, k: int, width: int = 16) -> str:
        """The text before token ``k`` (its prompt and the response so far), last ``width``
        characters."""
        start = k - int(self.position[k])
        before = str(self.prompt[int(self.probe[k])]) + "".join(self.text[start:k])
        return before[-width:]

    def write(self, store: Path) -> None:
        g = zarr.open_group(str(store), mode="r+").create_group(TOKENS_GROUP)
        for name in (*PER_TOKEN, *PER_PROBE):
            values = getattr(self, name)
            is_text = values.dtype == object
            arr = g.create_array(name, shape=values.shape, chunks=(max(1, min(
                TOKEN_CHUNK, values.shape[0])),), dtype=str if is_text else values.dtype,
                fill_value="" if is_text else 0)
            if values.size:
                arr[:] = values

    @staticmethod
    def read(store: Path) -> TokenTable:
        try:
            g = zarr.open_group(str(store), path=TOKENS_GROUP, mode="r")
            return TokenTable(**{n: np.asarray(g[n][:]) for n in (*PER_TOKEN, *PER_PROBE)})
        except (KeyError, FileNotFoundError, zarr.errors.NodeNotFoundError):
            raise PipelineError("log-prob store has no token table", store) from None

    def frame(self) -> Any:
        """The per-token table as a pandas DataFrame (one row per stored column)."""
        import pandas as pd

        return pd.DataFrame({n: getattr(self, n) for n in PER_TOKEN})


def probe_lines(path: str | Path) -> list[int]:
    """Line numbers of the probes ``read_probes`` returns (it skips blank lines)."""
    with open(path, encoding="utf-8") as f:
        return [no for no, line in enumerate(f, 1) if line.strip()]


def probes_fingerprint(probes: Sequence[Probe]) -> str:
    """What the columns depend on: every probe's ids, prompt index and sample, in order."""
    blob = json.dumps([[p.prompt_index, p.sample, p.prompt_ids, p.response_ids]
                       for p in probes], separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def vocab_key(loaded: Any) -> dict[str, Any]:
    """What two checkpoints must share for a token id to mean one token in both.

    The same facts ``pipeline.outputs.models.check_same_vocab`` compares, kept
    in the store's attributes so a later checkpoint is checked without
    loading the first one again.
    """
    vocab = sorted(loaded.tokenizer.get_vocab().items())
    tok = loaded.tokenizer
    return {"vocab_size": loaded.vocab_size,
            "tokenizer_sha256": hashlib.sha256(json.dumps(vocab).encode()).hexdigest(),
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def default_store(run_dir: str | Path) -> Path:
    """``runs/x`` -> ``runs/x.logprobs.zarr`` beside the run (never inside it)."""
    run_dir = Path(run_dir).resolve()
    return run_dir.with_name(run_dir.name + ".logprobs.zarr")


@contextmanager
def writer_lock(store: Path) -> Iterator[None]:
    """One writer per store: a flock on a hidden file beside it (the store folder itself
    is laid out afresh while no step is committed, so the lock cannot live inside)."""
    store.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(store.with_name(f".{store.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineError("another `logprobs` run is writing this store", store) from None
        yield
    finally:
        os.close(fd)


class LogprobStore:
    """A finished or growing log-prob store, read back: steps, token table, rows."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.steps_store = StepStore.open(self.path, KIND)
        self.tokens = TokenTable.read(self.path)

    @property
    def steps(self) -> list[int]:
        return self.steps_store.steps

    @property
    def attrs(self) -> dict[str, Any]:
        return self.steps_store.attrs

    def values(self, name: str = "logprob") -> np.ndarray:
        """(n_steps, n_tokens) float32 of ``logprob`` or ``logit``."""
        return self.steps_store.read_block(name)


@dataclass(frozen=True)
class LogprobReport:
    store: Path
    steps: list[int]  # every committed step
    new_steps: list[int]  # computed by this call
    n_tokens: int
    seconds: float  # teacher forcing only (loading excluded)


def _check_probes(probes: Sequence[Probe], lines: Sequence[int], path: Path, loaded: Any) -> None:
    """Every id inside the vocabulary and every probe inside the model's context."""
    vocab, ctx = loaded.vocab_size, loaded.max_positions
    for p, no in zip(probes, lines, strict=True):
        bad = [i for i in (*p.prompt_ids, *p.response_ids) if i >= vocab]
        if bad:
            raise PipelineError(f"{path}:{no}: token id {bad[0]} is outside the model's "
                                f"vocabulary of {vocab} ({loaded.path})")
        n = input_length(p.prompt_ids, p.response_ids)
        if ctx is not None and n > ctx:
            raise PipelineError(f"{path}:{no}: the model would read {n} tokens (prompt + "
                                f"response - 1), longer than its context of {ctx} "
                                f"({loaded.path})")


def _check_same(attrs: dict[str, Any], key: dict[str, Any], dtype: str, ck: Checkpoint,
                store: Path) -> None:
    first = attrs.get("first_checkpoint", "?")
    diff = [f"{k} {attrs['vocab'].get(k)!r} there, {v!r} here" for k, v in key.items()
            if attrs["vocab"].get(k) != v]
    if diff:
        raise PipelineError(f"step {ck.step} ({ck.path}): vocabulary/tokenizer differs from "
                            f"the store's first checkpoint ({first}): {'; '.join(diff)}; "
                            "log-probs of different vocabularies cannot share columns", store)
    if attrs["dtype"] != dtype:
        raise PipelineError(f"step {ck.step}: computed in {dtype} but the store's rows are "
                            f"{attrs['dtype']} (pass the same --dtype, or another --out)", store)


def _existing(out: Path, fingerprint: str, probes_path: Path) -> StepStore | None:
    """The store at ``out`` when it has committed rows of these probes, else None."""
    if not (out / "zarr.json").exists():
        return None
    st = StepStore.open(out, KIND)
    if not st.steps:
        return None  # laid out, nothing committed: laid out afresh
    if st.attrs.get("probes_sha256") != fingerprint:
        raise PipelineError(f"was made from other probes ({st.attrs.get('probes_file')}); "
                            f"{probes_path} differs, so its tokens would not match the "
                            "columns: choose another --out", out)
    return st


def compute_logprobs(run_dir: str | Path, probes_path: str | Path, out: str | Path | None = None,
                     *, device: str = "cpu", dtype: str = "auto",
                     batch_tokens: int = DEFAULT_BATCH_TOKENS,
                     vocab_chunk: int = DEFAULT_VOCAB_CHUNK, step_pattern: str | None = None,
                     progress: bool = True) -> LogprobReport:
    """Teacher-force every probe through every checkpoint not yet in the store."""
    import torch

    from pipeline.console import progress_bar
    from pipeline.outputs.models import load_model, torch_dtype

    check_int(batch_tokens, "--batch-tokens", 1)
    check_int(vocab_chunk, "--vocab-chunk", 1)
    torch_dtype(dtype)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"--device {device}: no CUDA device is available here")
    run_dir, probes_path = Path(run_dir), Path(probes_path)
    out = Path(out) if out is not None else default_store(run_dir)
    probes = read_probes(probes_path)
    lines = probe_lines(probes_path)
    pairs = [(p.prompt_ids, p.response_ids) for p in probes]
    n_tokens = sum(len(r) for _, r in pairs)
    if n_tokens == 0:
        raise PipelineError("every probe has an empty response: no tokens to score", probes_path)
    checkpoints = discover_checkpoints(run_dir, step_pattern)
    if not checkpoints:
        raise PipelineError("no checkpoints found (expected global_step_N/ folders)", run_dir)
    check_output(out, [("the run folder", run_dir), ("the probes file", probes_path)])
    fingerprint = probes_fingerprint(probes)
    with writer_lock(out):
        st = _existing(out, fingerprint, probes_path)
        done = st.steps if st is not None else []
        todo = [c for c in checkpoints if c.step not in done]
        early = [c.step for c in todo if done and c.step < done[-1]]
        if early:
            raise PipelineError(f"steps {early} are earlier than the store's last step "
                                f"{done[-1]}; a log-prob store only appends: use another --out",
                                out)
        new, seconds = [], 0.0
        with progress_bar(len(todo) * n_tokens, "logprobs", unit="tok",
                          enabled=progress) as bar:
            for ck in todo:
                loaded = load_model(ck.path, device, dtype)
                got_dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
                _check_probes(probes, lines, probes_path, loaded)
                if st is None:
                    check_head(loaded.model, next(p for p in pairs if p[1]), vocab_chunk)
                    st = _create(out, probes, lines, loaded, {
                        "probes_sha256": fingerprint, "probes_file": str(probes_path),
                        "n_tokens": n_tokens, "run_dir": str(run_dir),
                        "vocab": vocab_key(loaded), "dtype": got_dtype,
                        "first_checkpoint": f"step {ck.step} at {ck.path}"})
                _check_same(st.attrs, vocab_key(loaded), got_dtype, ck, out)
                t0 = time.perf_counter()
                pad = loaded.tokenizer.pad_token_id or 0
                lp, z = teacher_force(loaded.model, pairs, batch_tokens=batch_tokens,
                                      vocab_chunk=vocab_chunk, pad_id=pad, on_tokens=bar.update)
                dt = time.perf_counter() - t0
                seconds += dt
                st.append(ck.step, {"logprob": lp, "logit": z},
                          {"checkpoint": str(ck.path), "device": device, "seconds": dt,
                           "tokens_per_s": n_tokens / dt if dt > 0 else None})
                new.append(ck.step)
                del loaded
    return LogprobReport(out, st.steps if st is not None else done, new, n_tokens, seconds)


def _create(out: Path, probes: Sequence[Probe], lines: Sequence[int], loaded: Any,
            attrs: dict[str, Any]) -> StepStore:
    """Lay out the store and write its token table (before any row, so a row implies it)."""
    n = int(attrs["n_tokens"])
    spec = ArraySpec((n,), "float32", chunk=(TOKEN_CHUNK,), fill_value=np.nan)
    st = StepStore.create(out, KIND, {name: spec for name in ARRAYS}, attrs)
    TokenTable.from_probes(probes, lines, loaded.tokenizer).write(out)
    return st
