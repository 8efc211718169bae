"""The evaluation loop: generate what is missing, grade each sample, append it, score all.

One loop serves a checkpoint, an exported (extrapolated) model and a
logits-extrapolation pair, so the three can stand side by side at the same
target step under the same task, k and sampling.

Resume: every graded sample is appended to ``samples.jsonl`` as it comes
(``records.Appender``: flushed per line, a torn last line cut on reopen), and
the settings that determine the samples (models, task, k, sampling, dtype)
sit in ``settings.json``. A re-run with the same settings generates only the
missing (problem, sample) pairs; with other settings it is refused, because
mixing samples of two configurations would score neither. Resumed results
equal an uninterrupted run's because decoding draws are counter-based: a
sample depends on (seed, prompt index, sample index, step) and its logits,
not on which rows shared its batch.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError, check_int
from pipeline.evaluation.metrics import Summary, summarize
from pipeline.evaluation.tasks import EvalTask

SETTINGS = "settings.json"
SAMPLES = "samples.jsonl"
METRICS = "metrics.json"
WRITES = (SETTINGS, SAMPLES, METRICS)
SCHEMA = 1
SAMPLE_FIELDS = {"problem": str, "prompt_index": int, "sample": int, "text": str,
                 "token_ids": list, "finish": str, "correct": bool}

Row = tuple[int, int]  # (prompt index, sample index)
# rows -> completions with .prompt_index .sample .token_ids .text .finish (generate.Completion)
Generate = Callable[[Sequence[Row]], Iterable[Any]]


# ---------------------------------------------------------------- what is evaluated
@dataclass(frozen=True)
class ModelRef:
    """A model folder and, when known, the training step it was saved at."""

    path: Path
    step: int | None = None


def _step_from_name(folder: Path) -> int | None:
    """The step in ``global_step_N`` / ``checkpoint-N`` (or verl's ``.../actor/huggingface``).

    Only the folder and two parents are looked at: an exported model inside
    ``checkpoint-100/exports/`` is not step 100.
    """
    from pipeline.checkpoints.discover import DEFAULT_PATTERNS

    for p in [folder, *folder.parents][:3]:
        for pat in DEFAULT_PATTERNS:
            m = re.fullmatch(pat, p.name)
            if m:
                return int(m.group("step"))
    return None


def resolve_model(arg: str, catalog: Path | None = None) -> ModelRef:
    """``DIR`` (a model folder) or ``RUN@STEP`` (a run directory or catalog name at a step)."""
    from pipeline.catalog import resolve
    from pipeline.checkpoints import discover_checkpoints

    path = Path(arg)
    if path.exists() or "@" not in arg:
        if not (path / "config.json").is_file():
            hint = " (a run directory? name a checkpoint as RUN@STEP)" if path.is_dir() else ""
            raise PipelineError(f"not a model folder (no config.json){hint}", path)
        return ModelRef(path, _step_from_name(path.resolve()))
    run, _, step_text = arg.rpartition("@")
    if not step_text.isdigit():
        raise PipelineError(f"{arg!r}: expected RUN@STEP with STEP a checkpoint step")
    target = resolve(run, catalog)
    found = {c.step: c.path for c in discover_checkpoints(target.checkpoints,
                                                           target.step_pattern)}
    step = int(step_text)
    if step not in found:
        raise PipelineError(f"no checkpoint at step {step} (has {sorted(found)})",
                            target.checkpoints)
    return ModelRef(found[step], step)


def with_steps(models: list[ModelRef], steps: Sequence[int] | None) -> list[ModelRef]:
    """The pair with its steps given explicitly (``--steps A B``) instead of from names."""
    if steps is None:
        return models
    if len(models) != 2:
        raise PipelineError("--steps A B is for a pair of models (early late)")
    for s in steps:
        check_int(s, "--steps", 0)
    return [ModelRef(m.path, int(s)) for m, s in zip(models, steps, strict=True)]


def pair_alpha(models: Sequence[ModelRef], alpha: float | None, to: float | None,
               allow_negative: bool = False) -> tuple[float, float | None]:
    """(alpha, target step) of what is evaluated: one model is its own decoding (alpha 1,
    target its step); two are an (early, late) pair (``generate.pair_alpha``)."""
    from pipeline.outputs.generate import pair_alpha as alpha_of_pair

    if len(models) == 1:
        if alpha is not None or to is not None:
            raise PipelineError("--alpha and --to need two models (early and late)")
        return 1.0, None if models[0].step is None else float(models[0].step)
    if len(models) != 2:
        raise PipelineError(f"give one model, or two (early late), not {len(models)}")
    return alpha_of_pair(models[0].step, models[1].step, alpha, to, allow_negative)


def weights_fingerprint(folder: Path, sample_bytes: int = 1 << 20) -> str:
    """A cheap identity of a model folder's contents: config plus sampled weight bytes.

    Hashing whole multi-GB files would cost more than a small evaluation;
    the config, each weight file's size and its first and last MiB change
    whenever the weights do (a re-export with another alpha rewrites them all).
    """
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(sample_bytes))
            fh.seek(max(0, size - sample_bytes))
            h.update(fh.read(sample_bytes))
    return h.hexdigest()[:32]


def eval_settings(models: Sequence[ModelRef], alpha: float, target: float | None,
                  task: EvalTask, k: int, sampling: Any, dtype: str) -> dict[str, Any]:
    """Everything that decides the samples; a resumed run must match it exactly.

    Device and batch size are left out: they change speed, not the draws.
    """
    return {
        "schema": SCHEMA,
        "models": [{"path": str(m.path.resolve()), "step": m.step,
                    "weights": weights_fingerprint(m.path)} for m in models],
        "alpha": float(alpha),
        "target_step": target,
        "task": task.spec,
        "task_fingerprint": task.fingerprint,
        "n_problems": len(task.problems),
        "k": k,
        "sampling": json.loads(json.dumps(asdict(sampling))),  # tuples as lists, as on disk
        "dtype": dtype,
    }


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for key, v in d.items():
            out.update(_flat(v, f"{prefix}{key}."))
        return out
    if isinstance(d, list) and d and isinstance(d[0], dict):
        out = {}
        for i, v in enumerate(d):
            out.update(_flat(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: d}


# where things were, not what they are: a moved model or problems file is the same input
# (the weights fingerprint and the task fingerprint say what they are)
INFORMATIONAL = re.compile(r"models\.\d+\.path|task")


def settings_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old there, new now`` for every differing setting (nested keys dotted)."""
    a, b = ({k: v for k, v in _flat(d).items() if not INFORMATIONAL.fullmatch(k)}
            for d in (old, new))
    keys = sorted(set(a) | set(b), key=lambda key: (key not in b, key))
    return [f"{key}: {a.get(key)!r} there, {b.get(key)!r} now" for key in keys
            if a.get(key) != b.get(key)]


# ---------------------------------------------------------------- the results folder
def _check_settings(out: Path, settings: dict[str, Any]) -> bool:
    """True when ``out`` holds results of these settings, False when it has none yet.

    Read-only: a refused re-run leaves the folder exactly as it was.
    """
    sfile = out / SETTINGS
    if sfile.exists():
        try:
            old = json.loads(sfile.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PipelineError(f"not valid JSON ({e})", sfile) from None
        diff = settings_diff(old, settings)
        if diff:
            raise PipelineError(f"these results were made with other settings ({'; '.join(diff)}); "
                                "choose another --out, or delete the folder to start over",
                                sfile)
        return True
    if (out / SAMPLES).exists():
        raise PipelineError(f"{SAMPLES} without {SETTINGS}: not a folder this command wrote; "
                            "choose another --out", out)
    return False


def _open_samples(out: Path, task: EvalTask, k: int) -> tuple[dict[Row, bool], Any]:
    """The samples already graded in ``out`` and an Appender for the rest.

    Opening cuts a torn last line (a crash mid-write); every complete line
    must be a sample of this task, or the file and line are named.
    """
    from pipeline.outputs.records import Appender, iter_jsonl

    samples = out / SAMPLES
    try:
        app = Appender(samples)
    except ValueError:  # a damaged complete line: let the line reader name it
        list(iter_jsonl(samples, SAMPLE_FIELDS))
        raise
    done: dict[Row, bool] = {}
    try:
        for no, rec in iter_jsonl(samples, SAMPLE_FIELDS):
            i, s = rec["prompt_index"], rec["sample"]
            where = f"{samples}:{no}"
            if not (0 <= i < len(task.problems)) or task.problems[i].id != rec["problem"]:
                raise PipelineError(f"{where}: problem {rec['problem']!r} at index {i} is not "
                                    "in this task")
            if not 0 <= s < k:
                raise PipelineError(f"{where}: sample {s} is outside 0..{k - 1}")
            if (i, s) in done:
                raise PipelineError(f"{where}: problem {rec['problem']!r} sample {s} repeated")
            done[(i, s)] = rec["correct"]
    except BaseException:
        app.close()
        raise
    return done, app


@dataclass(frozen=True)
class EvalResult:
    summary: Summary
    settings: dict[str, Any]
    out: Path | None
    generated: int  # samples generated by this call
    reused: int  # samples found in ``out`` from an earlier run

    def as_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, **self.summary.as_dict()}


def run_eval(task: EvalTask, k: int, settings: dict[str, Any],
             make_generate: Callable[[], Generate], out: Path | None = None,
             n_boot: int = 1000, boot_seed: int = 0, progress: bool = False) -> EvalResult:
    """Grade k samples per problem, generating only the (problem, sample) pairs not in ``out``.

    ``make_generate`` is called only when something is missing, so a finished
    evaluation re-scores without loading any model. Grading runs here, in the
    main thread (math-verify's timeouts are signals).
    """
    from pipeline.console import progress_bar
    from pipeline.outputs.records import Appender
    from pipeline.store.zmeta import write_atomic

    check_int(k, "-k", 1)
    rows = [(i, s) for i in range(len(task.problems)) for s in range(k)]
    done: dict[Row, bool] = {}
    app: Appender | None = None
    resuming = out is not None and _check_settings(out, settings)
    try:
        if resuming:
            done, app = _open_samples(out, task, k)
        reused = len(done)
        missing = [r for r in rows if r not in done]
        if missing:
            generate = make_generate()  # loads and checks the models: may still refuse
            if out is not None and not resuming:
                out.mkdir(parents=True, exist_ok=True)
                write_atomic(out / SETTINGS, (json.dumps(settings, indent=1) + "\n").encode())
                app = Appender(out / SAMPLES)
            wanted = set(missing)
            with progress_bar(len(missing), "evaluate", unit="sample", enabled=progress) as bar:
                for c in generate(missing):
                    row = (c.prompt_index, c.sample)
                    if row not in wanted:
                        raise RuntimeError(f"generation returned {row}, not asked for")
                    wanted.discard(row)
                    p = task.problems[c.prompt_index]
                    ok = bool(task.grade(c.text, p))
                    done[row] = ok
                    if app is not None:
                        app.append({"problem": p.id, "prompt_index": c.prompt_index,
                                    "sample": c.sample, "text": c.text,
                                    "token_ids": list(c.token_ids), "finish": c.finish,
                                    "correct": ok})
                    bar.update(1)
            if wanted:
                raise RuntimeError(f"generation stopped with {len(wanted)} samples missing")
    finally:
        if app is not None:
            app.close()
    correct = [sum(done[(i, s)] for s in range(k)) for i in range(len(task.problems))]
    summary = summarize([p.id for p in task.problems], correct, k, n_boot, boot_seed)
    result = EvalResult(summary, settings, out, len(missing), reused)
    if out is not None:
        write_atomic(out / METRICS, (json.dumps(result.as_dict(), indent=1) + "\n").encode())
    return result


# ---------------------------------------------------------------- models + decode
def decode_rows(models: Sequence[Any], prompts: Sequence[str], k: int, sampling: Any,
                alpha: float, batch_size: int) -> Generate:
    """``decode`` restricted to chosen (prompt, sample) rows, with the same draws.

    Checks everything (sampling, alpha, vocabularies, prompt lengths) now, before
    any file is written; the returned function decodes the rows it is given.
    """
    from pipeline.outputs.generate import decode

    decode(models, prompts, k, sampling, alpha, batch_size, rows=[])  # the checks, nothing run

    def run(rows: Sequence[Row]) -> Iterator[Any]:
        return decode(models, prompts, k, sampling, alpha, batch_size, rows=rows)

    return run


def evaluate(models: Sequence[ModelRef], task: EvalTask, k: int, sampling: Any,
             alpha: float = 1.0, target: float | None = None, out: Path | None = None,
             device: str = "cpu", dtype: str = "auto", batch_size: int = 32,
             n_boot: int = 1000, boot_seed: int = 0, progress: bool = True) -> EvalResult:
    """Evaluate one model (its own decoding) or an (early, late) pair mixed at ``alpha``."""
    from pipeline.outputs.generate import check_device
    from pipeline.outputs.models import load_model
    from pipeline.outputs.sampling import check_sampling

    check_int(k, "-k", 1)
    check_int(batch_size, "--batch-size", 1)
    check_sampling(sampling)
    check_device(device)
    if len(models) not in (1, 2):
        raise PipelineError(f"evaluate takes one model or two (early, late), got {len(models)}")
    settings = eval_settings(models, alpha, target, task, k, sampling, dtype)
    prompts = [p.prompt for p in task.problems]

    def make_generate() -> Generate:
        loaded = [load_model(m.path, device, dtype) for m in models]
        return decode_rows(loaded, prompts, k, sampling, alpha, batch_size)

    return run_eval(task, k, settings, make_generate, out, n_boot, boot_seed, progress)


def describe(settings: dict[str, Any]) -> str:
    """What was evaluated, in a few words: ``step 40`` / ``steps 20 -> 30, alpha 2 (step 40)``."""
    ms = settings["models"]

    def name(m: dict[str, Any]) -> str:
        return f"step {m['step']}" if m["step"] is not None else Path(m["path"]).name

    if len(ms) == 1:
        return name(ms[0])
    t = settings["target_step"]
    to = "" if t is None else f" (step {t:g})"
    return f"logits {name(ms[0])} -> {name(ms[1])}, alpha {settings['alpha']:g}{to}"


def print_result(res: EvalResult) -> None:
    """The overall metrics with their intervals, and where the files are."""
    from pipeline.console import console, print_table

    s, st = res.summary, res.settings
    samp = st["sampling"]
    how = "greedy" if samp["temperature"] == 0 else (
        f"T={samp['temperature']:g}, top-p={samp['top_p']:g}"
        + (f", top-k={samp['top_k']}" if samp["top_k"] else "") + f", seed {samp['seed']}")
    console.print(f"[bold]{describe(st)}[/] on {st['task']}: {len(s.ids)} problems x k={s.k} "
                  f"({how})")
    print_table(f"{int(s.level * 100)}% bootstrap CIs over problems",
                ["metric", "value", "ci low", "ci high"],
                [(name, e.value, e.low, e.high) for name, e in s.overall.items()])
    if res.out is not None:
        console.print(f"{res.generated} samples generated, {res.reused} reused; "
                      f"results in {res.out}")
