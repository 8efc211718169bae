"""Tensor name -> (layer index, module type), for Qwen2, Llama, Mistral and MoE checkpoints.

Histograms are summed per layer x module, so every tensor needs a layer (-1
when it belongs to no decoder layer: embeddings, final norm, lm_head) and a
module label. Labels are the names people already use in these checkpoints
(``q_proj``, ``down_proj``, ``input_layernorm``...). MoE experts keep their
projection: ``experts.gate_proj`` pools all experts of a layer, so a model
with 64 experts still gives a readable table; the router is ``router``.
Anything unrecognised gets the generic label ``other`` instead of an error:
a new architecture should still fit, only with a coarser table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NO_LAYER = -1
GENERIC = "other"

# decoder layer index: model.layers.N., transformer.h.N., model.decoder.layers.N. ...
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
_EXPERT = re.compile(r"\.experts\.(\d+)\.(?:(?:\w+)\.)*?(\w+?)(?:\.weight|\.bias|\.scale)?$")
_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
         "w1", "w2", "w3", "qkv_proj", "gate_up_proj")
_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
          "post_feedforward_layernorm", "q_norm", "k_norm")
_ROUTER = re.compile(r"\.(?:mlp|block_sparse_moe)\.(?:gate|router)\.(?:weight|bias)$")
_SHARED = re.compile(r"\.shared_experts?\.(\w+)\.(?:weight|bias)$")

# module order for tables and heatmaps: attention, then MLP, then the rest
MODULE_ORDER = ("embed_tokens", "input_layernorm", "q_proj", "k_proj", "v_proj", "o_proj",
                "q_norm", "k_norm", "post_attention_layernorm", "gate_proj", "up_proj",
                "down_proj", "router", "experts.gate_proj", "experts.up_proj",
                "experts.down_proj", "experts.gate_up_proj", "shared_experts.gate_proj",
                "shared_experts.up_proj", "shared_experts.down_proj", "norm", "lm_head", GENERIC)


@dataclass(frozen=True)
class NameInfo:
    """Where a tensor sits: decoder layer (NO_LAYER if none) and module label."""

    layer: int
    module: str


def parse_name(name: str) -> NameInfo:
    """Layer index and module label of a checkpoint tensor name (never raises)."""
    m = _LAYER.search(name)
    layer = int(m.group(1)) if m else NO_LAYER
    if m is None:
        if "embed_tokens" in name or name.endswith(("wte.weight", "embeddings.weight")):
            return NameInfo(NO_LAYER, "embed_tokens")
        if name.startswith("lm_head") or ".lm_head." in name:
            return NameInfo(NO_LAYER, "lm_head")
        if re.search(r"(?:^|\.)(?:norm|ln_f|final_layernorm)\.(?:weight|bias)$", name):
            return NameInfo(NO_LAYER, "norm")
        return NameInfo(NO_LAYER, GENERIC)
    rest = name[m.end():]
    if _ROUTER.search("." + rest):
        return NameInfo(layer, "router")
    sh = _SHARED.search("." + rest)
    if sh:
        return NameInfo(layer, f"shared_experts.{_proj_label(sh.group(1))}")
    ex = _EXPERT.search("." + rest)
    if ex:
        return NameInfo(layer, f"experts.{_proj_label(ex.group(2))}")
    parts = rest.split(".")
    prefix = "experts." if "experts" in parts else ""  # fused experts: mlp.experts.gate_up_proj
    for p in reversed(parts):
        if p in _NORMS:
            return NameInfo(layer, p)
        if p in _PROJ:
            return NameInfo(layer, prefix + _proj_label(p))
    return NameInfo(layer, GENERIC)


def _proj_label(p: str) -> str:
    """Mixtral's w1/w3/w2 are gate/up/down."""
    return {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}.get(p, p)


def module_rank(module: str) -> tuple[int, str]:
    """Sort key putting modules in MODULE_ORDER, unknown ones last, alphabetically."""
    try:
        return MODULE_ORDER.index(module), module
    except ValueError:
        return len(MODULE_ORDER), module


def display_name(name: str) -> str:
    """``name`` as text any file can hold: a lone surrogate becomes a ``\\udcXX`` escape.

    Histograms (zarr strings), CSVs and tables need valid UTF-8; the fit's own
    arrays are keyed by the escaped store path and are unaffected. Valid names
    are returned unchanged.
    """
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return name.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
    return name
