"""Opening a cube: metadata, token table, activations sliced by site kind, prompt, layers and units, summaries."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from modelrecon import storage
from modelrecon.cube import layout
from modelrecon.errors import CubeError


def read_attrs(path: str | Path) -> dict:
    """The cube's metadata document, with a one-line CubeError when the store is missing, corrupt or not a cube.

    `path` is a folder or an fsspec URL (storage.py)."""
    path = storage.location(path)
    if not storage.exists(path):
        raise CubeError(f"no cube at '{path}'; give the folder a capture wrote (e.g. out.zarr)")
    try:
        meta = json.loads(storage.read_bytes(storage.join(path, "zarr.json")).decode("utf-8"))
        attrs = meta.get("attributes", {}).get(layout.ATTRS_KEY)
    except (OSError, ValueError, AttributeError):
        raise CubeError(f"'{path}' is not a readable Zarr store (missing or corrupt zarr.json)") from None
    if not isinstance(attrs, dict) or attrs.get("schema") != layout.SCHEMA:
        raise CubeError(f"'{path}' is a Zarr store but not a modelrecon cube (no '{layout.ATTRS_KEY}' metadata)")
    version = attrs.get("schema_version")
    if not isinstance(version, int) or version > layout.SCHEMA_VERSION or version < 1:
        raise CubeError(
            f"'{path}' has cube schema version {version!r}; this modelrecon reads versions 1 to "
            f"{layout.SCHEMA_VERSION}: upgrade modelrecon"
        )
    return attrs


@dataclass
class Example:
    """One high activation: where it is and its context."""

    value: float
    prompt: int
    position: int
    token: str
    context: str  # the window of tokens around it, the token itself marked with [[ ]]


class Cube:
    """An activation cube on disk. Opening reads only metadata; arrays are read on demand, chunk by chunk."""

    def __init__(self, path: str | Path, allow_partial: bool = False) -> None:
        self.path = storage.location(path)  # a Path, or a URL string
        self.metadata = read_attrs(self.path)
        self.complete = self.metadata["status"] == layout.STATUS_COMPLETE
        capture = self.metadata["capture"]
        written = self.metadata["progress"]["tokens_written"]
        if not self.complete and not allow_partial:
            raise CubeError(
                f"cube '{self.path}' is not finished ({written} of {capture['n_tokens']} tokens written); "
                "re-run the capture command to resume it, or open it with allow_partial=True"
            )
        try:
            self._group = zarr.open_group(storage.zarr_store(self.path, read_only=True), mode="r")
            self._token_offsets = self._group["prompts/token_offsets"][:]
        except Exception as exc:  # zarr raises several kinds for a damaged store
            raise CubeError(f"cube '{self.path}' is damaged ({type(exc).__name__}); capture it again") from None
        self.tokens_written = int(written)

    # --- what is in it -------------------------------------------------------------------------------------------
    @property
    def site_kinds(self) -> list[str]:
        return list(self.metadata["sites"])

    def layers(self, kind: str) -> list[int | None]:
        self._check_kind(kind)
        return list(self.metadata["sites"][kind]["layers"])

    @property
    def n_tokens(self) -> int:
        return int(self._token_offsets[-1])

    @property
    def n_prompts(self) -> int:
        return len(self._token_offsets) - 1

    @property
    def has_attention(self) -> bool:
        return bool(self.metadata["capture"].get("attention"))

    def prompt_tokens(self, prompt: int) -> slice:
        if not 0 <= prompt < self.n_prompts:
            raise CubeError(f"prompt {prompt} is not in this cube; it has prompts 0..{self.n_prompts - 1}")
        return slice(int(self._token_offsets[prompt]), int(self._token_offsets[prompt + 1]))

    def prompt_text(self, prompt: int) -> str:
        self.prompt_tokens(prompt)
        offsets = self._group["prompts/text_offsets"][prompt : prompt + 2]
        return layout.decode_strings(self._group["prompts/text_bytes"][offsets[0] : offsets[1]], offsets)[0]

    def str_tokens(self, prompt: int | None = None) -> list[str]:
        rows = self.prompt_tokens(prompt) if prompt is not None else slice(0, self.n_tokens)
        offsets = self._group["tokens/text_offsets"][rows.start : rows.stop + 1]
        return layout.decode_strings(self._group["tokens/text_bytes"][offsets[0] : offsets[-1]], offsets)

    def token_ids(self, prompt: int | None = None) -> np.ndarray:
        rows = self.prompt_tokens(prompt) if prompt is not None else slice(0, self.n_tokens)
        return self._group["tokens/token_id"][rows]

    def token_table(self) -> dict[str, np.ndarray | list[str]]:
        """prompt_index, position, token_id (numpy) and text (list of str), one entry per token."""
        return {name: self._group[f"tokens/{name}"][:] for name in ("prompt_index", "position", "token_id")} | {
            "text": self.str_tokens()
        }

    # --- values --------------------------------------------------------------------------------------------------
    def _check_kind(self, kind: str) -> None:
        if kind not in self.metadata["sites"]:
            raise CubeError(f"site kind '{kind}' was not captured in this cube; it has: {', '.join(self.site_kinds)}")

    def _layer_axis(self, kind: str, layers: int | Sequence[int] | None) -> list[int] | slice:
        if layers is None:
            return slice(None)
        captured = self.layers(kind)
        chosen = [layers] if isinstance(layers, int) else list(layers)
        missing = [layer for layer in chosen if layer not in captured]
        if missing:
            raise CubeError(f"layer(s) {missing} of '{kind}' are not in this cube; captured layers: {captured}")
        return [captured.index(layer) for layer in chosen]

    def _rows(self, prompt: int | None, tokens: slice | None = None) -> slice:
        if tokens is not None:
            rows = slice(*tokens.indices(self.n_tokens)[:2])
        else:
            rows = self.prompt_tokens(prompt) if prompt is not None else slice(0, self.n_tokens)
        if rows.stop > self.tokens_written:
            raise CubeError(f"tokens {self.tokens_written}..{rows.stop - 1} of this partial cube are not written yet")
        return rows

    def get(self, kind: str, prompt: int | None = None, layers=None, units=None, as_torch: bool = False,
            tokens: slice | None = None):  # fmt: skip
        """Activations `[tokens, layers, units]` of one site kind; reads only the chunks it needs.

        prompt: one prompt's tokens (default all); tokens: a range of token rows across prompts (instead of prompt);
        layers: model layer index or list (default all captured); units: index, list or slice of units (default all).
        """
        self._check_kind(kind)
        if self.metadata["sites"][kind].get("summaries_only"):
            raise CubeError(f"site kind '{kind}' holds only summaries (imported), no activations")
        values = self._group[f"sites/{kind}"]
        rows, layer_axis = self._rows(prompt, tokens), self._layer_axis(kind, layers)
        unit_axis = slice(None) if units is None else ([units] if isinstance(units, int) else units)
        if isinstance(layer_axis, list) and not isinstance(unit_axis, slice):  # zarr takes one list axis at a time
            data = np.stack([values[rows, [layer], :][:, 0] for layer in layer_axis], axis=1)[:, :, unit_axis]
        else:
            data = values.get_orthogonal_selection((rows, layer_axis, unit_axis))
        if as_torch:
            import torch

            return torch.from_numpy(np.ascontiguousarray(data))
        return data

    def summaries(self, kind: str, stat: str | None = None, prompt: int | None = None) -> np.ndarray:
        """Per-(token, layer) statistics: `[tokens, layers, 5]` in `layout.STATS` order, or `[tokens, layers]`."""
        self._check_kind(kind)
        data = self._group[f"summaries/{kind}"][self._rows(prompt)]
        if stat is None:
            return data
        if stat not in layout.STATS:
            raise CubeError(f"unknown summary '{stat}'; choose one of {', '.join(layout.STATS)}")
        return data[..., layout.STATS.index(stat)]

    def attention(self, prompt: int, layer: int | None = None) -> np.ndarray:
        """Attention probabilities of one prompt: `[layers, head, q, k]`, or `[head, q, k]` for one layer."""
        self.prompt_tokens(prompt)
        if not self.has_attention:
            raise CubeError("this cube has no attention patterns; capture with --attention")
        patterns = self._group[f"attention/prompt_{prompt}"]
        if layer is None:
            return patterns[:]
        captured = self.metadata["capture"]["attention_layers"]
        if layer not in captured:
            raise CubeError(f"attention of layer {layer} is not in this cube; captured layers: {captured}")
        return patterns[captured.index(layer)]

    def to_xarray(self, kind: str, prompt: int | None = None):
        """A labelled `xarray.DataArray` with dims (token, layer, unit) and per-token coordinates."""
        import xarray as xr

        rows = self._rows(prompt)
        table = {name: self._group[f"tokens/{name}"][rows] for name in ("prompt_index", "position", "token_id")}
        layers = [-1 if layer is None else layer for layer in self.layers(kind)]
        return xr.DataArray(
            self.get(kind, prompt),
            dims=("token", "layer", "unit"),
            coords={
                **{k: ("token", v) for k, v in table.items()},
                "text": ("token", self.str_tokens(prompt)),
                "layer": layers,
            },
            name=kind,
            attrs={"model": self.metadata["model"]["name"], "dtype": self.metadata["dtype"]},
        )

    def top_examples(self, kind: str, layer: int | None, unit: int, k: int = 10, window: int = 8) -> list[Example]:
        """The k highest activations of one unit, with `window` tokens of context on each side (same prompt)."""
        column = self.get(kind, layers=[layer] if layer is not None else None, units=[unit])[:, 0, 0].astype(np.float32)
        k = min(k, len(column))
        best = np.argpartition(-column, k - 1)[:k] if k else np.array([], dtype=int)
        best = best[np.argsort(-column[best], kind="stable")]
        prompt_index = self._group["tokens/prompt_index"][:]
        examples = []
        for token in best:
            prompt = int(prompt_index[token])
            rows = self.prompt_tokens(prompt)
            texts = self.str_tokens(prompt)
            position = int(token) - rows.start
            lo, hi = max(0, position - window), min(len(texts), position + window + 1)
            context = "".join(texts[lo:position]) + "[[" + texts[position] + "]]" + "".join(texts[position + 1 : hi])
            examples.append(Example(float(column[token]), prompt, position, texts[position], context))
        return examples

    # --- display -------------------------------------------------------------------------------------------------
    def size_on_disk(self) -> int:
        if storage.is_url(self.path):
            fs, root = storage.filesystem(self.path)
            return int(fs.du(root))
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    def describe(self) -> dict:
        meta = self.metadata
        return {
            "path": str(self.path),
            "status": meta["status"],
            "model": meta["model"]["name"],
            "weights_sha256": meta["model"]["weights_sha256"],
            "prompts": self.n_prompts,
            "tokens": self.n_tokens,
            "dtype": meta["dtype"],
            "sites": {
                kind: list(self._group[f"{self._values_or_summaries(kind)}/{kind}"].shape) for kind in self.site_kinds
            },
            "attention": self.has_attention,
            "bytes_on_disk": self.size_on_disk(),
            "created": meta["created"],
            "versions": meta["versions"],
        }

    def _values_or_summaries(self, kind: str) -> str:
        return "summaries" if self.metadata["sites"][kind].get("summaries_only") else "sites"

    def _repr_html_(self) -> str:
        info = self.describe()
        rows = "".join(
            f"<tr><td>{html.escape(kind)}</td><td>{' × '.join(map(str, shape))}</td>"
            f"<td>{html.escape(layer_range(self.layers(kind)))}</td></tr>"
            for kind, shape in info["sites"].items()
        )
        first = html.escape("".join(self.str_tokens(0))[:120]) if self.n_prompts else ""
        return (
            f"<div><b>modelrecon cube</b> <code>{html.escape(info['path'])}</code> ({info['status']})<br>"
            f"model <code>{html.escape(info['model'])}</code>, {info['prompts']} prompts, {info['tokens']} tokens, "
            f"{info['dtype']}, {info['bytes_on_disk'] / 1e6:.1f} MB on disk<br>"
            f"<table><tr><th>site kind</th><th>tokens × layers × units</th><th>layers</th></tr>{rows}</table>"
            f"first prompt: <code>{first}</code></div>"
        )

    def __repr__(self) -> str:
        return f"Cube({str(self.path)!r}, {self.n_prompts} prompts, {self.n_tokens} tokens, sites={self.site_kinds})"


def layer_range(layers: list[int | None]) -> str:
    if layers == [None]:
        return "-"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def open_cube(path: str | Path, allow_partial: bool = False) -> Cube:
    """Open an activation cube written by `capture`. An unfinished cube raises unless allow_partial=True."""
    return Cube(path, allow_partial=allow_partial)
