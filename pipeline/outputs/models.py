"""Loading causal LMs for the output-space commands, and refusing pairs that cannot mix.

Logits extrapolation and log-prob trajectories compare the same token id
across checkpoints, so two models must share their vocabulary exactly: same
size, same token for every id. A checkpoint folder is loaded the way users
load it (``transformers``' ``from_pretrained``), on the requested device and
dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class LoadedModel:
    path: Path
    model: Any  # transformers.PreTrainedModel
    tokenizer: Any  # transformers.PreTrainedTokenizerBase

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def max_positions(self) -> int | None:
        n = getattr(self.model.config, "max_position_embeddings", None)
        return int(n) if n is not None else None


def torch_dtype(name: str) -> Any:
    import torch

    if name not in DTYPES:
        raise PipelineError(f"unknown dtype {name!r} (expected one of {', '.join(DTYPES)})")
    return "auto" if name == "auto" else getattr(torch, name)


def load_model(path: str | Path, device: str = "cpu", dtype: str = "auto") -> LoadedModel:
    """Model and tokenizer from a checkpoint folder, in eval mode on ``device``."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise PipelineError("not a model folder (no config.json)", path)
    transformers.utils.logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise PipelineError(f"cannot load the model: {' '.join(str(e).split())[:300]}",
                            path) from None
    return LoadedModel(path, model.to(device).eval(), tok)


def check_same_vocab(a: LoadedModel, b: LoadedModel) -> None:
    """Refuse two models whose logits do not line up token for token."""
    if a.vocab_size != b.vocab_size:
        raise PipelineError(f"vocabularies differ: {a.vocab_size} logits here, {b.vocab_size} "
                            f"in {b.path}; logits of the two models would not line up", a.path)
    va, vb = a.tokenizer.get_vocab(), b.tokenizer.get_vocab()
    if va != vb:
        diff = sorted(set(va.items()) ^ set(vb.items()), key=lambda kv: kv[1])[:3]
        raise PipelineError(f"tokenizers differ from {b.path} (e.g. {diff}); "
                            "logits of the two models would not line up", a.path)
    for attr in ("eos_token_id", "pad_token_id"):
        if getattr(a.tokenizer, attr) != getattr(b.tokenizer, attr):
            raise PipelineError(f"{attr} differs from {b.path}", a.path)
