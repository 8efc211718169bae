"""A real, small RLVR run: warm start, then GRPO, with HF checkpoints every k steps.

Every later stage (ingest, fit, extrapolation) is tested on what this
produces, so it must be a genuine RL trajectory (TRL's GRPOTrainer on a
verifiable reward), deterministic for a seed, and quick on two CPU cores.
Checkpoints are saved in the layout real trainers use (``global_step_N/``
with config, safetensors and tokenizer files), in float32 or bfloat16, single
file or sharded, so the same generator exercises every layout ingest reads.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.rl.char_tokenizer import build_char_tokenizer
from pipeline.rl.evaluate import greedy_accuracy
from pipeline.rl.tasks import Problem, exact_match_reward, task_problems
from pipeline.rl.tiny_model import Arch, ModelSize, build_model

if TYPE_CHECKING:
    from pipeline.rl.extra import RLExtra, RLExtraCallback

SaveDtype = Literal["float32", "bfloat16"]
# Bump when the generator's output changes for the same config (invalidates caches).
GENERATOR_VERSION = 3
METRICS_FILE = "metrics.json"
RUN_CONFIG_FILE = "run_config.json"
RL_EXTRA_FILE = "rl_extra.json"  # an RL-Extra run's settings and jumps, beside metrics.json


@dataclass(frozen=True)
class TinyRunConfig:
    """Everything that determines a run; saved beside it as run_config.json.

    The defaults are the embedded run, chosen by ``workflows/regime_sweep.py``
    (docs/regime_sweep.md): a short warm start leaves the policy much to learn,
    64 prompts x 8 answers per step keep the gradient noise low, and a small
    constant learning rate over 200 steps keeps the drift direction steady,
    so the weights move on a line (median R² ~0.8 against a null of ~0.42).
    Checkpoints are float32 (the master weights): bf16 rounds a 20-step move
    of a few ULPs, which costs the backtest its margin over "no change".
    """

    seed: int = 0
    arch: Arch = "qwen2"
    dtype: SaveDtype = "float32"
    tie: bool = False
    max_shard_size: str | None = None  # e.g. "200KB": sharded safetensors + index
    size: ModelSize = field(default_factory=ModelSize)
    sft_steps: int = 150
    sft_lr: float = 1e-3
    sft_batch: int = 128
    rl_steps: int = 200
    save_every: int = 20
    lr: float = 3e-5
    prompts_per_step: int = 64
    generations: int = 8
    n_heldout: int = 256
    task: str = "add2"  # a name in pipeline.rl.tasks.TASKS
    adam_beta1: float = 0.9


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _warm_start(model, tokenizer, train: list[Problem], cfg: TinyRunConfig,
                progress: bool = False) -> None:
    """Supervised steps on ``prompt+answer</s>`` so RL starts with a non-zero reward."""
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
    model.train()
    eos = tokenizer.eos_token
    from pipeline.console import progress_bar

    for _ in progress_bar(desc="warm start", enabled=progress, iterable=range(cfg.sft_steps)):
        idx = torch.randint(len(train), (cfg.sft_batch,), generator=gen).tolist()
        texts = [train[i].prompt + train[i].answer + eos for i in idx]
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        labels = enc.input_ids.clone()
        labels[enc.attention_mask == 0] = -100
        # only the answer is supervised: mask the prompt tokens
        for row, i in enumerate(idx):
            n_prompt = len(train[i].prompt)
            pad = int((enc.attention_mask[row] == 0).sum())
            labels[row, : pad + n_prompt] = -100
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def save_checkpoint(
    model, tokenizer, out_dir: Path, dtype: SaveDtype, max_shard_size: str | None,
    extra_files: Mapping[str, str] | None = None,
) -> None:
    """Write a HF checkpoint atomically: a hidden temporary folder renamed at the end.

    Real trainers do not always do this; ours does so that a run being watched
    never exposes a half-written checkpoint except when a test makes one on
    purpose. ``extra_files`` (name -> text, e.g. RL-Extra's nominal step) are
    written inside before the rename, so they appear with the weights.
    """
    tmp = out_dir.parent / f".{out_dir.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    torch_dtype = getattr(torch, dtype)
    copy_ = copy.deepcopy(model).to(torch_dtype)
    copy_.config.dtype = torch_dtype
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    copy_.save_pretrained(tmp, **kwargs)
    tokenizer.save_pretrained(tmp)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    os.replace(tmp, out_dir)


def make_tiny_run(
    out: str | Path,
    cfg: TinyRunConfig | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
    *,
    rl_extra: RLExtra | RLExtraCallback | None = None,
    callbacks: Sequence[Any] = (),
    grpo_args: Mapping[str, Any] | None = None,
    init_model: str | Path | None = None,
    siblings: Sequence[tuple[str | Path, TinyRunConfig]] = (),
) -> Path:
    """Train the run into ``out`` (``global_step_N/`` folders + metrics.json).

    The keywords leave a run bit-identical when not given (the test cache is
    keyed by ``cfg`` alone). ``rl_extra``: jump the weights every m steps
    (Eq. 3, ``pipeline.rl.extra``); checkpoints then carry their nominal step
    and ``rl_extra.json`` records the jumps. ``callbacks``: more trainer
    callbacks, run after the checkpointing one. ``grpo_args``: GRPOConfig
    fields to override (e.g. ``steps_per_generation``). ``init_model``: start
    GRPO from this HF model folder instead of a fresh model and its warm start
    (``cfg.arch``/``size``/``tie``/``sft_*`` are then unused): one cycle of an
    external RL-Extra loop, or a test that needs a policy with reward at once.
    ``siblings``: (folder, config) of more runs of this same training, each
    saved and scored as it would be on its own (its dtype, its shards, its
    first ``rl_steps`` steps), so one training gives the runs that differ
    only in how they are saved (``check_sibling``).
    """
    for folder, sib in siblings:
        check_sibling(cfg or TinyRunConfig(), sib, folder)
    if siblings and rl_extra is not None:
        raise PipelineError("sibling runs are not saved with RL-Extra", out)
    fresh = not Path(out).exists() or not any(Path(out).iterdir())
    with warnings.catch_warnings():  # the caller's filters are restored afterwards
        # TRL calls transformers APIs that warn about their own renames: not the user's concern
        warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
        try:
            return _train(out, cfg, log, progress, rl_extra, callbacks, grpo_args, init_model,
                          siblings)
        except PipelineError:
            if rl_extra is not None and fresh:  # a refused RL-Extra setting: leave nothing
                shutil.rmtree(out, ignore_errors=True)
            raise


def _train(out: str | Path, cfg: TinyRunConfig | None, log: Callable[[str], None],
           progress: bool, rl_extra: RLExtra | RLExtraCallback | None = None,
           callbacks: Sequence[Any] = (), grpo_args: Mapping[str, Any] | None = None,
           init_model: str | Path | None = None,
           siblings: Sequence[tuple[str | Path, TinyRunConfig]] = ()) -> Path:
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    cfg = cfg or TinyRunConfig()
    out = Path(out)
    outputs = [(out, cfg), *((Path(f), c) for f, c in siblings)]
    for folder, _ in outputs:
        if folder.exists() and any(folder.iterdir()):
            raise PipelineError("output folder exists and is not empty", folder)
    for folder, _ in outputs:
        folder.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    torch.use_deterministic_algorithms(True, warn_only=True)
    _seed_everything(cfg.seed)
    tokenizer = build_char_tokenizer()
    train, heldout = task_problems(cfg.task, cfg.seed, cfg.n_heldout)
    answer_tokens = max(len(p.answer) for p in train + heldout) + 1  # + end of sequence
    if init_model is None:
        model = build_model(cfg.arch, cfg.size, tokenizer, cfg.tie, cfg.seed)
        _warm_start(model, tokenizer, train, cfg, progress)
    else:
        model = _load_init(Path(init_model), tokenizer)

    metrics: dict = {"config": _config_dict(cfg), "reward": [], "heldout_accuracy": {}}
    if init_model is not None:
        metrics["init_model"] = str(init_model)
    sib_acc: list[dict[str, float]] = [{} for _ in siblings]
    extra_cb = None
    if rl_extra is not None:
        from pipeline.rl.extra import STEP_META_FILE, RLExtraCallback, step_meta_json

        extra_cb = rl_extra if isinstance(rl_extra, RLExtraCallback) else RLExtraCallback(rl_extra)
        metrics["nominal_step"] = {}

    def save_and_score(step: int, m, root: Path, c: TinyRunConfig,
                       extra_files: Mapping[str, str] | None = None) -> float:
        folder = root / f"global_step_{step}"
        save_checkpoint(m, tokenizer, folder, c.dtype, c.max_shard_size, extra_files)
        # score the files as a user will load them, not the in-memory copy
        return greedy_accuracy(AutoModelForCausalLM.from_pretrained(folder), tokenizer, heldout)

    def checkpoint(step: int, m) -> None:
        if _saves_at(cfg, step):
            extra_files = None
            if extra_cb is not None:
                meta = extra_cb.step_metadata(step)
                metrics["nominal_step"][str(step)] = meta["nominal_step"]
                extra_files = {STEP_META_FILE: step_meta_json(meta)}
            acc = save_and_score(step, m, out, cfg, extra_files)
            metrics["heldout_accuracy"][str(step)] = acc
            log(f"step {step:>5}: held-out greedy accuracy {acc:.3f}")
        for (root, c), accs in zip(siblings, sib_acc, strict=True):
            if _saves_at(c, step):
                accs[str(step)] = save_and_score(step, m, Path(root), c)

    checkpoint(0, model)

    class SaveEvery(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            bar.update(1)
            checkpoint(state.global_step, model)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                metrics["reward"].append({"step": state.global_step, "reward": logs["reward"]})

    rl_prompts = Dataset.from_list([{"prompt": p.prompt, "answer": p.answer} for p in train])
    base_args = dict(
        output_dir=str(out / ".trainer"),
        per_device_train_batch_size=cfg.prompts_per_step * cfg.generations,
        num_generations=cfg.generations,
        max_completion_length=answer_tokens,
        learning_rate=cfg.lr,
        adam_beta1=cfg.adam_beta1,
        # fp32 on the CPU: bf16 autocast is ~4x slower there and adds rounding noise
        # to every update; checkpoints are still saved in cfg.dtype
        bf16=False,
        gradient_checkpointing=False,
        lr_scheduler_type="constant",
        beta=0.0,
        max_steps=cfg.rl_steps,
        save_strategy="no",
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=cfg.seed,
        data_seed=cfg.seed,
        disable_tqdm=True,
        temperature=1.0,
    )
    args = GRPOConfig(**{**base_args, **(grpo_args or {})})
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=exact_match_reward,
        args=args,
        train_dataset=rl_prompts,
        processing_class=tokenizer,
        # RL-Extra first: a checkpoint saved at a jump step holds the jumped model
        callbacks=[*([extra_cb] if extra_cb is not None else []), SaveEvery(), *callbacks],
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    from pipeline.console import progress_bar

    bar = progress_bar(cfg.rl_steps, "GRPO", unit="step", enabled=progress)
    with bar, _lm_head_tile(model.config.vocab_size):
        trainer.train()
    shutil.rmtree(out / ".trainer", ignore_errors=True)
    metrics["seconds"] = round(time.perf_counter() - t_start, 1)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=1))
    (out / RUN_CONFIG_FILE).write_text(json.dumps(_config_dict(cfg), indent=1))
    for (root, c), accs in zip(siblings, sib_acc, strict=True):
        sib = {**metrics, "config": _config_dict(c), "heldout_accuracy": accs,
               "reward": [r for r in metrics["reward"] if r["step"] <= c.rl_steps],
               "sibling_of": str(out)}
        (Path(root) / METRICS_FILE).write_text(json.dumps(sib, indent=1))
        (Path(root) / RUN_CONFIG_FILE).write_text(json.dumps(_config_dict(c), indent=1))
    if extra_cb is not None:
        (out / RL_EXTRA_FILE).write_text(json.dumps(extra_cb.summary(), indent=1))
    return out


def _saves_at(cfg: TinyRunConfig, step: int) -> bool:
    """Whether a run of ``cfg`` saves a checkpoint after ``step`` optimizer steps (0: the start)."""
    return step <= cfg.rl_steps and (step % cfg.save_every == 0 or step == cfg.rl_steps)


def check_sibling(cfg: TinyRunConfig, sib: TinyRunConfig, folder: str | Path) -> None:
    """Refuse a sibling run that one training of ``cfg`` cannot give bit-identically.

    Only how it is saved may differ (dtype, shards, save interval) and it may stop
    earlier: the steps it shares with ``cfg`` are the same steps.
    """
    same = replace(sib, dtype=cfg.dtype, max_shard_size=cfg.max_shard_size,
                   rl_steps=cfg.rl_steps, save_every=cfg.save_every)
    if same != cfg or sib.rl_steps > cfg.rl_steps:
        raise PipelineError("a sibling run may differ only in dtype, max_shard_size, "
                            "save_every and a smaller rl_steps", folder)


@contextmanager
def _lm_head_tile(vocab_size: int) -> Iterator[None]:
    """TRL's chunked log-prob kernel tiled at the vocabulary's width while GRPO trains.

    TRL 1.16 allocates a [4096, 32768] float32 tile (512 MB) in every forward
    and backward of the loss whatever the vocabulary; with our 20-token
    vocabulary only 20 columns are used, and on the CPU getting that memory
    was half of each RL step's time (cProfile: 0.53 s of 0.95 s). With a tile
    as wide as the vocabulary the kernel computes the same single tile, so
    the run is bit-identical (checked on a 20-step run) and its RL steps take
    half the time. A TRL without the constant is left as it is.
    """
    try:
        import trl.trainer.utils as trl_utils
    except ImportError:
        yield
        return
    old = getattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", None)
    if not isinstance(old, int) or old <= vocab_size:
        yield
        return
    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = vocab_size
    try:
        yield
    finally:
        trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = old


def make_warm_start(out: str | Path, cfg: TinyRunConfig | None = None,
                    progress: bool = False) -> Path:
    """Only the supervised warm start of ``cfg``, saved (float32) as an HF model folder.

    The same seeding and order as :func:`make_tiny_run`, so the weights equal
    that run's step 0. Experiments that compare GRPO arms train it once and
    give every arm ``init_model=out``: all start from the same model.
    """
    cfg = cfg or TinyRunConfig()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise PipelineError("output folder exists and is not empty", out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.use_deterministic_algorithms(True, warn_only=True)
    _seed_everything(cfg.seed)
    tokenizer = build_char_tokenizer()
    train, _ = task_problems(cfg.task, cfg.seed, cfg.n_heldout)
    model = build_model(cfg.arch, cfg.size, tokenizer, cfg.tie, cfg.seed)
    _warm_start(model, tokenizer, train, cfg, progress)
    save_checkpoint(model, tokenizer, out, "float32", None)
    return out


def _load_init(folder: Path, tokenizer) -> Any:
    """An init model for GRPO, in float32 (the master weights), checked against the tokenizer."""
    from transformers import AutoModelForCausalLM

    if not (folder / "config.json").is_file():
        raise PipelineError("init model folder has no config.json", folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise PipelineError(f"cannot load the init model: {e}", folder) from None
    if model.config.vocab_size != len(tokenizer):
        raise PipelineError(f"init model has vocab_size {model.config.vocab_size}, the "
                            f"character tokenizer {len(tokenizer)}", folder)
    return model


def _config_dict(cfg: TinyRunConfig) -> dict:
    return asdict(cfg)
