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
    """pattern [batch, head, q, k] @ value [batch, kv_head, k, d] -> [batch, q, head, d], grouped-query aware. A
    pattern with batch 1 serves every row (a frozen pattern): one matmul per kv head with the rows side by side, so
    the pattern is never copied per row and the backward pass is a few large products, not batch x head small ones."""
    batch, kv_heads, k, d = value.shape
    heads, q = pattern.shape[1], pattern.shape[2]
    group = heads // kv_heads
    pattern = pattern.to(value.dtype)
    if pattern.shape[0] == 1 and batch > 1:
        rows_side_by_side = value.permute(1, 2, 0, 3).reshape(kv_heads, k, batch * d)
        out = torch.matmul(pattern[0].reshape(kv_heads, group * q, k), rows_side_by_side)
        return out.view(kv_heads, group, q, batch, d).permute(3, 2, 0, 1, 4).reshape(batch, q, heads, d)
    value = value.repeat_interleave(group, dim=1)
    return torch.matmul(pattern, value).transpose(1, 2).contiguous()


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
        elif rewrite:  # the output is recomputed from the pattern: the model's own implementation is not needed
            output, pattern = eager(module, query, key, value, _additive_mask(attention_mask, query, key), **kwargs)
        else:
            output, weights = own(module, query, key, value, attention_mask, **kwargs)
            _, pattern = eager(module, query, key, value, _additive_mask(attention_mask, query, key), **kwargs)
        new_pattern = handler(pattern)
        if rewrite:
            pattern = pattern if new_pattern is None else new_pattern
            return _output_from_pattern(pattern, value), pattern.expand(value.shape[0], -1, -1, -1)
        return output, (pattern if original is None else weights)

    mapping[implementation] = attention
    try:
        yield
    finally:
        if had_entry:
            mapping[implementation] = original
        else:
            del mapping[implementation]
