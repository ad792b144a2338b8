"""The numbers a cube view shows (the viewer's heatmap, `modelrecon.web`): a summary statistic per token and layer."""

from __future__ import annotations

import numpy as np

from modelrecon.cube.reader import Cube


def view_data(cube: Cube, prompt: int, kind: str, metric: str = "norm") -> dict:
    """The numbers the view shows: values[token][layer] of one summary statistic."""
    values = cube.summaries(kind, metric, prompt=prompt)
    layers = [kind if layer is None else f"L{layer}" for layer in cube.layers(kind)]
    return {
        "metric": metric,
        "kind": kind,
        "prompt": prompt,
        "tokens": cube.str_tokens(prompt),
        "layers": layers,
        "values": [[None if np.isnan(v) else float(v) for v in row] for row in values],
    }
