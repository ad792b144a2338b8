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
        mask = _allowed(k_len - q_len, k_len, k_len, None, query.device)[None, None]
    return torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
        ~mask, torch.finfo(query.dtype).min
    )


def _allowed(start: int, stop: int, keys: int, window: int | None, device) -> torch.Tensor:
    """Which keys 0..keys-1 queries start..stop-1 may attend to: causal, and within `window` when there is one."""
    q = torch.arange(start, stop, device=device)[:, None]
    k = torch.arange(keys, device=device)[None, :]
    allowed = k <= q
    return allowed if window is None else allowed & (q - k < window)


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

    def attention(original, module, query, key, value, attention_mask, **kwargs):
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

    with _attention_replaced(implementation, attention):
        yield


@contextmanager
def _attention_replaced(implementation: str, attention: Callable) -> Iterator[None]:
    """The model's entry in transformers' `AttentionInterface` replaced by `attention(original, module, ...)` while
    the context is open (`original`: the entry it replaced, None for eager attention, which has no entry)."""
    mapping = AttentionInterface._global_mapping
    had_entry = implementation in mapping
    original = mapping.get(implementation)
    mapping[implementation] = lambda *args, **kwargs: attention(original, *args, **kwargs)
    try:
        yield
    finally:
        if had_entry:
            mapping[implementation] = original
        else:
            del mapping[implementation]


class FrozenAttention:
    """One layer's attention pattern of one prompt, kept as what it is made of: the query and key states that enter
    the attention function (after RoPE and any q/k norms, `[1, heads, pos, d_head]`) and the function's arguments.
    Any block of rows is recomputed exactly by the family's own eager attention, so a long prompt's patterns never
    sit in memory as `[layers, heads, pos, pos]`: O(pos) per layer is kept, O(pos^2) for one layer at a time."""

    def __init__(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, kwargs: dict) -> None:
        self.module, self.query, self.key = module, query.detach(), key.detach()
        self.kwargs = {k: v for k, v in kwargs.items() if k != "dropout"}
        self.length = query.shape[-2]

    def rows(self, start: int, stop: int, keys: int | None = None) -> torch.Tensor:
        """The probabilities of query positions start..stop-1 over key positions 0..keys-1 (default: stop; later
        keys are masked anyway): `[heads, stop - start, keys]`, float32."""
        keys = stop if keys is None else keys
        query, key = self.query[:, :, start:stop], self.key[:, :, :keys]
        allowed = _allowed(start, stop, keys, self.kwargs.get("sliding_window"), query.device)
        mask = _additive_mask(allowed[None, None], query, key)
        _, pattern = _eager_of(self.module)(self.module, query, key, key, mask, dropout=0.0, **self.kwargs)
        return pattern[0].float()

    def pattern(self, n: int | None = None) -> torch.Tensor:
        """The pattern over the first n positions (default: all), `[heads, n, n]`."""
        n = self.length if n is None else n
        return self.rows(0, n)

    def nbytes(self) -> int:
        return (self.query.numel() + self.key.numel()) * self.query.element_size()


@contextmanager
def attention_inputs(implementation: str, modules: dict[nn.Module, int], out: dict[int, FrozenAttention]):
    """While open, each attention module in `modules` (module -> layer) stores its `FrozenAttention` in `out[layer]`
    and runs as usual (its output untouched: the logits stay the model's own)."""

    def attention(original, module, query, key, value, attention_mask, **kwargs):
        layer = modules.get(module)
        if layer is not None:
            out[layer] = FrozenAttention(module, query, key, kwargs)
        own = original or _eager_of(module)
        return own(module, query, key, value, attention_mask, **kwargs)

    with _attention_replaced(implementation, attention):
        yield
