"""Feature dashboards: what a transcoder feature responds to and what it writes, from a cube of the model's MLP
inputs (`modelrecon capture --sites 'layers.*.mlp.in'` on some text).

Per feature: its top-activating examples and examples from activation quantiles (each a window of tokens with every
token's activation, so a viewer can highlight them), a histogram of its non-zero activations, how often it fires,
and the tokens its decoder direction promotes and suppresses most (the direction times the unembedding, the final
norm's scale left out as Neuronpedia does). `explanation` is null until something writes one.

The file (`features.json` beside a graph) is JSON: `{"schema": "modelrecon-features", "version": 1, "model", "cube",
"features": {"LAYER_FEATURE": {...}}}`; docs/graph-format.md lists the fields.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from modelrecon import storage
from modelrecon.circuits.replacement import ReplacementModel
from modelrecon.cube.reader import Cube
from modelrecon.errors import BadInputError

SCHEMA = "modelrecon-features"
VERSION = 1


def _decoder_direction(rm: ReplacementModel, layer: int, feature: int) -> torch.Tensor:
    """What the feature writes to its own layer's MLP output (per unit of activation)."""
    if rm.clt is not None:
        return rm.clt.W_dec[layer][feature, 0] / rm.clt.output_scale[layer]
    d = rm.transcoders[layer]
    return d.W_dec[0][feature, 0] / d.output_scale[0]


def _token_values(tokenizer, top, sign: float) -> list:
    """[[token text, value], ...] of a `topk` result."""
    return [[tokenizer.decode([int(i)]), sign * float(v)] for v, i in zip(top.values, top.indices, strict=True)]


def _window(texts: list[str], acts: np.ndarray, prompt: slice, focus: int, window: int) -> dict:
    """Cube row `focus` with `window` tokens each side, within its prompt's rows `prompt`."""
    lo, hi = max(prompt.start, focus - window), min(prompt.stop, focus + window + 1)
    return {
        "position": focus - prompt.start,
        "tokens": texts[lo:hi],
        "acts": [round(float(a), 4) for a in acts[lo:hi]],
        "focus": focus - lo,
        "value": float(acts[focus]),
    }


def check_cube(cube: Cube, model_name: str) -> None:
    """A one-line error unless `cube` holds the `mlp.in` activations of `model_name`."""
    if "mlp.in" not in cube.site_kinds:
        raise BadInputError(
            f"cube {cube.path} has no mlp.in activations (it has {', '.join(cube.site_kinds)}); capture one with "
            "modelrecon capture --sites 'layers.*.mlp.in' --prompts TEXT --out CUBE"
        )
    if cube.metadata["model"]["name"] != model_name:
        raise BadInputError(f"cube {cube.path} was captured on {cube.metadata['model']['name']}, not {model_name}")


def feature_dashboards(
    rm: ReplacementModel,
    features: Iterable[tuple[int, int]],
    cube: Cube,
    *,
    k: int = 10,
    quantiles: int = 4,
    per_quantile: int = 2,
    window: int = 8,
    bins: int = 20,
    top_logits: int = 10,
    seed: int = 0,
) -> dict:
    """Dashboards of `(layer, feature)` pairs from `cube`'s `mlp.in` activations (module docstring)."""
    check_cube(cube, rm.model.name)
    from modelrecon.explain.examples import by_layer, feature_activations

    table = cube.token_table()
    prompt_of, texts = table["prompt_index"], table["text"]
    spans = [cube.prompt_tokens(p) for p in range(cube.n_prompts)]
    unembed = rm.model.hf.get_output_embeddings().weight.detach().float()
    generator = np.random.default_rng(seed)
    out: dict[str, dict] = {}
    for layer, latents in by_layer(features).items():
        acts = feature_activations(rm, cube, layer, latents)
        for column, feature in enumerate(latents):
            a = acts[:, column]

            def example(token: int, a=a) -> dict:
                prompt = int(prompt_of[token])
                return {"prompt": prompt, **_window(texts, a, spans[prompt], token, window)}

            firing = np.flatnonzero(a > 0)
            top = firing[np.argsort(-a[firing], kind="stable")][:k]
            bands = []
            if len(firing):
                ordered = firing[np.argsort(a[firing], kind="stable")]
                for q, chunk in enumerate(np.array_split(ordered, quantiles)):
                    if len(chunk):
                        pick = generator.choice(chunk, size=min(per_quantile, len(chunk)), replace=False)
                        examples = [example(int(t)) for t in sorted(pick, key=lambda t: -a[t])]
                        bands.append({"quantile": q, "low": float(a[chunk[0]]), "high": float(a[chunk[-1]]),
                                      "examples": examples})  # fmt: skip
            counts, edges = np.histogram(a[firing], bins=bins) if len(firing) else (np.zeros(0), np.zeros(0))
            with torch.no_grad():
                effect = unembed @ _decoder_direction(rm, layer, feature).float()
            up, down = effect.topk(top_logits), (-effect).topk(top_logits)

            out[f"{layer}_{feature}"] = {
                "layer": layer,
                "feature": feature,
                "frequency": float(len(firing) / max(1, len(a))),
                "max": float(a.max()) if len(a) else 0.0,
                "top_examples": [example(int(t)) for t in top],
                "quantile_examples": bands,
                "histogram": {"counts": counts.astype(int).tolist(), "edges": [float(e) for e in edges]},
                "top_logits": _token_values(rm.model.tokenizer, up, 1.0),
                "bottom_logits": _token_values(rm.model.tokenizer, down, -1.0),
                "explanation": None,
            }
    return {"schema": SCHEMA, "version": VERSION, "model": rm.model.name, "cube": str(cube.path),
            "tokens": cube.n_tokens, "features": out}  # fmt: skip


def save_dashboards(dashboards: dict, path: str | Path) -> Path | str:
    """Write features.json whole (atomically replaced; one object at an fsspec URL); returns the path."""
    path = storage.location(path)
    storage.write_bytes(path, json.dumps(dashboards, allow_nan=False).encode("utf-8"))
    return path


def graph_features(graph) -> list[tuple[int, int]]:
    """The (layer, feature) pairs of a graph's feature nodes."""
    return sorted({(n.layer, n.feature) for n in graph.nodes if n.kind == "feature"})
