"""Gradient attributions at any site (or the input embeddings, site `embed`): gradient x activation and integrated
gradients, for a logit or logit difference at the last position.

Integrated gradients interpolate the site's value from a baseline (zeros, a mean activation e.g. from a cube, or the
same site on a counterfactual prompt) to the actual value, in batches of steps (memory bounded by `batch_size`), and
report the completeness error: how far the attributions' sum is from the metric's actual change. Add steps until it
is small.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch

from modelrecon.cube.reader import Cube
from modelrecon.errors import BadInputError
from modelrecon.hooks.run import run
from modelrecon.models.model import Model, single_token
from modelrecon.models.sites import parse_site


@dataclass
class GradientAttribution:
    method: str  # "grad-x-act" or "ig"
    site: str
    target: str
    tokens: list[str]
    per_unit: torch.Tensor = field(repr=False)  # the attribution per element of the site, `[pos, ...]`
    completeness: dict | None = None  # ig: {"sum", "delta", "error", "relative_error", "steps"}

    @property
    def per_position(self) -> torch.Tensor:
        """Summed over everything but the position (`[pos]`)."""
        return self.per_unit.flatten(1).sum(1)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "site": self.site,
            "target": self.target,
            "tokens": self.tokens,
            "per_position": self.per_position.tolist(),
            "completeness": self.completeness,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def target_fn(model: Model, answer: str, wrong: str | None = None):
    """(label, fn(last-position logits [..., vocab]) -> scalar(s)) for logit[answer] (- logit[wrong])."""
    a = single_token(model, answer)
    if wrong is None:
        return f"logit[{answer!r}]", lambda logits: logits[..., a]
    b = single_token(model, wrong)
    return f"logit[{answer!r}] - logit[{wrong!r}]", lambda logits: logits[..., a] - logits[..., b]


def _check_site(model: Model, site: str) -> str:
    names = model.resolve_sites(site)
    if len(names) != 1:
        raise BadInputError(f"give one site, not the pattern '{site}' ({len(names)} sites)")
    name = names[0]
    if name == "logits":
        raise BadInputError("'logits' is what the attribution explains, not a differentiable input to it; "
                            "choose an inner site or 'embed'")  # fmt: skip
    if parse_site(name).kind == "attn.pattern":
        raise BadInputError(f"'{name}': attribute to attention patterns through attn.heads or attn.q/k/v instead")
    return name


def grad_x_act(model: Model, prompt: str, site: str, answer: str, wrong: str | None = None) -> GradientAttribution:
    """Gradient of the target times the activation, per element of the site (one forward and one backward)."""
    site = _check_site(model, site)
    label, fn = target_fn(model, answer, wrong)
    result = run(model, prompt, record=[site], grad=[site], grad_of=lambda logits: fn(logits[0][-1]))
    per_unit = result.acts[site][0] * result.grads[site][0]
    return GradientAttribution("grad-x-act", site, label, result.str_tokens(0), per_unit)


def site_values(model: Model, prompt: str, site: str) -> torch.Tensor:
    return run(model, prompt, record=[site]).acts[site][0]


def integrated_gradients(
    model: Model,
    prompt: str,
    site: str,
    answer: str,
    wrong: str | None = None,
    *,
    baseline: str | torch.Tensor | None = None,
    steps: int = 32,
    batch_size: int = 8,
) -> GradientAttribution:
    """Integrated gradients of the target with respect to the site, from `baseline` to the prompt's value.

    baseline: None (zeros), a tensor broadcastable to the site's `[pos, ...]` (e.g. a mean activation over units), a
    `Cube` holding the site (its mean over all captured tokens), or a counterfactual prompt of the same length (its
    value at the site). The midpoint rule over `steps` is used.
    """
    if steps < 1 or batch_size < 1:
        raise BadInputError(f"steps and batch_size must be at least 1, not {steps} and {batch_size}")
    site = _check_site(model, site)
    label, fn = target_fn(model, answer, wrong)
    ids = model.encode(prompt)
    actual = site_values(model, prompt, site)
    base = _baseline(model, baseline, actual, site, len(ids))
    alphas = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
    total_grad = torch.zeros_like(actual, dtype=torch.float64)
    for start in range(0, steps, batch_size):
        chunk = alphas[start : start + batch_size]
        batch = model.batch_from_ids([ids] * len(chunk))
        points = base[None] + chunk.to(actual.dtype).view(-1, *[1] * actual.dim()) * (actual - base)[None]

        def interpolate(value, ctx, points=points):
            return points.to(value.device, value.dtype)

        def summed(logits):
            return fn(torch.stack(logits)[:, -1]).sum()

        result = run(model, batch, edit={site: interpolate}, grad=[site], grad_of=summed)
        total_grad += torch.stack(result.grads[site]).double().sum(0)
    per_unit = ((actual - base).double() * total_grad / steps).to(actual.dtype)
    end = float(fn(run(model, prompt).logits[0][-1]))
    start_value = float(fn(run(model, prompt, edit={site: lambda v, ctx: base[None].to(v)}).logits[0][-1]))
    delta, total = end - start_value, float(per_unit.double().sum())
    completeness = {
        "sum": total,
        "delta": delta,
        "error": total - delta,
        "relative_error": abs(total - delta) / abs(delta) if delta else float("inf"),
        "steps": steps,
    }
    return GradientAttribution("ig", site, label, model.str_tokens(ids), per_unit, completeness)


def _baseline(model: Model, baseline, actual: torch.Tensor, site: str, n_tokens: int) -> torch.Tensor:
    if baseline is None:
        return torch.zeros_like(actual)
    if isinstance(baseline, Cube):
        info = parse_site(site)
        if info.kind not in baseline.site_kinds or info.layer not in baseline.layers(info.kind):
            raise BadInputError(f"the cube has no '{site}' to average; capture that site or choose another baseline")
        mean = np.asarray(baseline.get(info.kind, layers=[info.layer]), dtype=np.float64)[:, 0].mean(0)
        return torch.as_tensor(mean, dtype=actual.dtype).expand_as(actual).clone()
    if isinstance(baseline, str):
        other = site_values(model, baseline, site)
        if other.shape != actual.shape:
            raise BadInputError(
                f"baseline prompt {baseline!r} has {len(other)} tokens, the prompt {n_tokens}; give one of equal length"
            )
        return other
    base = torch.as_tensor(baseline, dtype=actual.dtype)
    try:
        return torch.broadcast_to(base, actual.shape).clone()
    except RuntimeError:
        raise BadInputError(
            f"baseline of shape {tuple(base.shape)} does not fit the site's {tuple(actual.shape)}; "
            "give one value per unit or per element"
        ) from None
