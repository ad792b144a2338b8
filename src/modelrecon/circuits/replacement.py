"""The replacement model, built on the unmodified Hugging Face model through hooks.

On one prompt's clean run it freezes every attention pattern (through the attention-function interface) and every
norm's scale, and replaces each MLP's output by its transcoder's output plus a frozen error term (the MLP's clean
output minus the transcoder's prediction). The logits are the model's own, and every path from a feature's decoder
write to a later feature's encoder or to a logit is linear: that is what makes the attribution graph's edges exact
direct effects.

Feature activations, error terms and token embeddings enter as leaf tensors (one row per backward target), so one
backward pass gives every source's direct effect on a target: gradient . value.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from modelrecon.dictionaries.model import Dictionary
from modelrecon.errors import BadInputError
from modelrecon.hooks.attention import FrozenAttention, attention_inputs
from modelrecon.hooks.trace import hooked
from modelrecon.models.model import Model
from modelrecon.models.sites import site_name
from modelrecon.models.weights import is_norm, norm


@dataclass
class CleanRun:
    """What the replacement model freezes and the graph's nodes are made of, for one prompt."""

    ids: list[int]
    embed: torch.Tensor  # [pos, d_model]: the input to layer 0
    mlp_in: list[torch.Tensor]  # per layer [pos, d_model]
    features: list[torch.Tensor]  # per layer [pos, width]: the transcoder's activations
    errors: list[torch.Tensor]  # per layer [pos, d_model]: the MLP's output minus the transcoder's prediction
    patterns: list[FrozenAttention]  # per layer: what its pattern [head, q, k] is recomputed from
    logits: torch.Tensor  # [vocab] at the last position
    norm_scales: list[torch.Tensor]  # per frozen norm (`FrozenNorms.modules` order) [pos, 1]: 1 / rms of its input


def _one_layer(d: Dictionary, x: torch.Tensor) -> torch.Tensor:
    """Shape `[..., d]` into a one-layer dictionary's `[..., 1, d]` (never ambiguous, also for one position)."""
    return x.unsqueeze(-2)


def encode(d: Dictionary, x: torch.Tensor) -> torch.Tensor:
    """Feature activations in the dictionary's precision (float32 also for a bf16 model)."""
    return d.encode(_one_layer(d, x.to(d.b_enc.dtype))).squeeze(-2)


