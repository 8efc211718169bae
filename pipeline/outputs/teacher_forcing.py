"""Teacher forcing in pure torch: the log-prob and logit of every response token, batched.

The authors run one sequence at a time through the whole model and take a
full ``log_softmax`` over [positions x vocabulary]: for a 150k vocabulary
that matrix is most of the memory and most of the time, and every prompt
position pays for it although only response tokens are wanted. Here:

- sequences are sorted by length and packed up to a token budget (padded
  tokens count), right-padded with an attention mask, so a batch wastes
  little on padding and a long sequence never shares a batch with many;
- the base model gives the final hidden states; only the rows that predict
  a response token are kept (response token j is predicted at position
  ``len(prompt) + j - 1``, read from the saved ids, never re-tokenised);
- the LM head runs over vocabulary chunks in float32 with a running
  logsumexp, picking out the chosen token's logit on the way, so at most
  [tokens x chunk] float32 values exist at once.

``check_head`` compares the result with the model's own logits once per
model, so an architecture whose logits are not ``lm_head(hidden)``
(soft-capping, logit scaling) is refused instead of measured wrongly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.errors import PipelineError

DEFAULT_BATCH_TOKENS = 8192
DEFAULT_VOCAB_CHUNK = 8192
MIN_FILL = 0.75  # a batch's shortest sequence is at least this fraction of its longest
Pair = tuple[Sequence[int], Sequence[int]]  # (prompt_ids, response_ids)


@dataclass(frozen=True)
class Batch:
    """Sequences run together: their indices (longest first) and the padded length."""

    members: tuple[int, ...]
    length: int


def input_length(prompt: Sequence[int], response: Sequence[int]) -> int:
    """Tokens the model reads: the prompt and every response token but the last."""
    return len(prompt) + len(response) - 1


def plan_batches(lengths: Sequence[int], batch_tokens: int,
                 min_fill: float = MIN_FILL) -> list[Batch]:
    """Length-bucketed batches: longest first, packed while rows x longest <= the budget.

    A batch also closes before a sequence shorter than ``min_fill`` of its
    longest, so padding stays under (1 - min_fill) / min_fill of the real
    tokens even for a few probes of very different lengths (on a CPU every
    padded token costs as much as a real one). A sequence longer than the
    budget gets a batch of its own; zero-length entries (probes with an
    empty response) are in no batch.
    """
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: (-lengths[i], i))
    out: list[Batch] = []
    cur: list[int] = []
    for i in order:
        if cur and ((len(cur) + 1) * lengths[cur[0]] > batch_tokens
                    or lengths[i] < min_fill * lengths[cur[0]]):
            out.append(Batch(tuple(cur), lengths[cur[0]]))
            cur = []
        cur.append(i)
    if cur:
        out.append(Batch(tuple(cur), lengths[cur[0]]))
    return out


def head_of(model: Any) -> tuple[Any, torch.Tensor, torch.Tensor | None]:
    """(base model, LM head weight [vocab x hidden], its bias or None)."""
    head = model.get_output_embeddings()
    return model.base_model, head.weight, getattr(head, "bias", None)


@torch.inference_mode()
def chunked_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 targets: torch.Tensor, vocab_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob, logit) of ``targets`` under ``hidden @ weight.T + bias``, in float32.

    Vocabulary chunks of ``vocab_chunk`` rows: a running logsumexp and the
    chosen logit are all that is kept between chunks.
    """
    h = hidden.float()
    n, vocab = h.shape[0], weight.shape[0]
    lse = torch.full((n,), -torch.inf, dtype=torch.float32, device=h.device)
    chosen = torch.zeros(n, dtype=torch.float32, device=h.device)
    rows = torch.arange(n, device=h.device)
    for c0 in range(0, vocab, vocab_chunk):
        c1 = min(vocab, c0 + vocab_chunk)
        z = h @ weight[c0:c1].float().T
        if bias is not None:
            z += bias[c0:c1].float()
        lse = torch.logaddexp(lse, torch.logsumexp(z, dim=1))
        inside = (targets >= c0) & (targets < c1)
        chosen = torch.where(inside, z[rows, (targets - c0).clamp(0, c1 - c0 - 1)], chosen)
    return chosen - lse, chosen


