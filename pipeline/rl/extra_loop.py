"""RL-Extra around an external trainer: train m steps, jump, repeat, resumable by cycle.

Each cycle runs the user's command (verl, OpenRLHF, a TRL script) from the
cycle's init model for m real steps, finds the HF checkpoint it wrote, and
exports the jump theta_start + ((m + n) / m) (theta_end - theta_start) with
the project's two-point export (float32, norms copied by default), which is
the next cycle's init. This is what the authors ran (a fresh trainer per
cycle, so the optimizer state is reset at every jump).

Layout of ``--out``::

    rl_extra.json                the ledger: settings + one entry per completed cycle
    cycles/cycle_000/train/      the command's {out} (its own checkpoints)
    cycles/cycle_000/train.log   the command's stdout and stderr
    run/global_step_0/           a copy of --init (the trajectory's start)
    run/global_step_{k m}/       the jumped model after cycle k-1, + nominal_step.json

``run/`` is an ordinary run folder on the nominal axis (steps 0, m+n,
2(m+n), ...; the real steps beside them), so ingest/fit/report take it as is.

Why it is built this way: a cycle costs hours on a real cluster, so a crash
must never cost a completed one. The ledger is rewritten atomically after
each cycle's model is in place; a re-run checks its settings against the
ledger (refusing any difference but the number of cycles), adopts a cycle
whose model landed just before a crash, redoes one that did not finish, and
never touches a completed cycle's files. A failing command, a missing
checkpoint or a checkpoint of another architecture is a one-line error that
leaves the last good model where it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import string
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.checkpoints.discover import INNER, STEP_META_FILE, Checkpoint
from pipeline.checkpoints.reader import CheckpointReader, has_weights
from pipeline.errors import PipelineError, check_int, check_output
from pipeline.extrapolate.plan import DEFAULT_EXCLUDE

LEDGER_FILE = "rl_extra.json"
LEDGER_VERSION = 1
DEFAULT_CHECKPOINT_GLOB = "global_step_{m}"
PLACEHOLDERS = ("init", "out", "m", "cycle", "start_step", "nominal_step")
# config.json keys that change what the tensors mean (a different model, same names)
ARCH_KEYS = ("model_type", "architectures", "hidden_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size",
             "tie_word_embeddings")


@dataclass(frozen=True)
class LoopSettings:
    """What decides the run; a resumed run must have the same (cycles may grow)."""

    trainer_cmd: str
    m: int
    n: int
    init: str  # absolute path of --init
    init_signature: str  # sha256 of its architecture (config keys + tensor table)
    checkpoint_glob: str = DEFAULT_CHECKPOINT_GLOB
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    dtype: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "include": list(self.include), "exclude": list(self.exclude)}


@dataclass
class CycleRecord:
    cycle: int
    init: str  # the model the command trained from (relative to --out when inside)
    trainer_checkpoint: str
    model: str  # the jumped model, run/global_step_{real}
    real_step: int
    nominal_step: int
    seconds: float


@dataclass
class LoopResult:
    out: Path
    settings: LoopSettings
    cycles: list[CycleRecord] = field(default_factory=list)
    ran: list[int] = field(default_factory=list)  # cycles run (or adopted) by this call

    @property
    def last_model(self) -> Path:
        return self.out / (self.cycles[-1].model if self.cycles else "run/global_step_0")


def render_command(template: str, values: dict[str, Any]) -> str:
    """The command for one cycle: placeholders substituted, paths shell-quoted.

    Only :data:`PLACEHOLDERS` are allowed (``{{``/``}}`` for literal braces);
    anything else is refused before a cycle starts, naming ``--trainer-cmd``.
    """
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise PipelineError(f"--trainer-cmd: bad template: {e}") from None
    bad = [f for f in fields if f not in PLACEHOLDERS]
    if bad:
        raise PipelineError(f"--trainer-cmd: unknown placeholder {{{bad[0]}}} (known: "
                            f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)})")
    if "init" not in fields:
        raise PipelineError("--trainer-cmd must contain {init}: the model each cycle trains from")
    quoted = {k: shlex.quote(str(v)) for k, v in values.items()}
    return template.format(**quoted)


def checkpoint_pattern(pattern: str, m: int, cycle: int) -> str:
    """``--checkpoint-glob`` for one cycle: {m}, {cycle}, {start_step}, {nominal_step} filled."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None]
    except ValueError as e:
        raise PipelineError(f"--checkpoint-glob: bad pattern: {e}") from None
    known = ("m", "cycle", "start_step")
    bad = [f for f in fields if f not in known]
    if bad:
        raise PipelineError(f"--checkpoint-glob: unknown placeholder {{{bad[0]}}} (known: "
                            f"{', '.join('{' + p + '}' for p in known)})")
    return pattern.format(m=m, cycle=cycle, start_step=cycle * m)


