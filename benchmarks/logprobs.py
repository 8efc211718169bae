"""Benchmark: teacher-forced tokens/s per checkpoint, ours vs the authors' way, same probes.

    .venv/bin/python benchmarks/logprobs.py [--probes 200] [--vocab 32000] [--threads 1]
                                            [--device cpu|cuda] [--dtype float32|bfloat16]

Builds a Qwen2 model from a config (random weights, no download: hidden 512,
4 layers, a 32k vocabulary; the ids are random, so no tokenizer is needed)
and a few hundred probes of mixed length (prompts 8-64 tokens, responses
8-192), then scores every response token through that one model:

* the authors' way: one sequence at a time, the model's own forward, a full
  ``log_softmax`` over [positions x vocabulary] in float32, then a gather;
* ours (``pipeline.outputs.teacher_forcing.teacher_force``): length-bucketed
  batches, hidden states of the response positions only, the LM head in
  vocabulary chunks with a running logsumexp.

Both run in this process with the same thread count, interleaved over
``--repeats`` rounds; the best round of each is reported (least disturbed by
other jobs on a shared machine), with the largest float32 logits matrix each
one materialises and the largest difference between their log-probs.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from pipeline.outputs.teacher_forcing import plan_batches, teacher_force
from pipeline.rl.tiny_model import ModelSize


def build(vocab: int, size: ModelSize, max_positions: int) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=size.hidden_size,
                      num_hidden_layers=size.num_hidden_layers,
                      intermediate_size=size.intermediate_size,
                      num_attention_heads=size.num_attention_heads,
                      num_key_value_heads=size.num_key_value_heads,
                      max_position_embeddings=max_positions, tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg).eval()


def make_pairs(n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, vocab, rng.integers(8, 65)).tolist(),
             rng.integers(0, vocab, rng.integers(8, 193)).tolist()) for _ in range(n)]


@torch.inference_mode()
def authors_way(model: Qwen2ForCausalLM, pairs: list) -> np.ndarray:
    """One sequence at a time, full float32 log_softmax (the authors' analysis code)."""
    out = []
    for prompt, response in pairs:
        ids = torch.tensor([[*prompt, *response]], device=model.device)
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        pos = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1, device=ids.device)
        out.append(logp[pos, torch.tensor(response, device=ids.device)].cpu().numpy())
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--probes", type=int, default=200)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--vocab-chunk", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    size = ModelSize(hidden_size=args.hidden, num_hidden_layers=args.layers,
                     intermediate_size=args.hidden * 11 // 4, num_attention_heads=8,
                     num_key_value_heads=4)
    model = build(args.vocab, size, max_positions=512).to(args.device,
                                                           getattr(torch, args.dtype))
    pairs = make_pairs(args.probes, args.vocab)
    n_tok = sum(len(r) for _, r in pairs)
    lengths = [len(p) + len(r) - 1 for p, r in pairs]
    batches = plan_batches(lengths, args.batch_tokens)
    padded = sum(len(b.members) * b.length for b in batches)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.1f}M parameters, vocab {args.vocab}, hidden {args.hidden}, "
          f"{args.layers} layers; {len(pairs)} probes, {n_tok} response tokens, "
          f"{sum(len(p) for p, _ in pairs)} prompt tokens; {args.dtype} on {args.device}, "
          f"{args.threads} CPU thread(s)")
    print(f"ours: {len(batches)} batches of <= {args.batch_tokens} padded tokens "
          f"({padded / sum(lengths) - 1:.1%} padding), vocabulary chunks of {args.vocab_chunk}")
    authors_way(model, pairs[:2])  # warm up both paths
    teacher_force(model, pairs[:2], batch_tokens=args.batch_tokens,
                  vocab_chunk=args.vocab_chunk)
    t_auth, t_ours = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ref = authors_way(model, pairs)
        t_auth.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        lp, _ = teacher_force(model, pairs, batch_tokens=args.batch_tokens,
                              vocab_chunk=args.vocab_chunk)
        t_ours.append(time.perf_counter() - t0)
    a, o = min(t_auth), min(t_ours)
    big_auth = max(lengths) + 1
    big_ours = max(sum(len(pairs[i][1]) for i in b.members) for b in batches)
    print(f"authors' way: {n_tok / a:10,.0f} tokens/s  ({a:.2f} s per checkpoint; largest "
          f"logits matrix {big_auth} x {args.vocab} = {big_auth * args.vocab * 4 / 1e6:.0f} MB)")
    print(f"ours:         {n_tok / o:10,.0f} tokens/s  ({o:.2f} s per checkpoint; largest "
          f"logits block {big_ours} x {min(args.vocab_chunk, args.vocab)} = "
          f"{big_ours * min(args.vocab_chunk, args.vocab) * 4 / 1e6:.0f} MB)")
    print(f"speed-up: {a / o:.2f}x; max |log-prob difference| {np.abs(lp - ref).max():.2e}")


if __name__ == "__main__":
    main()
