"""Direct logit attribution: the final residual stream split into what each component wrote, read along a logit
(or logit-difference) direction through the final norm with its scale frozen at the clean value.

The residual stream at the last layer is exactly embed + sum over layers of (attention output + MLP output) (a site
identity, tested). The final norm is linear once its scale is frozen: RMS norms multiply by `scale * weight`, layer
norms also centre each component and add their bias. So the terms below (components, plus the norm's bias and the
unembedding's bias) sum to the logit (difference) the model computes before any final soft-capping.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
from torch import nn

from modelrecon.errors import BadInputError
from modelrecon.hooks.run import run
from modelrecon.models.model import Model, single_token
from modelrecon.models.weights import linear_weight, norm, output_weight


@dataclass(frozen=True)
class Term:
    name: str  # "embed", "layers.3.attn.heads[2]", "layers.3.mlp.out", "layers.3.mlp.neurons[17]", "final_norm.bias"
    site: str | None
    layer: int | None
    head: int | None
    neuron: int | None
    value: float


@dataclass
class DLAResult:
    prompt: str
    position: int
    direction: str  # "logit[' Paris']" or "logit[' Paris'] - logit[' Rome']"
    terms: list[Term]
    total: float  # the sum of the terms
    logit: float  # the model's own value (before final soft-capping)
    scale: float  # the frozen final-norm scale (1 / rms or 1 / std of the final residual)

    def grid(self, n_layers: int, n_heads: int) -> torch.Tensor:
        """Per-head terms as `[layer, head]` (NaN where a layer's attention is not split into heads)."""
        out = torch.full((n_layers, n_heads), float("nan"))
        for t in self.terms:
            if t.head is not None:
                out[t.layer, t.head] = t.value
        return out

    def to_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "terms"}, "terms": [asdict(t) for t in self.terms]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def _is_identity(module: nn.Module, attention: nn.Module) -> bool:
    """Whether what a sublayer adds to the residual is its own output (no post-norm): dropout is identity in eval."""
    return module is attention or isinstance(module, nn.Dropout)


def head_output_weights(model: Model, layer: int) -> torch.Tensor:
    """The output projection split per head: `[head, d_head, d_model]`."""
    return output_weight(model, layer).T.reshape(model.n_heads, model.d_head, -1)


def down_weights(model: Model, layer: int) -> torch.Tensor:
    """The MLP's down projection as `[d_mlp, d_model]`."""
    return linear_weight(model.layer_module(layer, model.adapter.down_proj)).T


def _frozen_norm(model: Model, final: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor | None, bool]:
    """(scale, weight, bias, centres) of the final norm at this residual vector, so norm(x) = centre(x)*scale*w + b."""
    parts = norm(model.module(model.adapter.final_norm))
    scale = float(parts.scale(final.double()))
    return scale, parts.gain.double(), None if parts.bias is None else parts.bias.double(), parts.centred


