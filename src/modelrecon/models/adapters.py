"""Architecture adapters: a table that names, for each model family, the modules behind the standard sites.

An adapter only names modules; it never changes what they compute. Adding a family is one `Adapter(...)` entry in
`ADAPTERS` (see docs/architectures.md). Paths of per-layer modules are relative to one decoder layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from modelrecon.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Adapter:
    family: str
    model_types: tuple[str, ...]
    embed: str  # token embedding; its output is the `embed` site
    layers: str  # the ModuleList of decoder layers
    final_norm: str  # its output is the `final` site
    attn: str  # the attention module that calls the transformers attention function
    attn_out: str  # its output is what attention adds to the residual stream
    o_proj: str  # its input is the per-head outputs, concatenated
    mlp: str  # its input is `mlp.in`
    mlp_out: str  # its output is what the MLP adds to the residual stream
    down_proj: str  # its input is `mlp.neurons`
    mlp_norm: str  # its input is `resid_mid` (unless the layer uses a parallel residual)
    # The query/key/value projections: three modules, or one fused module whose output is q|k|v ("concat") or,
    # per head, q|k|v ("per_head", GPT-NeoX). Their outputs are the attn.q / attn.k / attn.v sites.
    qkv: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    qkv_layout: str = "separate"
    attn_norm: str = "input_layernorm"  # its output is attention's input (read by exact edge patching)
    parallel_residual: Callable[[object], bool] = field(default=lambda config: False)

    def top_level_paths(self) -> list[str]:
        return [self.embed, self.layers, self.final_norm]

    def layer_paths(self) -> list[str]:
        paths = [
            self.attn,
            self.attn_out,
            self.o_proj,
            self.mlp,
            self.mlp_out,
            self.down_proj,
            self.mlp_norm,
            self.attn_norm,
            *self.qkv,
        ]
        return list(dict.fromkeys(paths))  # one module may serve two sites


_LLAMA_LIKE = dict(
    embed="model.embed_tokens",
    layers="model.layers",
    final_norm="model.norm",
    attn="self_attn",
    attn_out="self_attn",
    o_proj="self_attn.o_proj",
    mlp="mlp",
    mlp_out="mlp",
    down_proj="mlp.down_proj",
    mlp_norm="post_attention_layernorm",
)

ADAPTERS: list[Adapter] = [
    Adapter("llama", ("llama", "mistral", "qwen2", "qwen3", "gemma"), **_LLAMA_LIKE),
    # Gemma 2/3 normalise each sublayer's output before adding it to the residual stream.
    Adapter(
        "gemma2",
        ("gemma2", "gemma3_text"),
        **{
            **_LLAMA_LIKE,
            "attn_out": "post_attention_layernorm",
            "mlp_out": "post_feedforward_layernorm",
            "mlp_norm": "pre_feedforward_layernorm",
        },
    ),
    Adapter(
        "phi3",
        ("phi3",),
        **{**_LLAMA_LIKE, "attn_out": "resid_attn_dropout", "mlp_out": "resid_mlp_dropout"},
        qkv=("self_attn.qkv_proj",),
        qkv_layout="concat",
    ),
    Adapter(
        "gpt2",
        ("gpt2",),
        embed="transformer.wte",
        layers="transformer.h",
        final_norm="transformer.ln_f",
        attn="attn",
        attn_out="attn",
        o_proj="attn.c_proj",
        mlp="mlp",
        mlp_out="mlp",
        down_proj="mlp.c_proj",
        mlp_norm="ln_2",
        attn_norm="ln_1",
        qkv=("attn.c_attn",),
        qkv_layout="concat",
    ),
    Adapter(
        "gpt_neox",
        ("gpt_neox",),
        embed="gpt_neox.embed_in",
        layers="gpt_neox.layers",
        final_norm="gpt_neox.final_layer_norm",
        attn="attention",
        attn_out="post_attention_dropout",
        o_proj="attention.dense",
        mlp="mlp",
        mlp_out="post_mlp_dropout",
        down_proj="mlp.dense_4h_to_h",
        mlp_norm="post_attention_layernorm",
        qkv=("attention.query_key_value",),
        qkv_layout="per_head",
        parallel_residual=lambda config: bool(getattr(config, "use_parallel_residual", False)),
    ),
]


def get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _missing_modules(adapter: Adapter, hf_model: nn.Module) -> list[str]:
    missing = [p for p in adapter.top_level_paths() if get_submodule(hf_model, p) is None]
    layers = get_submodule(hf_model, adapter.layers)
    if layers is not None and len(layers) > 0:
        missing += [f"{adapter.layers}.0.{p}" for p in adapter.layer_paths() if get_submodule(layers[0], p) is None]
    return missing


def adapter_for(hf_model: nn.Module) -> Adapter:
    """The adapter for this model, checked against its modules. [UnsupportedArchitectureError] names what's missing."""
    model_type = getattr(hf_model.config, "model_type", "?")
    adapter = next((a for a in ADAPTERS if model_type in a.model_types), None)
    if adapter is None:
        # Say how far the most common layout gets, so the user knows how much an adapter has to name.
        missing = _missing_modules(ADAPTERS[0], hf_model)
        known = sorted(t for a in ADAPTERS for t in a.model_types)
        raise UnsupportedArchitectureError(
            f"no adapter for model_type '{model_type}' (supported: {', '.join(known)}); "
            f"the Llama layout lacks {', '.join(missing) or 'nothing'}: add an Adapter entry to "
            "modelrecon.models.adapters.ADAPTERS naming its modules (see docs/architectures.md)"
        )
    missing = _missing_modules(adapter, hf_model)
    if missing:
        raise UnsupportedArchitectureError(
            f"model_type '{model_type}' lacks modules the '{adapter.family}' adapter expects: {', '.join(missing)}; "
            "add or fix an Adapter entry in modelrecon.models.adapters.ADAPTERS (see docs/architectures.md)"
        )
    return adapter
