"""The one hook mechanism: read (record), write (edit) and take gradients at sites, on the model's own forward pass.

`hooked(model, batch, record=..., edit=..., grad=...)` attaches PyTorch hooks for exactly the sites asked for and
removes them when the context closes, also when the forward pass raises. Every site goes through `_SiteHooks.apply`,
which runs, in order: the edit function, the gradient hook, the recording.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from modelrecon.errors import BadInputError
from modelrecon.hooks.attention import patterns_through
from modelrecon.models.model import Batch, Model
from modelrecon.models.sites import parse_site


@dataclass(frozen=True)
class HookContext:
    """What an edit function is told besides the value: which site, which layer, and the batch (for padding)."""

    site: str
    layer: int | None
    batch: Batch


# An edit gets the site's value as the forward pass holds it ([batch, pos, ...]; patterns [batch, head, q, k]) and
# returns the new value (same shape, or batch 1 for one value shared by every row) or None to leave it.
EditFn = Callable[[torch.Tensor, HookContext], torch.Tensor | None]


@dataclass
class Trace:
    """What a hooked forward (and backward) pass collected: per site, one tensor per prompt, padding stripped.

    Shapes per prompt: `[pos, ...]` for most sites, `[head, q, k]` for `attn.pattern`, where `pos` is the prompt's
    own tokens (or the chosen positions).
    """

    acts: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    grads: dict[str, list[torch.Tensor]] = field(default_factory=dict)


def _positions_index(positions: int | Sequence[int] | None, length: int) -> list[int] | None:
    if positions is None:
        return None
    chosen = [positions] if isinstance(positions, int) else list(positions)
    for p in chosen:
        if not -length <= p < length:
            raise BadInputError(
                f"position {p} is outside a prompt of {length} tokens; use 0..{length - 1} or -1..-{length}"
            )
    return [p % length for p in chosen]


class _SiteHooks:
    """Per-call state shared by all hook closures: what to record, edit and differentiate, and where results go."""

    def __init__(self, model, batch, record, edit, grad, positions, dtype, device):
        self.model, self.batch = model, batch
        self.record, self.edit, self.grad = set(record), edit, set(grad)
        self.dtype, self.device = dtype, model.device if device is None else device
        self.positions = [_positions_index(positions, n) for n in batch.lengths]
        self.trace = Trace({s: [] for s in record}, {s: [] for s in grad})

    def per_prompt(self, site: str, value: torch.Tensor) -> list[torch.Tensor]:
        """Split a batched value into one tensor per prompt, padding stripped, on the chosen positions."""
        pattern = parse_site(site).kind == "attn.pattern"
        out = []
        for i in range(self.batch.size):
            real = self.batch.real(i)
            row = value[i, :, real, real] if pattern else value[i, real]
            if self.positions[i] is not None:
                index = torch.tensor(self.positions[i], device=row.device)
                row = row.index_select(1 if pattern else 0, index)
            out.append(row.detach().to(device=self.device, dtype=self.dtype or row.dtype, copy=True))
        return out

    def apply(self, site: str, value: torch.Tensor) -> torch.Tensor:
        if site in self.edit:
            site_info = parse_site(site)
            new = self.edit[site](value, HookContext(site, site_info.layer, self.batch))
            if new is not None:
                if not isinstance(new, torch.Tensor) or not _fits(new.shape, value.shape):
                    got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                    raise BadInputError(
                        f"edit of '{site}' returned {got}; "
                        f"it must return a tensor of shape {tuple(value.shape)} (or batch 1) or None"
                    )
                # a pattern shared by every row stays unexpanded (the attention output is computed from it as one
                # product), unless rows are recorded or differentiated one by one
                shared = site_info.kind == "attn.pattern" and site not in self.record and site not in self.grad
                value = new if shared or new.shape == value.shape else new.expand(value.shape)
        if site in self.grad:
            if not value.requires_grad and value.grad_fn is None and torch.is_grad_enabled():
                value.requires_grad_(True)  # an edit wrote a fresh tensor (e.g. an interpolation): differentiate it
            if not value.requires_grad:
                raise BadInputError(
                    f"site '{site}' is not connected to the gradient; record gradients through run(grad=...)"
                )
            value.register_hook(lambda g, site=site: self.trace.grads[site].extend(self.per_prompt(site, g)))
        if site in self.record:
            self.trace.acts[site].extend(self.per_prompt(site, value))
        return value


def _fits(shape: torch.Size, to: torch.Size) -> bool:
    """An edit's value has the site's shape, or batch 1 (one value for every row)."""
    return shape == to or (len(shape) == len(to) and shape[0] == 1 and shape[1:] == to[1:])


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output, value):
    return (value, *output[1:]) if isinstance(output, tuple) else value


def _on_output(site_hooks: _SiteHooks, site: str) -> Callable:
    def hook(module, args, output):
        if site == "logits":
            output.logits = site_hooks.apply(site, output.logits)
            return output
        return _replace_first(output, site_hooks.apply(site, _first(output)))

    return hook


def _on_input(site_hooks: _SiteHooks, site: str, reshape: tuple[int, ...] | None = None) -> Callable:
    """Pre-hook on the module's first input (`hidden_states`), optionally seen in another shape (per head)."""

    def hook(module, args, kwargs):
        value = args[0] if args else kwargs["hidden_states"]
        shaped = value.reshape(*value.shape[:-1], *reshape) if reshape else value
        new = site_hooks.apply(site, shaped)
        if new is shaped and site not in site_hooks.grad:
            return None  # a gradient hook sits on `shaped`: then the module must use it, not `value`
        new = new.reshape(value.shape) if reshape else new
        return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

    return hook


