"""Layer/module parsing of checkpoint tensor names (Qwen2, Llama, Mistral, MoE)."""

from __future__ import annotations

import pytest

from pipeline.fit.names import GENERIC, NO_LAYER, module_rank, parse_name


@pytest.mark.parametrize(
    "name, layer, module",
    [
        ("model.layers.0.self_attn.q_proj.weight", 0, "q_proj"),
        ("model.layers.12.self_attn.k_proj.bias", 12, "k_proj"),
        ("model.layers.3.self_attn.v_proj.weight", 3, "v_proj"),
        ("model.layers.3.self_attn.o_proj.weight", 3, "o_proj"),
        ("model.layers.7.mlp.gate_proj.weight", 7, "gate_proj"),
        ("model.layers.7.mlp.up_proj.weight", 7, "up_proj"),
        ("model.layers.27.mlp.down_proj.weight", 27, "down_proj"),
        ("model.layers.3.input_layernorm.weight", 3, "input_layernorm"),
        ("model.layers.3.post_attention_layernorm.weight", 3, "post_attention_layernorm"),
        ("model.embed_tokens.weight", NO_LAYER, "embed_tokens"),
        ("lm_head.weight", NO_LAYER, "lm_head"),
        ("model.norm.weight", NO_LAYER, "norm"),
        # Mixtral / Mistral MoE: w1/w3/w2 are gate/up/down, the router is "gate"
        ("model.layers.5.block_sparse_moe.experts.7.w1.weight", 5, "experts.gate_proj"),
        ("model.layers.5.block_sparse_moe.experts.7.w3.weight", 5, "experts.up_proj"),
        ("model.layers.5.block_sparse_moe.experts.7.w2.weight", 5, "experts.down_proj"),
        ("model.layers.5.block_sparse_moe.gate.weight", 5, "router"),
        # Qwen2-MoE / Qwen3-MoE
        ("model.layers.2.mlp.experts.63.gate_proj.weight", 2, "experts.gate_proj"),
        ("model.layers.2.mlp.experts.0.down_proj.weight", 2, "experts.down_proj"),
        ("model.layers.2.mlp.gate.weight", 2, "router"),
        ("model.layers.2.mlp.shared_expert.up_proj.weight", 2, "shared_experts.up_proj"),
        ("model.layers.1.mlp.experts.gate_up_proj", 1, "experts.gate_up_proj"),
        ("model.layers.2.self_attn.q_norm.weight", 2, "q_norm"),
        # unknown names fall back to a generic module, never an error
        ("model.rotary_emb.inv_freq", NO_LAYER, GENERIC),
        ("model.layers.4.something_new.weight", 4, GENERIC),
        ("weird/name with spaces", NO_LAYER, GENERIC),
    ],
)
def test_parse_name(name: str, layer: int, module: str) -> None:
    info = parse_name(name)
    assert (info.layer, info.module) == (layer, module)


def test_module_order_puts_attention_before_mlp_and_unknown_last() -> None:
    mods = ["down_proj", "zzz_new", "q_proj", "lm_head", "embed_tokens", "input_layernorm"]
    assert sorted(mods, key=module_rank) == ["embed_tokens", "input_layernorm", "q_proj",
                                             "down_proj", "lm_head", "zzz_new"]