def arch_signature(folder: Path) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """A model's architecture: the config keys that define it and every tensor's shape."""
    reader = CheckpointReader(folder)
    cfg = reader.config or {}
    keys = {k: cfg.get(k) for k in ARCH_KEYS if k in cfg}
    return keys, {n: list(reader.shape(n)) for n in reader.tensor_names}


def _digest(sig: tuple[dict[str, Any], dict[str, list[int]]]) -> str:
    return hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()


def check_same_arch(init: Path, got: Path, cycle: int) -> None:
    """Refuse a trainer checkpoint whose architecture differs from the cycle's init."""
    (ca, ta), (cb, tb) = arch_signature(init), arch_signature(got)
    diff = [f"{k}: {ca.get(k)!r} vs {cb.get(k)!r}" for k in sorted(set(ca) | set(cb))
            if ca.get(k) != cb.get(k)]
    names = sorted(set(ta) ^ set(tb))
    if names:
        diff.append(f"tensors only in one: {', '.join(names[:3])}")
    diff += [f"{n}: {ta[n]} vs {tb[n]}" for n in sorted(set(ta) & set(tb)) if ta[n] != tb[n]]
    if diff:
        raise PipelineError(f"cycle {cycle}: the trainer's checkpoint has another architecture "
                            f"than the cycle's init model {init} ({'; '.join(diff[:3])})", got)


def find_checkpoint(train_out: Path, pattern: str, cycle: int, log_file: Path) -> Path:
    """The weights folder the command wrote: the one match of ``pattern`` under its output."""
    matches = sorted(p for p in train_out.glob(pattern) if p.is_dir())
    found = []
    for p in matches:
        for inner in INNER:
            cand = p / inner if inner else p
            if cand.is_dir() and has_weights(cand):
                found.append(cand)
                break
    if not found:
        raise PipelineError(f"cycle {cycle}: the trainer command produced no checkpoint "
                            f"matching {pattern!r} (with weights) under {train_out}; see "
                            f"{log_file}")
    if len(found) > 1:
        raise PipelineError(f"cycle {cycle}: --checkpoint-glob {pattern!r} matches "
                            f"{len(found)} checkpoints ({', '.join(map(str, found[:3]))}); "
                            "make it match one", train_out)
    return found[0]


def _write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


