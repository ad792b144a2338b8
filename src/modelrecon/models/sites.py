"""Site names: one scheme on every model.

`embed`, then per layer i `layers.{i}.resid_pre`, `.attn.q`, `.attn.k`, `.attn.v`, `.attn.pattern`, `.attn.heads`,
`.attn.out`, `.resid_mid`, `.mlp.in`, `.mlp.neurons`, `.mlp.out`, `.resid_post`, then `final` and `logits`.
Patterns use shell globs (`layers.*.resid_post`, `layers.1[0-2].mlp.out`).
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass

from modelrecon.errors import UnknownSiteError

LAYER_SITE_KINDS = (
    "resid_pre",
    "attn.q",
    "attn.k",
    "attn.v",
    "attn.pattern",
    "attn.heads",
    "attn.out",
    "resid_mid",
    "mlp.in",
    "mlp.neurons",
    "mlp.out",
    "resid_post",
)

SITE_DOCS = {
    "embed": "output of the token embedding module",
    "resid_pre": "residual stream entering the layer",
    "attn.q": "per-head queries (query projection output, before rotary embedding)",
    "attn.k": "per-key-value-head keys (key projection output, before rotary embedding)",
    "attn.v": "per-key-value-head values (value projection output)",
    "attn.pattern": "attention probabilities (softmax output)",
    "attn.heads": "per-head attention outputs before the output projection",
    "attn.out": "what attention adds to the residual stream",
    "resid_mid": "residual stream between attention and MLP",
    "mlp.in": "normalised input of the MLP",
    "mlp.neurons": "MLP hidden activations (input of the down projection)",
    "mlp.out": "what the MLP adds to the residual stream",
    "resid_post": "residual stream leaving the layer",
    "final": "residual stream after the final norm",
    "logits": "next-token logits (the model's output)",
}


@dataclass(frozen=True)
class Site:
    """A parsed site name. `layer` is None for the global sites (embed, final, logits)."""

    name: str
    kind: str
    layer: int | None


def parse_site(name: str) -> Site:
    if name in ("embed", "final", "logits"):
        return Site(name, name, None)
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and parts[2] in LAYER_SITE_KINDS:
        return Site(name, parts[2], int(parts[1]))
    raise UnknownSiteError(f"'{name}' is not a site name; sites look like 'layers.3.resid_post' or 'logits'")


def site_name(kind: str, layer: int | None) -> str:
    """Inverse of parse_site: ('mlp.out', 3) -> 'layers.3.mlp.out'; ('final', None) -> 'final'."""
    return kind if layer is None else f"layers.{layer}.{kind}"


def all_site_names(n_layers: int, has_resid_mid: bool = True) -> list[str]:
    kinds = [k for k in LAYER_SITE_KINDS if has_resid_mid or k != "resid_mid"]
    return ["embed", *(f"layers.{i}.{k}" for i in range(n_layers) for k in kinds), "final", "logits"]


def resolve_sites(patterns: str | list[str] | tuple[str, ...], valid: list[str]) -> list[str]:
    """Expand names and glob patterns to site names in model order. Unknown ones raise with the nearest names."""
    if isinstance(patterns, str):
        patterns = [patterns]
    chosen: set[str] = set()
    for pattern in patterns:
        matched = (
            fnmatch.filter(valid, pattern) if any(c in pattern for c in "*?[") else [p for p in valid if p == pattern]
        )
        if not matched:
            near = difflib.get_close_matches(pattern, valid, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(near)}?" if near else "; `modelrecon sites --model M` lists them"
            raise UnknownSiteError(f"unknown site '{pattern}'{hint}")
        chosen.update(matched)
    return [name for name in valid if name in chosen]
