"""Random-walk bf16 runs with a Qwen2 model's names and shapes, for throughput benchmarks.

Every element moves by -1, 0 or +1 ULP per checkpoint (0 with probability
1/2), never onto NaN/inf and never across zero. It is a workload with the
sizes and the change statistics of a real bf16 RL run, and says nothing
about linearity. Checkpoints are written as Hugging Face shards (index +
``config.json``), streamed in row blocks into every step's writer at once,
so generating a 10+ GB run needs memory for one block, not one model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.checkpoints.writer import ShardedWriter, TensorSpec

BLOCK_ELEMENTS = 1 << 24  # per generated block (32 MB of bf16)


@dataclass(frozen=True)
class Qwen2Shapes:
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    bias: bool = True  # Qwen2 has q/k/v biases
    tie: bool = True

    def tensors(self) -> dict[str, tuple[int, ...]]:
        h, i, kv = self.hidden, self.intermediate, self.hidden // self.heads * self.kv_heads
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out.update({p + "self_attn.q_proj.weight": (h, h),
                        p + "self_attn.k_proj.weight": (kv, h),
                        p + "self_attn.v_proj.weight": (kv, h),
                        p + "self_attn.o_proj.weight": (h, h)})
            if self.bias:
                out.update({p + "self_attn.q_proj.bias": (h,), p + "self_attn.k_proj.bias": (kv,),
                            p + "self_attn.v_proj.bias": (kv,)})
            out.update({p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                        p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                        p + "post_attention_layernorm.weight": (h,)})
        out["model.norm.weight"] = (h,)
        if not self.tie:
            out["lm_head.weight"] = (self.vocab, h)
        return out

    def config(self) -> dict:
        return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                "hidden_size": self.hidden, "intermediate_size": self.intermediate,
                "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
                "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab,
                "tie_word_embeddings": self.tie, "torch_dtype": "bfloat16",
                "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "hidden_act": "silu"}

    def elements(self) -> int:
        return sum(int(np.prod(s)) for s in self.tensors().values())


# Qwen2.5-1.5B: 1.54 B parameters, 3.09 GB per bf16 checkpoint
QWEN25_1_5B = Qwen2Shapes(hidden=1536, intermediate=8960, layers=28, vocab=151936, heads=12,
                          kv_heads=2)
# The fit issue's workload: 0.5B-model shapes (hidden 896, 12 layers, vocab 65536,
# intermediate 4864, untied head), 0.59 GB per bf16 checkpoint; 4 steps make 2.3 GB
ISSUE_0_5B = Qwen2Shapes(hidden=896, intermediate=4864, layers=12, vocab=65536, heads=14,
                         kv_heads=2, tie=False)


def _step(bits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The next checkpoint's bf16 bits: each element -1/0/+1 ULP, never to NaN/inf or past 0."""
    r = rng.integers(0, 4, size=bits.shape, dtype=np.uint8)
    moves = (r == 2).astype(np.int32) - (r == 3)
    nxt = bits.astype(np.int32) + moves
    stuck = ((nxt & 0x7FFF) == 0x7FFF) | ((bits & 0x7FFF) == 0) | ((nxt & 0x7FFF) == 0)
    return np.where(stuck, bits, nxt).astype(np.uint16)


def write_random_walk(out: Path, shapes: Qwen2Shapes, n_steps: int, every: int = 10,
                      seed: int = 0, max_shard_size: str = "2GB") -> Path:
    """``out/global_step_{every * k}/`` for k < n_steps; returns ``out``."""
    import ml_dtypes

    rng = np.random.default_rng(seed)
    tensors = shapes.tensors()
    specs = [TensorSpec(k, s, np.dtype(ml_dtypes.bfloat16)) for k, s in tensors.items()]
    folders = [out / f"global_step_{every * k}" for k in range(n_steps)]
    writers = [ShardedWriter(f, specs, max_shard_size) for f in folders]
    for w in writers:
        w.__enter__()
    for name, shape in tensors.items():
        rows = shape[0]
        per_row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        step_rows = max(1, BLOCK_ELEMENTS // per_row)
        for r0 in range(0, rows, step_rows):
            r1 = min(rows, r0 + step_rows)
            w0 = rng.standard_normal((r1 - r0, *shape[1:]), dtype=np.float32) * 0.02
            bits = w0.astype(ml_dtypes.bfloat16).view(np.uint16)
            for k, w in enumerate(writers):
                if k:
                    bits = _step(bits, rng)
                w.write(name, bits.view(ml_dtypes.bfloat16))
    for f, w in zip(folders, writers, strict=True):
        w.__exit__(None, None, None)
        (f / "config.json").write_text(json.dumps(shapes.config(), indent=2) + "\n")
    return out