def _on_qkv(site_hooks: _SiteHooks, site: str, part: int, layout: str, model: Model) -> Callable:
    """Output hook on a q/k/v projection: the site sees `[batch, pos, heads, d_head]`, also out of fused outputs."""
    d_head, n_q, n_kv = model.d_head, model.n_heads, model.n_kv_heads

    def hook(module, args, output):
        if layout == "separate":
            pieces, piece = None, output
        elif layout == "concat":  # q | k | v along the last axis
            pieces = list(output.split([n_q * d_head, n_kv * d_head, n_kv * d_head], dim=-1))
            piece = pieces[part]
        else:  # per_head: [..., head, q | k | v]
            pieces = list(output.reshape(*output.shape[:-1], n_q, 3 * d_head).split(d_head, dim=-1))
            piece = pieces[part]
        shaped = piece if layout == "per_head" else piece.reshape(*piece.shape[:-1], -1, d_head)
        new = site_hooks.apply(site, shaped)
        if new is shaped and site not in site_hooks.grad:
            return None  # as in _on_input: a gradient hook on `shaped` needs the module to use it
        if pieces is None:
            return new.reshape(output.shape)
        pieces[part] = new.reshape(piece.shape)
        return torch.cat(pieces, dim=-1).reshape(output.shape)

    return hook


def _resid_mid_hooks(site_hooks: _SiteHooks, site: str, norm: nn.Module, layer: nn.Module, stack: ExitStack) -> None:
    """resid_mid is read at the input of the MLP's norm; an edit must also reach the residual the layer returns.

    The layer returns resid_mid + mlp_out, so adding the edit's difference to the layer output gives exactly the
    forward pass with the edited resid_mid.
    """
    delta: list[torch.Tensor] = []

    def before_norm(module, args, kwargs):
        value = args[0] if args else kwargs["hidden_states"]
        new = site_hooks.apply(site, value)
        if new is value:
            return None
        delta.append(new - value)
        return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

    def after_layer(module, args, output):
        if delta:
            return _replace_first(output, _first(output) + delta.pop())
        return None

    stack.callback(norm.register_forward_pre_hook(before_norm, with_kwargs=True).remove)
    stack.callback(layer.register_forward_hook(after_layer).remove)


@contextmanager
def hooked(
    model: Model,
    batch: Batch,
    *,
    record: Sequence[str] = (),
    edit: dict[str, EditFn] | None = None,
    grad: Sequence[str] = (),
    positions: int | Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> Iterator[Trace]:
    """Attach hooks for the given sites (names or globs) around forward passes of `model.hf` on `batch`.

    record: sites whose values are kept (after edits), one tensor per prompt, cast to `dtype` and moved to `device`
    (default: the model's own, so nothing crosses to the host unless asked).
    edit: site -> function(value, HookContext) returning the new value or None.
    grad: sites whose gradients are kept when a backward pass runs inside the context.
    positions: keep only these token positions of each prompt (negative counts from the end).
    """
    edit = {name: fn for pattern, fn in (edit or {}).items() for name in model.resolve_sites(pattern)}
    record = model.resolve_sites(list(record)) if record else []
    grad = model.resolve_sites(list(grad)) if grad else []
    site_hooks = _SiteHooks(model, batch, record, edit, grad, positions, dtype, device)
    adapter = model.adapter
    pattern_handlers = {}
    with ExitStack() as stack:

        def on_output(module: nn.Module, site: str) -> None:
            stack.callback(module.register_forward_hook(_on_output(site_hooks, site)).remove)

        def on_input(module: nn.Module, site: str, reshape=None) -> None:
            handle = module.register_forward_pre_hook(_on_input(site_hooks, site, reshape), with_kwargs=True)
            stack.callback(handle.remove)

        if grad:  # make activations part of the autograd graph, starting from the embeddings
            embed = model.module(adapter.embed)
            stack.callback(embed.register_forward_hook(lambda m, a, out: out.requires_grad_(True)).remove)

        for site in sorted(set(record) | set(edit) | set(grad), key=model.site_names().index):
            info = parse_site(site)
            if info.layer is None:
                module = (
                    model.hf
                    if site == "logits"
                    else model.module(adapter.embed if site == "embed" else adapter.final_norm)
                )
                on_output(module, site)
                continue
            layer = model.layers[info.layer]
            sub = layer.get_submodule
            if info.kind == "resid_pre":
                on_input(layer, site)
            elif info.kind in ("attn.q", "attn.k", "attn.v"):
                part = "qkv".index(info.kind[-1])
                module = sub(adapter.qkv[part if adapter.qkv_layout == "separate" else 0])
                handle = module.register_forward_hook(_on_qkv(site_hooks, site, part, adapter.qkv_layout, model))
                stack.callback(handle.remove)
            elif info.kind == "attn.pattern":
                rewrite = site in edit or site in grad

                def handler(pattern, site=site):
                    return site_hooks.apply(site, pattern)

                pattern_handlers[sub(adapter.attn)] = (handler, rewrite)
            elif info.kind == "attn.heads":
                on_input(sub(adapter.o_proj), site, reshape=(model.n_heads, model.d_head))
            elif info.kind == "attn.out":
                on_output(sub(adapter.attn_out), site)
            elif info.kind == "resid_mid":
                _resid_mid_hooks(site_hooks, site, sub(adapter.mlp_norm), layer, stack)
            elif info.kind == "mlp.in":
                on_input(sub(adapter.mlp), site)
            elif info.kind == "mlp.neurons":
                on_input(sub(adapter.down_proj), site)
            elif info.kind == "mlp.out":
                on_output(sub(adapter.mlp_out), site)
            elif info.kind == "resid_post":
                on_output(layer, site)
        stack.enter_context(patterns_through(model.hf.config._attn_implementation, pattern_handlers))
        yield site_hooks.trace
