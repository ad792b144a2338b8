"""Export a cube to flat files (npz, safetensors) and exchange with the seed prototype's "ActivityCube" JSON.

Every writer writes to a temporary file beside the target and renames it into place: no half-written file.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import numpy as np
import zarr

from modelrecon.cube import layout
from modelrecon.cube.reader import Cube
from modelrecon.errors import BadInputError, CubeError
from modelrecon.files import atomic_folder, atomic_target
from modelrecon.models.sites import site_name


def flat_arrays(cube: Cube) -> dict[str, np.ndarray]:
    """One array per site kind `[n_tokens, n_layers, d]`, plus token_ids, prompt_index and position."""
    table = cube.token_table()
    arrays = {kind: np.ascontiguousarray(cube.get(kind)) for kind in cube.site_kinds}
    arrays.update(token_ids=table["token_id"], prompt_index=table["prompt_index"], position=table["position"])
    return arrays


def export_cube(cube: Cube, out: str | Path, fmt: str) -> Path:
    if fmt not in ("npz", "safetensors"):
        raise BadInputError(f"unknown export format {fmt!r}; use npz or safetensors")
    arrays = flat_arrays(cube)
    with atomic_target(out, "." + fmt) as temp:
        if fmt == "npz":
            with open(temp, "wb") as f:
                np.savez(f, **arrays)
        else:
            from safetensors.numpy import save_file

            meta = {
                "modelrecon_cube": json.dumps(
                    {"model": cube.metadata["model"]["name"], "layers": {k: cube.layers(k) for k in cube.site_kinds}}
                )
            }
            save_file(arrays, str(temp), metadata=meta)
    return Path(out)


# --- ActivityCube JSON (the seed prototype's format) -------------------------------------------------------------
def to_activity_cube(cube: Cube, kind: str, prompt: int = 0) -> dict:
    """One prompt's per-token norm/mean/std per layer of one site kind, in the ActivityCube JSON layout."""
    stats = cube.summaries(kind, prompt=prompt)
    tokens = cube.token_ids(prompt).tolist()
    layers = []
    for axis, layer in enumerate(cube.layers(kind)):
        name = site_name(kind, layer)
        layers.append(
            {
                "layer_index": axis,
                "layer_name": name,
                "core_metrics": {
                    "energy": stats[:, axis, layout.STATS.index("norm")].tolist(),
                    "mean_activation": stats[:, axis, layout.STATS.index("mean")].tolist(),
                    "std_activation": stats[:, axis, layout.STATS.index("std")].tolist(),
                },
            }
        )
    return {
        "meta": {
            "model_name": cube.metadata["model"]["name"],
            "timestamp": cube.metadata["created"],
            "input_shape": [1, len(tokens)],
        },
        "tokens": [str(t) for t in tokens],
        "token_texts": cube.str_tokens(prompt),
        "layers": layers,
        "provenance": {"modelrecon_cube": str(cube.path), "weights_sha256": cube.metadata["model"]["weights_sha256"]},
    }


def write_activity_cube(cube: Cube, out: str | Path, kind: str | None = None, prompt: int = 0) -> Path:
    doc = to_activity_cube(cube, kind or cube.site_kinds[0], prompt)
    with atomic_target(out, ".json") as temp:
        temp.write_text(json.dumps(doc), encoding="utf-8")
    return Path(out)


def import_activity_cube(source: str | Path, out: str | Path) -> Cube:
    """Build a summaries-only cube from an ActivityCube JSON file (its `core_metrics` become the summaries)."""
    try:
        doc = json.loads(Path(source).read_text(encoding="utf-8"))
        tokens = [int(t) for t in doc["tokens"]]
        layers = doc["layers"]
        metrics = [
            (
                layer["core_metrics"]["energy"],
                layer["core_metrics"]["mean_activation"],
                layer["core_metrics"]["std_activation"],
            )
            for layer in layers
        ]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInputError(
            f"'{source}' is not an ActivityCube JSON file ({type(exc).__name__}: {exc}); "
            "it needs tokens and layers[].core_metrics.energy/mean_activation/std_activation"
        ) from None
    n = len(tokens)
    if any(len(m) != n for triple in metrics for m in triple):
        raise BadInputError(f"'{source}': every core_metrics list must have one value per token ({n})")
    if Path(out).exists():
        raise CubeError(f"'{out}' already exists; choose another --out")
    texts = doc.get("token_texts") or [str(t) for t in tokens]
    summaries = np.full((n, len(layers), len(layout.STATS)), np.nan, dtype=np.float32)
    for axis, (energy, mean, std) in enumerate(metrics):
        summaries[:, axis, layout.STATS.index("norm")] = energy
        summaries[:, axis, layout.STATS.index("mean")] = mean
        summaries[:, axis, layout.STATS.index("std")] = std
    kind = "imported"
    meta = {
        "schema": layout.SCHEMA,
        "schema_version": layout.SCHEMA_VERSION,
        "status": layout.STATUS_COMPLETE,
        "progress": {"tokens_written": n},
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": {"name": doc.get("meta", {}).get("model_name", "unknown"), "weights_sha256": None},
        "dtype": "float32",
        "versions": {},
        "seed": None,
        "capture": {
            "n_prompts": 1,
            "n_tokens": n,
            "attention": False,
            "imported_from": str(source),
            "layer_names": [layer.get("layer_name") for layer in layers],
        },
        "sites": {kind: {"layers": list(range(len(layers))), "summaries_only": True}},
        "stats": list(layout.STATS),
    }
    with atomic_folder(out) as staging:  # a failure leaves no half-written cube
        group = zarr.open_group(staging, mode="w", zarr_format=3)
        text_bytes, text_offsets = layout.encode_strings(texts)
        prompt_bytes, prompt_offsets = layout.encode_strings(["".join(texts)])
        for name, data in {
            "tokens/token_id": np.asarray(tokens, dtype=np.int64),
            "tokens/prompt_index": np.zeros(n, dtype=np.int32),
            "tokens/position": np.arange(n, dtype=np.int32),
            "tokens/text_bytes": text_bytes,
            "tokens/text_offsets": text_offsets,
            "prompts/token_offsets": np.array([0, n], dtype=np.int64),
            "prompts/text_bytes": prompt_bytes,
            "prompts/text_offsets": prompt_offsets,
            f"summaries/{kind}": summaries,
        }.items():
            group.create_array(name, data=data, chunks=data.shape if data.ndim > 1 else (max(1, len(data)),))
        group.attrs[layout.ATTRS_KEY] = meta
    return Cube(out)
