"""Held-out accuracy of a causal LM on a verifiable task (greedy decoding)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipeline.rl.tasks import Problem


@torch.no_grad()
def greedy_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: list[Problem],
    max_new_tokens: int | None = None,
    batch_size: int = 256,
) -> float:
    """Fraction of problems whose greedy completion is exactly the answer.

    By default the model may write one token more than the longest answer
    (one character each, then end of sequence): enough to be right, never
    enough to be right by luck after a wrong start.
    """
    if max_new_tokens is None:
        max_new_tokens = max((len(p.answer) for p in problems), default=0) + 1
    model.eval()
    correct = 0
    for i in range(0, len(problems), batch_size):
        batch = problems[i : i + batch_size]
        enc = tokenizer([p.prompt for p in batch], return_tensors="pt", padding=True)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
        correct += sum(t.strip() == p.answer for t, p in zip(texts, batch, strict=True))
    return correct / max(len(problems), 1)
