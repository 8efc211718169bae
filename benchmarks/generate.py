"""Logits-extrapolation decoding time against decoding with one model (same prompts, k, lengths).

Two forward passes per token are the floor, so the goal is a ratio <= 2.2x.
By default two random-init models are built from a config (hidden 384, 4
layers) with ``pipeline.rl.tiny_model`` and saved to a temporary folder;
``--early/--late`` take real checkpoint folders instead. EOS is switched off
in both modes so every row decodes exactly ``--max-new-tokens`` tokens and
the two runs do the same amount of work; transformers' own ``generate`` of
the single model (forced to the same length) is printed for reference.

    python benchmarks/generate.py [--early A --late B] [--prompts 16 -k 4 --max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.outputs.generate import Sampling, decode  # noqa: E402
from pipeline.outputs.models import LoadedModel, load_model  # noqa: E402


def build_pair(folder: Path, hidden: int, layers: int, context: int) -> tuple[Path, Path]:
    import transformers

    from pipeline.rl.char_tokenizer import build_char_tokenizer
    from pipeline.rl.tiny_model import ModelSize, build_model

    transformers.utils.logging.disable_progress_bar()
    tok = build_char_tokenizer()
    size = ModelSize(hidden, layers, 4 * hidden, max(1, hidden // 64), max(1, hidden // 192))
    out = []
    for seed in (0, 1):
        m = build_model("qwen2", size, tok, tie=False, seed=seed)
        m.config.max_position_embeddings = context
        path = folder / f"seed{seed}"
        m.save_pretrained(path)
        tok.save_pretrained(path)
        out.append(path)
    return out[0], out[1]


def no_eos(m: LoadedModel) -> LoadedModel:
    """Every row runs to the length limit: equal work for both modes."""
    m.model.generation_config.eos_token_id = None
    m.tokenizer.eos_token = None
    return m


def clock(device: str) -> float:
    """Process CPU time on the CPU (other jobs on a shared machine do not inflate it),
    wall time after a synchronize on a GPU."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def timed(fns: dict[str, object], repeats: int, device: str) -> dict[str, float]:
    """Best time of each function, the runs interleaved so drifting load hits all alike."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = clock(device)
            fn()
            best[name] = min(best[name], clock(device) - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--early", type=Path)
    ap.add_argument("--late", type=Path)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.early is None or args.late is None:
            a_path, b_path = build_pair(Path(tmp), args.hidden, args.layers,
                                        args.max_new_tokens + 32)
        else:
            a_path, b_path = args.early, args.late
        early = no_eos(load_model(a_path, args.device))
        late = no_eos(load_model(b_path, args.device))
        rng = random.Random(0)
        prompts = [f"{rng.randrange(10, 100)}+{rng.randrange(10, 100)}="
                   for _ in range(args.prompts)]
        s = Sampling(temperature=args.temperature, top_p=0.95,
                     max_new_tokens=args.max_new_tokens, seed=0)
        n_params = sum(p.numel() for p in late.model.parameters())

        def run(models: list[LoadedModel]) -> int:
            return sum(len(c.token_ids) for c in decode(models, prompts, args.k, s, 1.5
                                                        if len(models) == 2 else 1.0,
                                                        args.batch_size))

        tokens = run([late])
        assert tokens == run([early, late]) == args.prompts * args.k * args.max_new_tokens
        tok = late.tokenizer
        enc = tok(prompts, return_tensors="pt", padding=True).to(args.device)

        def hf() -> None:
            with torch.inference_mode():
                late.model.generate(**enc, do_sample=True, temperature=args.temperature,
                                    top_p=0.95, num_return_sequences=args.k,
                                    max_new_tokens=args.max_new_tokens,
                                    min_new_tokens=args.max_new_tokens,
                                    pad_token_id=tok.pad_token_id)

        t = timed({"one": lambda: run([late]), "two": lambda: run([early, late]), "hf": hf},
                  args.repeats, args.device)
        t_one, t_two, t_hf = t["one"], t["two"], t["hf"]

    print(f"model: {n_params / 1e6:.2f}M parameters ({'given' if args.early else 'random init'}), "
          f"{args.prompts} prompts x k={args.k} x {args.max_new_tokens} new tokens, batch "
          f"{args.batch_size}, {args.device}, torch threads {torch.get_num_threads()}, "
          f"{'CPU' if args.device == 'cpu' else 'wall'} seconds, best of {args.repeats}")
    print(f"one model (decode):            {t_one:7.3f} s  {tokens / t_one:9.1f} tokens/s")
    print(f"one model (transformers):      {t_hf:7.3f} s  {tokens / t_hf:9.1f} tokens/s")
    print(f"logits extrapolation (2 models): {t_two:5.3f} s  {tokens / t_two:9.1f} tokens/s")
    print(f"ratio extrapolation / one model: {t_two / t_one:.2f}x (goal <= 2.2x)")


if __name__ == "__main__":
    main()
