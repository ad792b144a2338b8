"""Opening a cube: metadata, token table, activations sliced by site kind, prompt, layers and units, summaries."""

from __future__ import annotations

import html
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from modelrecon import storage
from modelrecon.cube import layout
from modelrecon.errors import CubeError, reason

_DAMAGED = "delete the cube and capture it again (same command)"
# Arrays whose chunks may legitimately be absent: a chunk equal to the fill value (all zeros) is not stored, and a
# single prompt or one-token prompts make these all zeros. Both are checked against the token offsets instead.
_MAY_BE_UNSTORED = ("tokens/prompt_index", "tokens/position")


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
    _check_metadata(attrs, path)
    return attrs


def _check_metadata(attrs: dict, path) -> None:
    """The fields every reader relies on, so an edited or damaged zarr.json is one CubeError, not a KeyError later."""

    def bad(what: str) -> CubeError:
        return CubeError(f"cube '{path}': its zarr.json metadata {what} (edited or damaged); {_DAMAGED}")

    for key in ("capture", "progress", "sites", "model"):
        if not isinstance(attrs.get(key), dict):
            raise bad(f"lacks the '{key}' section")
    if attrs.get("status") not in (layout.STATUS_COMPLETE, layout.STATUS_CAPTURING):
        raise bad(f"has an unknown status {attrs.get('status')!r}")
    for section, key in (("capture", "n_tokens"), ("progress", "tokens_written")):
        value = attrs[section].get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise bad(f"has no valid {section}.{key} (got {value!r})")
    if not attrs["sites"]:
        raise bad("lists no site kinds")
    for kind, site in attrs["sites"].items():
        if not isinstance(site, dict) or not isinstance(site.get("layers"), list) or not site["layers"]:
            raise bad(f"has no layer list for site kind '{kind}'")


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
        except Exception as exc:  # zarr raises several kinds for a damaged store
            raise CubeError(f"cube '{self.path}' is damaged ({reason(exc)}); {_DAMAGED}") from None
        self._stored: dict[str, set[str]] = {}  # remote cubes: the chunk keys listed once per array
        self._token_offsets = self._read("prompts/token_offsets")
        offsets = self._token_offsets
        if (
            offsets.ndim != 1
            or len(offsets) < 1
            or offsets[0] != 0
            or offsets[-1] != capture["n_tokens"]
            or (np.diff(offsets) < 0).any()
        ):
            raise CubeError(
                f"cube '{self.path}': its token table (prompts/token_offsets) does not match the {capture['n_tokens']} "
                f"tokens of its metadata; it is truncated or damaged: {_DAMAGED}"
            )
        self.tokens_written = int(written)

    # --- reading chunks: every read goes through here, so a damaged chunk is one CubeError that names it ----------
    def _read(self, name: str, selection=slice(None), orthogonal: bool = False) -> np.ndarray:
        """`array[selection]` of the array `name` (orthogonal: get_orthogonal_selection), with a one-line CubeError
        naming the chunk when one is missing or cannot be decoded (chunks are read lazily, so damage shows here)."""
        array = self._array(name)
        if name not in _MAY_BE_UNSTORED:
            self._check_stored(name, array, selection)
        try:
            return array.get_orthogonal_selection(selection) if orthogonal else array[selection]
        except Exception as exc:  # zarr and numcodecs raise several kinds (RuntimeError, ValueError, ...)
            key = self._bad_chunk(array, selection)
            where = f"chunk {name}/{key}" if key else f"array {name}"
            raise CubeError(f"cube '{self.path}': {where} is corrupt ({reason(exc)}); {_DAMAGED}") from None

    def _array(self, name: str):
        """The zarr array `name`, checked to have one row per token (per prompt, plus one, for offsets)."""
        try:
            array = self._group[name]
        except Exception as exc:
            raise CubeError(f"cube '{self.path}': array {name} is missing or unreadable ({reason(exc)}); "
                            f"{_DAMAGED}") from None  # fmt: skip
        n_tokens = self.metadata["capture"]["n_tokens"]
        rows = {"tokens/text_offsets": n_tokens + 1}
        if name.startswith(("sites/", "summaries/")) or name in ("tokens/token_id", *_MAY_BE_UNSTORED):
            rows[name] = n_tokens
        elif name == "prompts/text_offsets":
            rows[name] = len(self._token_offsets)
        if name in rows and (array.ndim < 1 or array.shape[0] != rows[name]):
            raise CubeError(f"cube '{self.path}': array {name} has {array.shape[0] if array.ndim else 0} rows, not "
                            f"{rows[name]}; the cube is truncated or damaged: {_DAMAGED}")  # fmt: skip
        if name.startswith(("sites/", "summaries/")):
            kind = name.split("/", 1)[1]
            units = len(layout.STATS) if name.startswith("summaries/") else array.attrs.get("unit_shape")
            units = int(np.prod(units)) if units is not None else None
            if (
                array.ndim != 3
                or array.shape[1] != len(self.metadata["sites"].get(kind, {}).get("layers", ()))
                or (units is not None and array.shape[2] != units)
            ):
                raise CubeError(f"cube '{self.path}': array {name} has shape {list(array.shape)}, which does not match "
                                f"its layers and units; the cube is damaged: {_DAMAGED}")  # fmt: skip
        return array

    def _check_stored(self, name: str, array, selection, size: int | None = None) -> None:
        """A CubeError for the first chunk under `selection` that is not stored (zarr would read it as its fill value,
        zeros, passing a deleted file for data), or, locally, whose file is not `size` bytes long."""
        for coords in _chunks_of(array, selection):
            key = array.metadata.chunk_key_encoding.encode_chunk_key(coords)
            if storage.is_url(self.path):
                if name not in self._stored:
                    self._stored[name] = set(storage.list_files(storage.join(self.path, name)))
                if key not in self._stored[name]:
                    raise CubeError(f"cube '{self.path}': chunk {name}/{key} is missing; {_DAMAGED}")
                continue
            file = self.path.joinpath(name, *key.split("/"))
            if not file.is_file():
                raise CubeError(f"cube '{self.path}': chunk {name}/{key} is missing; {_DAMAGED}")
            if size is not None and file.stat().st_size != size:
                raise CubeError(f"cube '{self.path}': chunk {name}/{key} is corrupt ({file.stat().st_size} bytes, not "
                                f"{size}); {_DAMAGED}")  # fmt: skip

    def _bad_chunk(self, array, selection) -> str | None:
        """The key of the first chunk under `selection` that fails to decode (the error path only)."""
        for coords in _chunks_of(array, selection):
            region = tuple(slice(c * size, (c + 1) * size) for c, size in zip(coords, array.chunks, strict=True))
            try:
                array[region]
            except Exception:
                return array.metadata.chunk_key_encoding.encode_chunk_key(coords)
        return None

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
        offsets = self._read("prompts/text_offsets", slice(prompt, prompt + 2))
        return self._strings("prompts", offsets)[0]

    def str_tokens(self, prompt: int | None = None) -> list[str]:
        rows = self.prompt_tokens(prompt) if prompt is not None else slice(0, self.n_tokens)
        return self._strings("tokens", self._read("tokens/text_offsets", slice(rows.start, rows.stop + 1)))

    def _strings(self, table: str, offsets: np.ndarray) -> list[str]:
        size = self._array(f"{table}/text_bytes").shape[0]
        if len(offsets) < 1 or offsets[0] < 0 or offsets[-1] > size or (np.diff(offsets) < 0).any():
            raise CubeError(f"cube '{self.path}': {table}/text_offsets do not fit {table}/text_bytes; the token "
                            f"table is truncated or damaged: {_DAMAGED}")  # fmt: skip
        try:
            return layout.decode_strings(self._read(f"{table}/text_bytes", slice(offsets[0], offsets[-1])), offsets)
        except UnicodeDecodeError:
            raise CubeError(f"cube '{self.path}': {table}/text_bytes is not valid UTF-8; {_DAMAGED}") from None

    def token_ids(self, prompt: int | None = None) -> np.ndarray:
        rows = self.prompt_tokens(prompt) if prompt is not None else slice(0, self.n_tokens)
        return self._read("tokens/token_id", rows)

    def token_table(self) -> dict[str, np.ndarray | list[str]]:
        """prompt_index, position, token_id (numpy) and text (list of str), one entry per token."""
        table = {name: self._read(f"tokens/{name}") for name in ("prompt_index", "position", "token_id")}
        self._check_token_rows(table, slice(0, self.n_tokens))
        return table | {"text": self.str_tokens()}

    def _check_token_rows(self, table: dict, rows: slice) -> None:
        """The token arrays have one entry per token, and prompt_index / position agree with the token offsets."""
        lengths = np.diff(self._token_offsets)
        expected = {
            "prompt_index": np.repeat(np.arange(len(lengths)), lengths)[rows],
            "position": (np.arange(self.n_tokens) - np.repeat(self._token_offsets[:-1], lengths))[rows],
        }
        for name, values in table.items():
            wrong = len(values) != rows.stop - rows.start
            if name in expected and not wrong:
                wrong = not np.array_equal(values, expected[name])
            if wrong:
                raise CubeError(f"cube '{self.path}': tokens/{name} does not match the token offsets; the token table "
                                f"is truncated or damaged: {_DAMAGED}")  # fmt: skip

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
        name = f"sites/{kind}"
        rows, layer_axis = self._rows(prompt, tokens), self._layer_axis(kind, layers)
        unit_axis = slice(None) if units is None else ([units] if isinstance(units, int) else units)
        if isinstance(layer_axis, list) and not isinstance(unit_axis, slice):  # zarr takes one list axis at a time
            data = np.stack([self._read(name, (rows, [layer], slice(None)))[:, 0] for layer in layer_axis], axis=1)
            data = data[:, :, unit_axis]
        else:
            data = self._read(name, (rows, layer_axis, unit_axis), orthogonal=True)
        if as_torch:
            import torch

            return torch.from_numpy(np.ascontiguousarray(data))
        return data

    def summaries(self, kind: str, stat: str | None = None, prompt: int | None = None) -> np.ndarray:
        """Per-(token, layer) statistics: `[tokens, layers, 5]` in `layout.STATS` order, or `[tokens, layers]`."""
        self._check_kind(kind)
        data = self._read(f"summaries/{kind}", self._rows(prompt))
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
        if layer is None:
            return self._read(f"attention/prompt_{prompt}")
        captured = self.metadata["capture"]["attention_layers"]
        if layer not in captured:
            raise CubeError(f"attention of layer {layer} is not in this cube; captured layers: {captured}")
        return self._read(f"attention/prompt_{prompt}", captured.index(layer))

    def to_xarray(self, kind: str, prompt: int | None = None):
        """A labelled `xarray.DataArray` with dims (token, layer, unit) and per-token coordinates."""
        import xarray as xr

        rows = self._rows(prompt)
        table = {name: self._read(f"tokens/{name}", rows) for name in ("prompt_index", "position", "token_id")}
        self._check_token_rows(table, rows)
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
        prompt_index = np.repeat(np.arange(self.n_prompts), np.diff(self._token_offsets))
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

    def check(self) -> None:
        """A CubeError naming the first damaged chunk, if any: the token table and the summaries are decoded whole
        (small, and checksummed); activation chunks are checked present and, when stored raw, of their full size."""
        self.token_table()
        self._strings("prompts", self._read("prompts/text_offsets"))
        rows = slice(0, self.tokens_written)
        for kind in self.site_kinds:
            self._read(f"summaries/{kind}", rows)
            if self.metadata["sites"][kind].get("summaries_only"):
                continue
            name = f"sites/{kind}"
            array = self._array(name)
            if array.compressors and not storage.is_url(self.path):  # a cube from before raw chunks: decode it
                self._read(name, rows)
            else:  # raw chunks hold no checksum: present and whole is what can be checked without reading them
                raw = not array.compressors and not storage.is_url(self.path)
                size = int(np.prod(array.chunks)) * np.dtype(array.dtype).itemsize if raw else None
                self._check_stored(name, array, rows, size)
        for prompt in range(self.n_prompts) if self.has_attention and self.complete else ():
            name = f"attention/prompt_{prompt}"
            self._check_stored(name, self._array(name), slice(None))

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
                kind: list(self._array(f"{self._values_or_summaries(kind)}/{kind}").shape) for kind in self.site_kinds
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


def _chunks_of(array, selection) -> itertools.product:
    """Chunk coordinates of the bounding box of a selection (slices, ints or index lists per axis)."""
    axes = selection if isinstance(selection, tuple) else (selection,)
    axes = axes + (slice(None),) * (array.ndim - len(axes))
    ranges = []
    for axis, size, chunk in zip(axes, array.shape, array.chunks, strict=True):
        if isinstance(axis, slice):
            lo, hi = axis.indices(size)[:2]
        else:
            index = np.atleast_1d(np.asarray(axis)).astype(np.int64)
            index = np.where(index < 0, index + size, index)
            lo, hi = (int(index.min()), int(index.max()) + 1) if index.size else (0, 0)
        ranges.append(range(lo // chunk, -(-hi // chunk)) if hi > lo else range(0))
    return itertools.product(*ranges)


def layer_range(layers: list[int | None]) -> str:
    if layers == [None]:
        return "-"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def open_cube(path: str | Path, allow_partial: bool = False) -> Cube:
    """Open an activation cube written by `capture`. An unfinished cube raises unless allow_partial=True."""
    return Cube(path, allow_partial=allow_partial)
