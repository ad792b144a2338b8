"""Examples of what a feature responds to, from a cube of the model's MLP inputs: what explainers read and what
scorers test explanations on.

The cube's prompts are split in two by a seeded shuffle: explanations are written from the *train* prompts and
scored on the *test* prompts only, so no explanation is scored on the text it was written from. Per feature:

- train: its top-k activating windows and a few from each activation quantile (the whole range, not only the peak);
  token and position statistics over every train token (what the lexical explainer reads);
- test: activating windows (top and per-quantile), random windows where the feature is silent throughout, and
  *similar* silent windows: centred on a token the feature fires on elsewhere (its top train tokens), so a
  detector that only looks for those tokens is caught out.

A window is `window` tokens each side of its focus token, within its prompt, with the feature's activation on each
token.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from modelrecon.circuits.replacement import ReplacementModel
from modelrecon.cube.reader import Cube
from modelrecon.errors import BadInputError


@dataclass
class Window:
    tokens: list[str]
    acts: list[float]  # the feature's activation on each token
    focus: int  # the example's token, an index into `tokens`
    prompt: int
    position: int  # the focus token's position in its prompt

    @property
    def value(self) -> float:
        return self.acts[self.focus]

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "position": self.position, "tokens": self.tokens,
                "acts": [round(a, 4) for a in self.acts], "focus": self.focus, "value": self.value}  # fmt: skip


@dataclass
class FeatureExamples:
    layer: int
    feature: int
    frequency: float  # share of the cube's tokens it fires on
    max: float
    train: list[Window]
    test_active: list[Window]
    test_random: list[Window]
    test_similar: list[Window]
    token_stats: dict[str, list[float]] = field(default_factory=dict)  # train: text -> [fires, occurrences, act sum]
    previous_stats: dict[str, float] = field(default_factory=dict)  # train: activation summed by the previous token
    position_stats: dict[int, list[float]] = field(default_factory=dict)  # train: position -> [fires, occurrences]

    @property
    def key(self) -> str:
        return f"{self.layer}_{self.feature}"

    @property
    def train_fires(self) -> int:
        return int(sum(s[0] for s in self.token_stats.values()))


def feature_activations(rm: ReplacementModel, cube: Cube, layer: int, features: list[int]) -> np.ndarray:
    """`[cube tokens, len(features)]`: the features' activations on every token of the cube, from its mlp.in."""
    if layer not in cube.layers("mlp.in"):
        raise BadInputError(f"cube {cube.path} has no mlp.in for layer {layer}; capture every layer the features use")
    x = torch.from_numpy(cube.get("mlp.in", layers=[layer])[:, 0].astype(np.float32))
    width = rm.encoder_vector(layer, 0).shape[0]
    if x.shape[-1] != width:
        raise BadInputError(f"cube {cube.path} holds mlp.in of width {x.shape[-1]} but the dictionary reads {width}: "
                            "they come from different models; capture the cube on the dictionary's model")  # fmt: skip
    with torch.no_grad():
        return rm.encode_layer(layer, x)[:, features].numpy()


def by_layer(features: Iterable[tuple[int, int]]) -> dict[int, list[int]]:
    """`{layer: sorted distinct features}` of `(layer, feature)` pairs, layers in order."""
    grouped: dict[int, set[int]] = {}
    for layer, feature in features:
        grouped.setdefault(int(layer), set()).add(int(feature))
    return {layer: sorted(grouped[layer]) for layer in sorted(grouped)}


def split_prompts(n_prompts: int, seed: int = 0) -> tuple[set[int], set[int]]:
    """(train, test) prompt indices: a seeded half each (test gets the extra one)."""
    if n_prompts < 2:
        raise BadInputError("explaining needs a cube of at least 2 prompts (half to explain from, half to score on)")
    order = np.random.default_rng(seed).permutation(n_prompts)
    half = n_prompts // 2
    return set(order[:half].tolist()), set(order[half:].tolist())


def sample_examples(rm: ReplacementModel, cube: Cube, features: Iterable[tuple[int, int]], **options) -> dict:
    """Train and test examples of every `(layer, feature)` of the replacement model's dictionaries, from the cube's
    mlp.in activations (module docstring); `options` as `examples_from_activations`."""
    from modelrecon.explain.dashboards import check_cube

    check_cube(cube, rm.model.name)
    activations = {}
    for layer, columns in by_layer(features).items():
        activations[layer] = (columns, feature_activations(rm, cube, layer, columns))
    return examples_from_activations(cube, activations, **options)


