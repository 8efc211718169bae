"""Logits in, next token out: temperature, top-k, top-p and greedy, with reproducible draws.

Pure tensor code (no models, no I/O) so the decode loop, the probe sampler
and the tests share one definition of "sample from these logits".

Randomness is *counter-based*: the uniform number behind a draw is a hash of
(seed, prompt index, sample index, decoding step) and nothing else, turned
into a token by inverting the cumulative distribution. So a completion does
not depend on which other prompts shared its batch, on the batch size, or on
how many draws other rows made before it; and two runs that see the same
logits pick the same token. That is what makes "alpha = 1 reproduces the
late model's own decoding, sampled too" a bitwise property rather than luck
with a shared ``torch.Generator`` stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import PipelineError, check_int, check_number


@dataclass(frozen=True)
class Sampling:
    """How to turn logits into tokens (the same knobs as ``transformers``' generate)."""

    temperature: float = 1.0  # 0.0 means greedy (argmax), a real mode
    top_p: float = 1.0  # in (0, 1]
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 32
    seed: int = 0
    stop: tuple[str, ...] = ()  # stop strings (besides EOS)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def check_sampling(s: Sampling) -> Sampling:
    """``s`` if every field is usable, else a one-line ``PipelineError`` naming the option."""
    check_number(s.temperature, "--temperature", 0.0)
    check_number(s.top_p, "--top-p", 0.0, 1.0, low_open=True)
    check_int(s.top_k, "--top-k", 0)
    check_int(s.max_new_tokens, "--max-new-tokens", 1)
    check_int(s.seed, "--seed")
    if not isinstance(s.stop, tuple) or not all(isinstance(x, str) and x for x in s.stop):
        raise PipelineError(f"--stop must be non-empty strings, got {s.stop!r}")
    return s


def warp(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """Temperature, then top-k, then top-p (``transformers``' order); removed tokens get -inf.

    Top-p keeps the smallest set of most likely tokens whose probability
    reaches ``top_p`` (at least one token), as ``TopPLogitsWarper`` does.
    """
    z = logits.float()
    if s.temperature not in (0.0, 1.0):
        z = z / s.temperature
    if 0 < s.top_k < z.shape[-1]:
        kth = torch.topk(z, s.top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=False)
        cum = sorted_z.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= 1.0 - s.top_p
        drop[..., -1] = False  # the most likely token always stays
        z = z.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return z


_M64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 arrays (wrapping arithmetic, logical shifts)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, prompt_index: np.ndarray, sample: np.ndarray, step: int) -> np.ndarray:
    """One uniform in [0, 1) per row, a pure function of (seed, prompt, sample, step).

    Each key is mixed in turn through splitmix64 (a bijection on 64 bits), so
    distinct keys give independent-looking streams; 53 bits make a float64.
    """
    with np.errstate(over="ignore"):
        h = _splitmix64(np.full(prompt_index.shape, seed & _M64, dtype=np.uint64))
        for key in (prompt_index.astype(np.uint64), sample.astype(np.uint64),
                    np.full(prompt_index.shape, step & _M64, dtype=np.uint64)):
            h = _splitmix64(h ^ key)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def choose(logits: torch.Tensor, s: Sampling, u: torch.Tensor | None = None) -> torch.Tensor:
    """Next token per row of ``logits`` (rows x vocab): argmax if greedy, else a draw at ``u``.

    The draw inverts the cumulative distribution in vocabulary order (float64):
    the first token whose cumulative probability exceeds ``u`` times the total.
    A token removed by top-k/top-p has probability 0 and can never be that
    first token, and ``u`` is kept strictly below the total, so the result is
    always a token the warpers allowed.
    """
    if s.greedy:
        return torch.argmax(logits, dim=-1)
    if u is None:
        raise ValueError("sampling needs one uniform per row")
    probs = warp(logits, s).double().softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    total = cdf[..., -1:]
    x = torch.minimum(u.to(cdf.device, torch.float64).reshape(total.shape) * total,
                      torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, x, right=True).squeeze(-1).clamp_max(logits.shape[-1] - 1)
