"""A model's weights read the way linear algebra needs them, whatever module holds them: `nn.Linear` or GPT-2's
`Conv1D` (stored transposed), separate or fused q/k/v projections, RMS norms (Gemma's scale by 1 + weight) or layer
norms with a bias. Analyses that freeze a norm or run the model's maps by hand (direct logit attribution, the
attribution graph's transposed pass) read them here, so each family's storage quirks live in one place."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from modelrecon.errors import BadInputError
from modelrecon.models.model import Model


def linear_weight(module: nn.Module) -> torch.Tensor:
    """A projection's weight as `[out, in]` (detached, float32)."""
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and weight is not None:
        return weight.detach().float().T
    if not isinstance(module, nn.Linear) or weight is None:
        raise BadInputError(f"expected a linear projection, found {type(module).__name__}")
    return weight.detach().float()


def value_weight(model: Model, layer: int) -> torch.Tensor:
    """The value projection of a layer, `[kv_heads * d_head, d_model]`, also out of a fused q/k/v projection."""
    adapter, d_head = model.adapter, model.d_head
    if adapter.qkv_layout == "separate":
        return linear_weight(model.layer_module(layer, adapter.qkv[2]))
    fused = linear_weight(model.layer_module(layer, adapter.qkv[0]))
    if adapter.qkv_layout == "concat":  # q | k | v
        return fused[(model.n_heads + model.n_kv_heads) * d_head :]
    # per_head (GPT-NeoX): for each head q | k | v
    return fused.view(model.n_heads, 3, d_head, -1)[:, 2].reshape(model.n_heads * d_head, -1)


def output_weight(model: Model, layer: int) -> torch.Tensor:
    """Attention's output projection, `[d_model, heads * d_head]`."""
    return linear_weight(model.layer_module(layer, model.adapter.o_proj))


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "RMSNorm" in type(module).__name__


@dataclass(frozen=True)
class Norm:
    """A norm as `gain * centre(x) * scale(x) + bias`: RMS norms do not centre and have no bias; layer norms do."""

    gain: torch.Tensor  # [d], float32
    bias: torch.Tensor | None
    eps: float
    centred: bool

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """1 / rms (or 1 / std) over the last axis, in float32 (float64 stays), `[..., 1]`."""
        return torch.rsqrt(self._centre(x).pow(2).mean(-1, keepdim=True) + self.eps)

    def frozen(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The norm with its scale held at `scale`: linear (affine) in `x`. Float32 (float64 stays)."""
        x = self._centre(x)
        y = self.gain.to(x.device) * x * scale.to(x.device)
        return y if self.bias is None else y + self.bias.to(x.device)

    def _centre(self, x: torch.Tensor) -> torch.Tensor:
        """`x` widened to float32 (float64 stays) and, for a layer norm, minus its mean."""
        x = x if x.dtype == torch.float64 else x.float()
        return x - x.mean(-1, keepdim=True) if self.centred else x

    def transposed(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient at the frozen norm's input from the gradient at its output, before the scale: the gain, then
        the centring (a symmetric projection)."""
        g = grad * self.gain.to(grad.device)
        return g - g.mean(-1, keepdim=True) if self.centred else g


def norm(module: nn.Module) -> Norm:
    """The parts of an RMS or layer norm. RMS norms differ in how they store the gain (Gemma: 1 + weight), so it is
    read off the module's own output on a unit input."""
    if not is_norm(module):
        raise BadInputError(f"expected an RMS or layer norm, found {type(module).__name__}")
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if eps is None:
        raise BadInputError(f"{type(module).__name__} names no epsilon; cannot freeze it")
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.LayerNorm):
        d = module.normalized_shape[-1]
        gain = weight.detach().float() if weight is not None else torch.ones(d)
        bias = module.bias.detach().float() if module.bias is not None else None
        return Norm(gain, bias, float(eps), True)
    d = weight.shape[-1]
    with torch.no_grad():
        ones = torch.ones(1, d, dtype=weight.dtype, device=weight.device)
        gain = module(ones)[0].float() * torch.sqrt(torch.tensor(1.0 + float(eps)))
    return Norm(gain.detach(), None, float(eps), False)
