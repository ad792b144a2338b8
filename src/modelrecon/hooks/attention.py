"""Attention patterns through the transformers attention-function interface.

While patterns are wanted, the entry of the model's attention implementation in transformers' `AttentionInterface`
is replaced by a wrapper. For a layer whose pattern is wanted, the wrapper runs the model's own implementation for the
output (so logits stay bit-identical) and the model family's own `eager_attention_forward` for the probabilities.
Only when a pattern is edited (or needs gradients) is the output recomputed from the probabilities.
Layers whose pattern is not wanted pass straight through; nothing is wrapped when no pattern is asked for.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers.modeling_utils import AttentionInterface

# Called with the probabilities [batch, head, q, k]; returns None (just looked) or new probabilities.
PatternHandler = Callable[[torch.Tensor], torch.Tensor | None]


def _eager_of(module: nn.Module) -> Callable:
    return sys.modules[type(module).__module__].eager_attention_forward


def _additive_mask(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """The float mask eager attention adds to its scores, from whatever mask the active implementation got."""
    if mask is not None and mask.dtype != torch.bool:
        return mask
    if mask is None:  # the implementation relies on plain causal masking
        q_len, k_len = query.shape[-2], key.shape[-2]
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)[None, None]
    return torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
        ~mask, torch.finfo(query.dtype).min
    )


def _output_from_pattern(pattern: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """pattern [batch, head, q, k] @ value [batch, kv_head, k, d] -> [batch, q, head, d], grouped-query aware."""
    value = value.repeat_interleave(pattern.shape[1] // value.shape[1], dim=1)
    return torch.matmul(pattern.to(value.dtype), value).transpose(1, 2).contiguous()


@contextmanager
def patterns_through(implementation: str, handlers: dict[nn.Module, tuple[PatternHandler, bool]]) -> Iterator[None]:
    """Route the attention modules in `handlers` through their handler while the context is open.

    `handlers` maps an attention module to (handler, rewrite): with rewrite, the layer's output is recomputed from the
    probabilities the handler returns.
    """
    if not handlers:
        yield
        return
    mapping = AttentionInterface._global_mapping
    had_entry = implementation in mapping
    original = mapping.get(implementation)

    def attention(module, query, key, value, attention_mask, **kwargs):
        own = original or _eager_of(module)
        entry = handlers.get(module)
        if entry is None:
            return own(module, query, key, value, attention_mask, **kwargs)
        handler, rewrite = entry
        eager = _eager_of(module)
        if original is None:  # the model runs eager attention already: its probabilities are the real ones
            output, pattern = eager(module, query, key, value, attention_mask, **kwargs)
        else:
            output, weights = own(module, query, key, value, attention_mask, **kwargs)
            _, pattern = eager(module, query, key, value, _additive_mask(attention_mask, query, key), **kwargs)
        new_pattern = handler(pattern)
        if rewrite:
            pattern = pattern if new_pattern is None else new_pattern
            return _output_from_pattern(pattern, value), pattern
        return output, (pattern if original is None else weights)

    mapping[implementation] = attention
    try:
        yield
    finally:
        if had_entry:
            mapping[implementation] = original
        else:
            del mapping[implementation]