def direct_logit_attribution(
    model: Model,
    prompt: str,
    answer: str,
    wrong: str | None = None,
    *,
    position: int = -1,
    neurons: bool = False,
) -> DLAResult:
    """Split the logit of `answer` (minus that of `wrong`) at `position` into the components' direct contributions.

    Components: the embeddings, each attention head (or the whole attention output where a post-norm makes heads
    non-additive, Gemma 2/3), each attention output bias, each MLP, and with `neurons=True` each MLP neuron instead
    (where the MLP output is its down projection), plus the norm's and unembedding's biases.
    """
    unembed = model.hf.get_output_embeddings()
    ids = [single_token(model, answer)] + ([single_token(model, wrong)] if wrong is not None else [])
    direction = unembed.weight[ids[0]].double()
    label = f"logit[{answer!r}]"
    if wrong is not None:
        direction = direction - unembed.weight[ids[1]].double()
        label += f" - logit[{wrong!r}]"
    sites = ["layers.0.resid_pre", f"layers.{model.n_layers - 1}.resid_post"]
    for layer in range(model.n_layers):
        sites += [f"layers.{layer}.attn.heads", f"layers.{layer}.attn.out", f"layers.{layer}.mlp.out"]
        if neurons:
            sites.append(f"layers.{layer}.mlp.neurons")
    acts = run(model, prompt, record=sites).acts
    n_tokens = len(acts["layers.0.resid_pre"][0])
    if not -n_tokens <= position < n_tokens:
        raise BadInputError(f"position {position} is outside a prompt of {n_tokens} tokens")
    at = {site: values[0][position] for site, values in acts.items()}
    final = at[f"layers.{model.n_layers - 1}.resid_post"]
    scale, weight, norm_bias, centre = _frozen_norm(model, final)

    def read(vectors: torch.Tensor) -> torch.Tensor:
        """The frozen-norm reading of one vector `[d_model]` (a scalar) or of many `[n, d_model]`."""
        v = vectors.double()
        if centre:
            v = v - v.mean(-1, keepdim=True)
        return (v * scale * weight) @ direction

    terms = [Term("embed", "layers.0.resid_pre", None, None, None, float(read(at["layers.0.resid_pre"])))]
    with torch.no_grad():
        for layer in range(model.n_layers):
            terms += _attention_terms(model, layer, at, read)
            terms += _mlp_terms(model, layer, at, read, neurons)
    if norm_bias is not None:
        terms.append(Term("final_norm.bias", None, None, None, None, float(norm_bias @ direction)))
    if getattr(unembed, "bias", None) is not None:
        bias = unembed.bias.double()
        value = bias[ids[0]] - (bias[ids[1]] if wrong is not None else 0.0)
        terms.append(Term("unembed.bias", None, None, None, None, float(value)))
    with torch.no_grad():
        logits = unembed(model.module(model.adapter.final_norm)(final[None]))[0].double()
    logit = float(logits[ids[0]] - (logits[ids[1]] if wrong is not None else 0.0))
    return DLAResult(prompt, position % n_tokens, label, terms, sum(t.value for t in terms), logit, scale)


def _attention_terms(model: Model, layer: int, at: dict, read) -> list[Term]:
    attention = model.layer_module(layer, model.adapter.attn)
    site = f"layers.{layer}.attn.out"
    if not _is_identity(model.layer_module(layer, model.adapter.attn_out), attention):
        return [Term(site, site, layer, None, None, float(read(at[site])))]
    heads = at[f"layers.{layer}.attn.heads"]  # [head, d_head]
    w_o = head_output_weights(model, layer)
    values = read(torch.einsum("hd,hdm->hm", heads.double(), w_o.double())).tolist()
    terms = [
        Term(f"layers.{layer}.attn.heads[{h}]", f"layers.{layer}.attn.heads", layer, h, None, v)
        for h, v in enumerate(values)
    ]
    bias = model.layer_module(layer, model.adapter.o_proj).bias
    if bias is not None:
        terms.append(Term(f"layers.{layer}.attn.bias", None, layer, None, None, float(read(bias))))
    return terms


def _mlp_terms(model: Model, layer: int, at: dict, read, neurons: bool) -> list[Term]:
    site = f"layers.{layer}.mlp.out"
    mlp = model.layer_module(layer, model.adapter.mlp)
    if not neurons or not _is_identity(model.layer_module(layer, model.adapter.mlp_out), mlp):
        return [Term(site, site, layer, None, None, float(read(at[site])))]
    acts = at[f"layers.{layer}.mlp.neurons"]  # [d_mlp]
    w_down = down_weights(model, layer)  # [d_mlp, d_model]
    per_neuron = acts[:, None] * w_down  # [d_mlp, d_model]
    values = read(per_neuron).tolist()
    terms = [
        Term(f"layers.{layer}.mlp.neurons[{n}]", f"layers.{layer}.mlp.neurons", layer, None, n, v)
        for n, v in enumerate(values)
    ]
    bias = model.layer_module(layer, model.adapter.down_proj).bias
    if bias is not None:
        terms.append(Term(f"layers.{layer}.mlp.bias", None, layer, None, None, float(read(bias))))
    return terms