@torch.inference_mode()
def _run_batch(model: Any, pairs: Sequence[Pair], batch: Batch, pad_id: int,
               vocab_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob, logit) of the batch's response tokens, member after member."""
    base, weight, bias = head_of(model)
    device = weight.device
    b, length = len(batch.members), batch.length
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    mask = torch.zeros((b, length), dtype=torch.long)
    rows, targets = [], []
    for r, i in enumerate(batch.members):
        prompt, response = pairs[i]
        seq = [*prompt, *response[:-1]]
        ids[r, :len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[r, :len(seq)] = 1
        start = r * length + len(prompt) - 1  # the row predicting response token 0
        rows.append(torch.arange(start, start + len(response)))
        targets.extend(response)
    hidden = base(input_ids=ids.to(device), attention_mask=mask.to(device),
                  use_cache=False).last_hidden_state  # no KV cache: nothing is decoded
    picked = hidden.reshape(b * length, -1)[torch.cat(rows).to(device)]
    return chunked_head(picked, weight, bias, torch.as_tensor(targets, device=device),
                        vocab_chunk)


def teacher_force(model: Any, pairs: Sequence[Pair], *,
                  batch_tokens: int = DEFAULT_BATCH_TOKENS,
                  vocab_chunk: int = DEFAULT_VOCAB_CHUNK, pad_id: int = 0,
                  min_fill: float = MIN_FILL, on_tokens: Callable[[int], None] | None = None,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """float32 (log-prob, logit) of every response token, pairs in order, tokens in order.

    ``pad_id`` fills the padding (masked, so any valid id does); ``min_fill``
    bounds padding (``plan_batches``); ``on_tokens`` is told how many
    response tokens each batch did (progress bars).
    """
    if batch_tokens < 1 or vocab_chunk < 1:
        raise PipelineError(f"batch tokens and vocabulary chunk must be >= 1, got "
                            f"{batch_tokens} and {vocab_chunk}")
    if any(r and not p for p, r in pairs):  # nothing would predict the first response token
        raise PipelineError("a probe with a response has an empty prompt")
    sizes = np.array([len(r) for _, r in pairs], np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    logprob = np.empty(int(offsets[-1]), np.float32)
    logit = np.empty(int(offsets[-1]), np.float32)
    lengths = [input_length(p, r) if len(r) else 0 for p, r in pairs]
    for batch in plan_batches(lengths, batch_tokens, min_fill):
        lp, z = _run_batch(model, pairs, batch, pad_id, vocab_chunk)
        lp, z = lp.cpu().numpy(), z.cpu().numpy()
        at = 0
        for i in batch.members:
            n = int(sizes[i])
            logprob[offsets[i]:offsets[i + 1]] = lp[at:at + n]
            logit[offsets[i]:offsets[i + 1]] = z[at:at + n]
            at += n
        if on_tokens is not None:
            on_tokens(at)
    return logprob, logit


@torch.inference_mode()
def check_head(model: Any, pair: Pair, vocab_chunk: int = DEFAULT_VOCAB_CHUNK) -> None:
    """Refuse a model whose logits are not ``lm_head(final hidden state)``.

    One sequence through the model's own forward: its logits at the chosen
    tokens must match the chunked head's within the model dtype's rounding.
    """
    prompt, response = pair
    if not response:
        return
    _, weight, _ = head_of(model)
    ids = torch.as_tensor([[*prompt, *response[:-1]]], device=weight.device)
    full = model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1:].float()
    want = full[torch.arange(len(response)), torch.as_tensor(response, device=full.device)]
    _, got = _run_batch(model, [pair], Batch((0,), ids.shape[1]), 0, vocab_chunk)
    scale = max(1.0, float(full.abs().max()))
    tol = (1e-3 if weight.dtype == torch.float32 else 3e-2) * scale
    err = float((got - want).abs().max())
    if not err <= tol:
        raise PipelineError(f"{type(model).__name__}: logits are not lm_head(hidden state) "
                            f"(max difference {err:.3g} > {tol:.3g}; logit soft-capping or "
                            "scaling?), so chunked log-probs would be wrong for this model")