def examples_from_activations(
    cube: Cube,
    activations: dict[int, tuple[list[int], np.ndarray]],
    *,
    k: int = 10,
    quantiles: int = 5,
    per_quantile: int = 2,
    n_test: int = 12,
    n_negative: int = 12,
    window: int = 8,
    seed: int = 0,
) -> dict[tuple[int, int], FeatureExamples]:
    """Examples of features whose activations on every cube token are given: `{layer: (features, [tokens,
    len(features)])}`. Any activations will do (a dictionary's, a neuron's, or planted ones in a test)."""
    table = cube.token_table()
    prompt_of = np.asarray(table["prompt_index"])
    texts = list(table["text"])
    position_of = np.asarray(table["position"])
    spans = [cube.prompt_tokens(p) for p in range(cube.n_prompts)]
    train_prompts, _ = split_prompts(cube.n_prompts, seed)
    is_train = np.isin(prompt_of, sorted(train_prompts))
    ids = cube.token_ids()
    generator = np.random.default_rng(seed)
    out: dict[tuple[int, int], FeatureExamples] = {}
    for layer, (columns, acts) in sorted(activations.items()):
        if acts.shape != (len(texts), len(columns)):
            raise BadInputError(f"activations of layer {layer} have shape {tuple(acts.shape)}, not "
                                f"({len(texts)} cube tokens, {len(columns)} features)")  # fmt: skip
        for column, feature in enumerate(columns):
            out[(layer, feature)] = _examples(
                layer, feature, acts[:, column], texts, ids, prompt_of, position_of, spans, is_train, generator, k,
                quantiles, per_quantile, n_test, n_negative, window,
            )  # fmt: skip
    return out


def _examples(layer, feature, a, texts, ids, prompt_of, position_of, spans, is_train, generator, k, quantiles,
              per_quantile, n_test, n_negative, window) -> FeatureExamples:  # fmt: skip
    def make(token: int) -> Window:
        prompt = int(prompt_of[token])
        span = spans[prompt]
        lo, hi = max(span.start, token - window), min(span.stop, token + window + 1)
        return Window(texts[lo:hi], [float(v) for v in a[lo:hi]], token - lo, prompt, token - span.start)

    def ranked(rows: np.ndarray, n: int) -> list[int]:
        """Top `n` of `rows` by activation, then `per_quantile` from each quantile (distinct tokens)."""
        top = rows[np.argsort(-a[rows], kind="stable")][:n]
        chosen = list(top)
        if len(rows):
            ordered = rows[np.argsort(a[rows], kind="stable")]
            for chunk in np.array_split(ordered, quantiles):
                pool = np.setdiff1d(chunk, chosen)
                if len(pool):
                    chosen += generator.choice(pool, size=min(per_quantile, len(pool)), replace=False).tolist()
        return [int(t) for t in chosen]

    firing = a > 0
    train_rows, test_rows = np.flatnonzero(firing & is_train), np.flatnonzero(firing & ~is_train)
    train = [make(t) for t in ranked(train_rows, k)]
    test_active = [make(t) for t in ranked(test_rows, max(1, n_test - quantiles * per_quantile))][:n_test]

    # silent windows of test prompts: every token of the window at zero
    silent = np.zeros(len(a), dtype=bool)
    for span in spans:
        seg = firing[span]
        if len(seg) == 0:
            continue
        counts = np.concatenate([[0], np.cumsum(seg)])
        idx = np.arange(len(seg))
        lo, hi = np.maximum(0, idx - window), np.minimum(len(seg), idx + window + 1)
        silent[span] = (counts[hi] - counts[lo]) == 0
    silent &= ~is_train
    silent_rows = np.flatnonzero(silent)
    random_rows = generator.choice(silent_rows, size=min(n_negative, len(silent_rows)), replace=False)
    test_random = [make(int(t)) for t in sorted(random_rows)]

    top_ids = {int(ids[t]) for t in train_rows[np.argsort(-a[train_rows], kind="stable")][: 3 * k]}
    similar_rows = np.flatnonzero(silent & np.isin(ids, sorted(top_ids)))
    similar_rows = np.setdiff1d(similar_rows, random_rows)
    pick = generator.choice(similar_rows, size=min(n_negative, len(similar_rows)), replace=False)
    test_similar = [make(int(t)) for t in sorted(pick)]

    # train statistics, vectorised over the train tokens: per token text, per previous token, per position
    rows = np.flatnonzero(is_train)
    fired, values = firing[rows].astype(np.float64), np.where(firing[rows], a[rows], 0.0).astype(np.float64)
    unique, first, inverse = np.unique(ids[rows], return_index=True, return_inverse=True)
    fires, seen = np.bincount(inverse, fired, len(unique)), np.bincount(inverse, minlength=len(unique))
    mass = np.bincount(inverse, values, len(unique))
    stats = {texts[rows[f]]: [float(n), float(m), float(v)]
             for f, n, m, v in zip(first, fires, seen, mass, strict=True)}  # fmt: skip
    has_previous = position_of[rows] > 0
    previous: Counter = Counter()
    for t, v in zip(rows[has_previous & (values > 0)], values[has_previous & (values > 0)], strict=True):
        previous[texts[t - 1]] += float(v)
    pos = position_of[rows]
    positions = {int(p): [float(fired[pos == p].sum()), float((pos == p).sum())] for p in np.unique(pos)}
    return FeatureExamples(layer, feature, float(firing.mean()) if len(a) else 0.0, float(a.max()) if len(a) else 0.0,
                           train, test_active, test_random, test_similar, stats, dict(previous), positions)  # fmt: skip
