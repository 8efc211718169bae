"""Tiny causal LMs built from a config: no downloads, real architectures.

The same builder makes the ~300k-parameter model the tests train and the
50-500M-parameter models the benchmarks need; only the sizes change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from pipeline.rl.char_tokenizer import PreTrainedTokenizerFast

Arch = Literal["qwen2", "llama"]


@dataclass(frozen=True)
class ModelSize:
    hidden_size: int = 128
    num_hidden_layers: int = 2
    intermediate_size: int = 256
    num_attention_heads: int = 4
    num_key_value_heads: int = 2


def build_model(
    arch: Arch, size: ModelSize, tokenizer: PreTrainedTokenizerFast, tie: bool, seed: int
) -> PreTrainedModel:
    """A freshly initialised model whose special-token ids match ``tokenizer``."""
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        num_hidden_layers=size.num_hidden_layers,
        intermediate_size=size.intermediate_size,
        num_attention_heads=size.num_attention_heads,
        num_key_value_heads=size.num_key_value_heads,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    if arch == "qwen2":
        model: PreTrainedModel = Qwen2ForCausalLM(Qwen2Config(**common))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        raise ValueError(f"unknown architecture {arch!r} (expected qwen2 or llama)")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model