def decode(d: Dictionary, f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return d.decode(_one_layer(d, f.to(d.b_enc.dtype)), _one_layer(d, x.to(d.b_enc.dtype))).squeeze(-2)


class ReplacementModel:
    """A model and one transcoder per layer (`layers.L.mlp.in` -> `layers.L.mlp.out`, as trained by
    `modelrecon train --kind transcoder|skip-transcoder --site 'layers.*.mlp'`)."""

    def __init__(self, model: Model, transcoders: list[Dictionary]) -> None:
        self.model = model
        self.norms = _norms_to_freeze(model)
        self.clt: Dictionary | None = None
        self.transcoders: list[Dictionary] = []
        # raw activations in and out, on the model's device, in float32 whatever the model's dtype (exact edges)
        folded = [d.fold_normalisation().to(device=model.device, dtype=torch.float32) for d in transcoders]
        if len(folded) == 1 and folded[0].config.kind == "clt":
            self.clt = folded[0]
            expected = tuple(site_name("mlp.in", i) for i in range(model.n_layers))
            if self.clt.config.input_sites != expected:
                raise BadInputError("a cross-layer transcoder for the replacement model reads every layer's mlp.in; "
                                    "train it with --kind clt --site 'layers.*.mlp'")  # fmt: skip
        else:
            self.transcoders = self._per_layer(model, folded)
        for d in folded:
            d.requires_grad_(False)

    @staticmethod
    def _per_layer(model: Model, transcoders: list[Dictionary]) -> list[Dictionary]:
        by_layer = {}
        for d in transcoders:
            if d.config.kind not in ("transcoder", "skip-transcoder") or d.config.n_layers != 1:
                raise BadInputError(
                    f"a replacement model takes per-layer transcoders or one cross-layer transcoder, not a "
                    f"{d.config.kind} among others"
                )
            layer = int(d.config.input_sites[0].split(".")[1])
            if d.config.input_sites[0] != site_name("mlp.in", layer) or d.config.output_sites[0] != site_name(
                "mlp.out", layer
            ):
                raise BadInputError(f"transcoder {d.config.input_sites[0]} -> {d.config.output_sites[0]} does not "
                                    f"replace an MLP: train it with --site 'layers.*.mlp'")  # fmt: skip
            by_layer[layer] = d
        missing = [layer for layer in range(model.n_layers) if layer not in by_layer]
        if missing:
            raise BadInputError(f"no transcoder for layer(s) {missing}; the replacement model needs one per layer")
        return [by_layer[layer] for layer in range(model.n_layers)]

    @property
    def dictionaries(self) -> list[Dictionary]:
        return [self.clt] if self.clt is not None else self.transcoders

    def encoder_vector(self, layer: int, feature: int | torch.Tensor) -> torch.Tensor:
        """The encoder direction of a feature: its pre-activation is `mlp_in(layer) . this` (+ a bias). A tensor of
        features gives their directions as columns `[d, n]`."""
        if self.clt is not None:
            return self.clt.W_enc[layer][:, feature]
        return self.transcoders[layer].W_enc[0][:, feature]

    def encode_layer(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """A layer's feature activations from its MLP input `[..., pos, d]`."""
        if self.clt is None:
            return encode(self.transcoders[layer], x)
        c = self.clt  # the dictionary's own activation, on this layer's slot (the other slots stay 0)
        pre = torch.zeros(*x.shape[:-1], c.config.n_layers, c.config.width, dtype=c.b_enc.dtype, device=x.device)
        pre[..., layer, :] = x.to(c.b_enc.dtype) @ c.W_enc[layer] + c.b_enc[layer]
        return c.activate(pre)[..., layer, :]

    def decode_layer(self, layer: int, features: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """What the dictionaries write to layer `layer`'s MLP output, from the features of layers <= `layer`."""
        if self.clt is not None:
            c = self.clt
            return c.b_dec[layer] + sum(features[i].to(c.b_dec.dtype) @ c.W_dec[i][:, layer - i]
                                        for i in range(layer + 1))  # fmt: skip
        return decode(self.transcoders[layer], features[layer], x)

    @property
    def n_layers(self) -> int:
        return self.model.n_layers

    @torch.no_grad()
    def clean(self, ids: list[int]) -> CleanRun:
        from modelrecon.hooks.run import run

        n, model = self.n_layers, self.model
        sites = ["layers.0.resid_pre"] + [site_name(k, i) for i in range(n) for k in ("mlp.in", "mlp.out")]
        scales: dict[int, torch.Tensor] = {}
        attention: dict[int, FrozenAttention] = {}
        with ExitStack() as stack:
            for i, module in enumerate(self.norms.modules):
                stack.enter_context(_frozen_scale(module, record=(scales, i)))
            modules = {model.layer_module(i, model.adapter.attn): i for i in range(n)}
            stack.enter_context(attention_inputs(model.hf.config._attn_implementation, modules, attention))
            result = run(model, model.batch_from_ids([ids]), record=sites)
        acts = {s: v[0] for s, v in result.acts.items()}
        mlp_in = [acts[site_name("mlp.in", i)] for i in range(n)]
        features = [self.encode_layer(i, x) for i, x in enumerate(mlp_in)]
        errors = [acts[site_name("mlp.out", i)] - self.decode_layer(i, features, mlp_in[i]) for i in range(n)]
        patterns = [attention[i] for i in range(n)]
        return CleanRun(ids, acts["layers.0.resid_pre"], mlp_in, features, errors, patterns, result.logits[0][-1],
                        [scales[i] for i in range(len(self.norms.modules))])  # fmt: skip

    @contextmanager
    def linearised(self, clean: CleanRun, rows: int, features: list[torch.Tensor] | None = None,
                   live: bool = False, live_features: bool | None = None) -> Iterator[dict]:  # fmt: skip
        """Hooks for a forward pass of `rows` copies of the clean prompt through the replacement model.

        Yields the leaves (`embed` [rows, pos, d], per layer `features` [rows, pos, width] and `errors` [rows, pos,
        d], all requiring grad) and, once the forward has run, each layer's `mlp_in` as the pass computed it.
        `features`: values to use instead of the clean activations (per layer `[rows, pos, width]`).
        `live`: attention patterns and norms are not frozen and features downstream of a change are recomputed by
        their encoders (total effects); otherwise everything is frozen (direct effects). `live_features` (default:
        `live`) sets the second part alone: with `live=False, live_features=True` attention and norms stay frozen
        while later features respond, the linear world in which the graph's paths compose.
        """
        model, n = self.model, self.n_layers
        live_features = live if live_features is None else live_features
        batch = model.batch_from_ids([clean.ids] * rows)
        values = features if features is not None else [f.expand(rows, -1, -1) for f in clean.features]
        leaves = {
            "embed": clean.embed.expand(rows, -1, -1).clone().requires_grad_(True),
            "features": [f.clone().requires_grad_(True) for f in values],
            "errors": [e.expand(rows, -1, -1).clone().requires_grad_(True) for e in clean.errors],
            "mlp_in": [None] * n,
            "current": [None] * n,
        }
        edit = {"layers.0.resid_pre": lambda value, ctx: leaves["embed"].to(value)}
        if not live:
            for layer in range(n):
                frozen = clean.patterns[layer]  # one layer's [heads, pos, pos] at a time, recomputed
                edit[site_name("attn.pattern", layer)] = lambda value, ctx, p=frozen: p.pattern()[None].to(value)
        with ExitStack() as stack:
            if not live:
                for module, scale in zip(self.norms.modules, clean.norm_scales, strict=True):
                    stack.enter_context(_frozen_scale(module, scale))
            for layer in range(n):
                stack.enter_context(_replaced_mlp(model, self, leaves, layer, live_features, clean))
            stack.enter_context(hooked(model, batch, edit=edit))
            yield leaves

    def target_logits(self, batch) -> torch.Tensor:
        """Last-position logits `[rows, vocab]` before any final soft-capping (Gemma 2): what a graph's logit nodes
        stand for, linear in the residual stream once the final norm is frozen."""
        final = self.model.forward(batch, logits=False)[:, -1]
        head = self.model.hf.get_output_embeddings()
        return torch.nn.functional.linear(final.float(), head.weight.float(),
                                          None if head.bias is None else head.bias.float())  # fmt: skip

    def forward(self, clean: CleanRun, rows: int = 1, features=None, live: bool = False,
                live_features: bool | None = None) -> torch.Tensor:  # fmt: skip
        """Last-position logits `[rows, vocab]` of the replacement model (optionally with other feature values)."""
        with torch.no_grad(), self.linearised(clean, rows, features, live, live_features=live_features):
            return self.model.forward(self.model.batch_from_ids([clean.ids] * rows), last_only=True)[:, -1]


@dataclass(frozen=True)
class FrozenNorms:
    """The norms the replacement model freezes, and where each sits in `modules` (and `CleanRun.norm_scales`):
    per layer the attention's and the MLP's input norms and, where the family has one (Gemma 2/3), the norm on
    attention's output; then the final norm. A norm on the MLP's output needs no freezing: the replacement
    replaces what it returns."""

    modules: list[torch.nn.Module]
    attn: list[int]
    mlp: list[int]
    attn_out: list[int | None]
    final: int


def _norms_to_freeze(model: Model) -> FrozenNorms:
    adapter, modules = model.adapter, []
    attn, mlp, attn_out = [], [], []

    def add(module: torch.nn.Module) -> int:
        if not is_norm(module):
            raise BadInputError(
                f"the replacement model freezes RMS and layer norms; {type(module).__name__} is neither"
            )
        modules.append(module)
        return len(modules) - 1

    for layer in range(model.n_layers):
        attn.append(add(model.layer_module(layer, adapter.attn_norm)))
        mlp.append(add(model.layer_module(layer, adapter.mlp_norm)))
        out = model.layer_module(layer, adapter.attn_out)
        attn_out.append(add(out) if adapter.attn_out != adapter.attn and is_norm(out) else None)
    return FrozenNorms(modules, attn, mlp, attn_out, add(model.module(adapter.final_norm)))


@contextmanager
def _frozen_scale(module: torch.nn.Module, scale: torch.Tensor | None = None, record: tuple | None = None):
    """A norm made linear: its scale 1/rms(x) (1/std for a layer norm) fixed at `scale` (the clean run's, `[pos,
    1]`). With `record` = (dict, key), the norm runs as usual and its scale is stored there (how the clean run
    collects them)."""
    parts = norm(module)

    def hook(mod, args, output):
        x = args[0]
        if record is not None:
            record[0][record[1]] = parts.scale(x)[0].detach()
            return None
        return parts.frozen(x, scale).to(output.dtype)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _replaced_mlp(model: Model, rm: ReplacementModel, leaves: dict, layer: int, live: bool, clean: CleanRun):
    """What the MLP adds to the residual stream replaced by the dictionaries' write from the features so far plus
    its frozen error (a skip transcoder's skip path live): the MLP's input is read where it enters the MLP, the
    replacement returned where its output joins the residual (after Gemma's post-MLP norm, Phi-3's and GPT-NeoX's
    dropout). `leaves["current"]` holds the features each layer used in this pass."""

    def read_input(mod, args):
        leaves["mlp_in"][layer] = args[0]

    def replace_output(mod, args, output):
        x = leaves["mlp_in"][layer]
        f = leaves["features"][layer]
        if live:  # features recomputed from this pass's input, except where a value was set
            changed = f.detach() != clean.features[layer][None]
            f = torch.where(changed, f, rm.encode_layer(layer, x))
        leaves["current"][layer] = f
        return (rm.decode_layer(layer, leaves["current"], x) + leaves["errors"][layer]).to(output.dtype)

    handles = [model.layer_module(layer, model.adapter.mlp).register_forward_pre_hook(read_input),
               model.layer_module(layer, model.adapter.mlp_out).register_forward_hook(replace_output)]  # fmt: skip
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# --- feature interventions ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureChange:
    """Set a feature's activation (`value`; 0 ablates it) or scale it (`scale`) at one position."""

    layer: int
    position: int
    feature: int
    value: float | None = None
    scale: float | None = None

    def apply(self, current: float) -> float:
        if (self.value is None) == (self.scale is None):
            raise BadInputError("a feature change sets a value or a scale (exactly one of them)")
        return self.value if self.value is not None else current * self.scale


def intervene(rm: ReplacementModel, clean: CleanRun, changes: list[FeatureChange], direct: bool = False):
    """Last-position logits `[vocab]` with features changed. `direct`: attention patterns, norm scales and every
    other feature stay at their clean values (direct effects, what the graph's edges are); otherwise the model runs
    live and later features are recomputed by their encoders (total effects)."""
    features = [f.clone()[None] for f in clean.features]
    for change in changes:
        if not (0 <= change.layer < rm.n_layers and 0 <= change.position < len(clean.ids)):
            raise BadInputError(f"no layer {change.layer} / position {change.position} in this model and prompt")
        row = features[change.layer][0, change.position]
        row[change.feature] = change.apply(float(row[change.feature]))
    return rm.forward(clean, features=features, live=not direct)[0]


def generate_with_features(rm: ReplacementModel, ids: list[int], changes: list[FeatureChange],
                           max_new_tokens: int = 8) -> list[int]:  # fmt: skip
    """Greedy continuation with the changes held at their prompt positions (total effects): each step re-runs the
    grown sequence, its own clean run giving the error terms of the new positions."""
    out = list(ids)
    for _ in range(max_new_tokens):
        logits = intervene(rm, rm.clean(out), changes)
        out.append(int(logits.argmax()))
    return out[len(ids) :]