def _read_ledger(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PipelineError(f"unreadable RL-Extra ledger: {e}", path) from None
    if not isinstance(doc, dict) or doc.get("version") != LEDGER_VERSION:
        raise PipelineError(f"not an RL-Extra ledger (version {LEDGER_VERSION})", path)
    return doc


def _check_resume(doc: dict[str, Any], settings: LoopSettings, path: Path,
                  log: Callable[[str], None]) -> bool:
    """Refuse other settings once a cycle is completed; before that, the new ones win.

    Returns True when the settings were replaced (the first cycle failed, e.g. a
    typo in the command, and the user fixed it: nothing done depends on them).
    """
    old = doc.get("settings", {})
    new = settings.as_dict()
    diff = [k for k in new if old.get(k) != new[k]]
    if not diff:
        return False
    if not doc.get("cycles"):
        log(f"no cycle completed yet: new settings ({', '.join(diff)}) replace the old ones")
        doc["settings"] = new
        return True
    k = diff[0]
    raise PipelineError(f"this --out holds an RL-Extra run with other settings ({k}: "
                        f"{old.get(k)!r} there, {new[k]!r} now) and {len(doc['cycles'])} "
                        "completed cycle(s); resume with the same settings or choose another "
                        "--out", path)


def _copy_model(src: Path, dst: Path, meta: dict[str, Any] | None = None) -> None:
    """Copy a model folder's files into ``dst`` atomically (hidden sibling, then rename)."""
    tmp = dst.parent / f".{dst.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in (STEP_META_FILE, "training_args.bin"):
            shutil.copy2(f, tmp / f.name)
    if meta is not None:
        (tmp / STEP_META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, dst)


def _jump(start: Path, end: Path, dst: Path, cycle: int, settings: LoopSettings,
          meta: dict[str, Any]) -> None:
    """Export Eq. 3's model from the segment's two ends into ``dst`` with its step metadata."""
    from pipeline.extrapolate.export import export, make_spec
    from pipeline.extrapolate.sources import CheckpointSource

    m, n = settings.m, settings.n
    real0 = cycle * m
    source = CheckpointSource([Checkpoint(real0, start), Checkpoint(real0 + m, end)])
    spec = make_spec(source, "two-point", alpha=(m + n) / m, include=settings.include,
                     exclude=settings.exclude, allow_interpolation=True)  # n = 0: alpha 1
    staging = dst.parent / f".{dst.name}.jump"
    shutil.rmtree(staging, ignore_errors=True)
    export(source, staging, spec, dtype=settings.dtype)
    # the metadata goes in before the folder appears under its step name, so a watcher
    # (ingest --watch) never sees the jumped model at its real step
    (staging / STEP_META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    os.replace(staging, dst)


def run_rl_extra(
    trainer_cmd: str,
    m: int,
    n: int,
    cycles: int,
    init: str | Path,
    out: str | Path,
    checkpoint_glob: str = DEFAULT_CHECKPOINT_GLOB,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    dtype: str | None = None,
    log: Callable[[str], None] = print,
    env: dict[str, str] | None = None,
) -> LoopResult:
    """Run (or resume) ``cycles`` cycles of train-m-steps-then-jump; returns the ledger."""
    check_int(m, "-m", 1)
    check_int(n, "-n", 0)
    check_int(cycles, "--cycles", 1)
    init_p, out_p = Path(init).resolve(), Path(out)
    if not init_p.is_dir() or not has_weights(init_p) or not (init_p / "config.json").is_file():
        raise PipelineError("--init must be a model folder with config.json and weights", init)
    check_output(out_p, [("the --init model", init_p)])
    if not checkpoint_glob or Path(checkpoint_glob).is_absolute() or ".." in Path(
            checkpoint_glob).parts:
        raise PipelineError(f"--checkpoint-glob must be a relative glob under the trainer's "
                            f"{{out}}, got {checkpoint_glob!r}")
    if dtype is not None:
        from pipeline.extrapolate.export import output_dtype

        output_dtype(dtype)
    settings = LoopSettings(trainer_cmd, m, n, str(init_p), _digest(arch_signature(init_p)),
                            checkpoint_glob, tuple(include), tuple(exclude), dtype)
    render_command(trainer_cmd, dict.fromkeys(PLACEHOLDERS, "x"))  # refuse a bad one now
    checkpoint_pattern(checkpoint_glob, m, 0)

    out_p.mkdir(parents=True, exist_ok=True)
    ledger_path = out_p / LEDGER_FILE
    doc = _read_ledger(ledger_path)
    if doc is None:
        if any(p.name != LEDGER_FILE for p in out_p.iterdir()):
            raise PipelineError("--out exists, is not empty and holds no RL-Extra ledger", out_p)
        doc = {"version": LEDGER_VERSION, "settings": settings.as_dict(), "cycles": []}
        _write_json_atomic(ledger_path, doc)
    elif _check_resume(doc, settings, ledger_path, log):
        # the start copy may be of another --init: removed first, so a crash here leaves
        # the old settings with no start, which the next call replaces again
        shutil.rmtree(out_p / "run", ignore_errors=True)
        _write_json_atomic(ledger_path, doc)
    start0 = out_p / "run" / "global_step_0"
    if not start0.is_dir():  # a first call, or one that stopped before the copy landed
        start0.parent.mkdir(exist_ok=True)
        _copy_model(init_p, start0, {"real_step": 0, "nominal_step": 0, "jumps": 0,
                                     "method": "rl-extra", "m": m, "n": n})
    result = LoopResult(out_p, settings, [CycleRecord(**c) for c in doc["cycles"]])
    if len(result.cycles) >= cycles:
        log(f"{len(result.cycles)} cycle(s) already done; nothing to run")
    for k in range(len(result.cycles), cycles):
        rec = _cycle(k, settings, out_p, log, env)
        result.cycles.append(rec)
        result.ran.append(k)
        doc["cycles"].append(asdict(rec))
        _write_json_atomic(ledger_path, doc)
    return result


def _rel(p: Path, base: Path) -> str:
    try:
        return p.relative_to(base).as_posix()
    except ValueError:
        return str(p)


def _cycle(k: int, s: LoopSettings, out: Path, log: Callable[[str], None],
           env: dict[str, str] | None) -> CycleRecord:
    """Cycle ``k``: the command from the cycle's init, then the jump (or adopt a landed one)."""
    t0 = time.perf_counter()
    m, n = s.m, s.n
    start = out / "run" / f"global_step_{k * m}"
    real, nominal = (k + 1) * m, (k + 1) * (m + n)
    dst = out / "run" / f"global_step_{real}"
    meta = {"real_step": real, "nominal_step": nominal, "jumps": k + 1, "method": "rl-extra",
            "m": m, "n": n, "cycle": k}
    cdir = out / "cycles" / f"cycle_{k:03d}"
    train_out, log_file = cdir / "train", cdir / "train.log"
    landed = dst / STEP_META_FILE
    if landed.is_file() and json.loads(landed.read_text()).get("cycle") == k:
        # the model of this cycle was published, the ledger entry was not: adopt it
        ckpt = find_checkpoint(train_out, checkpoint_pattern(s.checkpoint_glob, m, k), k, log_file)
        log(f"cycle {k}: model already in place ({dst}); recorded")
        return CycleRecord(k, _rel(start, out), _rel(ckpt, out), _rel(dst, out), real,
                           nominal, 0.0)
    shutil.rmtree(dst, ignore_errors=True)  # never a completed cycle's: that is in the ledger
    shutil.rmtree(cdir, ignore_errors=True)  # an unfinished attempt is redone from scratch
    train_out.mkdir(parents=True)
    cmd = render_command(s.trainer_cmd, {"init": start.resolve(), "out": train_out.resolve(),
                                         "m": m, "cycle": k, "start_step": k * m,
                                         "nominal_step": k * (m + n)})
    log(f"cycle {k}: training {m} step(s) from {_rel(start, out)}: {cmd}")
    with log_file.open("wb") as f:
        rc = subprocess.run(cmd, shell=True, stdout=f, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}).returncode
    if rc != 0:
        raise PipelineError(f"cycle {k}: the trainer command failed (exit code {rc}); see "
                            f"{log_file}; the last good model is {start}")
    ckpt = find_checkpoint(train_out, checkpoint_pattern(s.checkpoint_glob, m, k), k, log_file)
    check_same_arch(start, ckpt, k)
    _jump(start, ckpt, dst, k, s, meta)
    log(f"cycle {k}: jumped to nominal step {nominal} (real {real}): {_rel(dst, out)}")
    return CycleRecord(k, _rel(start, out), _rel(ckpt, out), _rel(dst, out), real, nominal,
                       round(time.perf_counter() - t0, 1))
