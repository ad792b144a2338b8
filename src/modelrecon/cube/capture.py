"""Capture: stream a model's internals on many prompts into an activation cube, resumably.

Memory stays bounded: one batch of activations plus less than one chunk of tokens is held at a time. A writer thread
compresses and writes while the next batch runs. Data is written in whole chunks of `chunk_tokens` tokens, and after
each write the cube's `progress.tokens_written` moves forward; both are atomic file replacements (zarr's local store),
so a process killed at any point (even SIGKILL) leaves a cube whose recorded progress is true. Re-running the same
capture resumes from the batch holding the first unwritten token. Batches are fixed by the prompt order and batch
size, so a resumed cube is bit-identical to an uninterrupted one.

The same pieces serve a distributed capture (modelrecon.scale.capture): `prepare` plans and creates the cube once,
`write_tokens` computes and writes one chunk-aligned token range (any process, any order: ranges never share a chunk),
and the coordinator alone records the done ranges (`progress.done_chunks`) and finishes the cube.
A cube can live on any fsspec URL (storage.py): there, each chunk and the metadata are whole objects.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np
import torch
import zarr

from modelrecon import storage
from modelrecon.cube import layout
from modelrecon.cube.reader import Cube, read_attrs
from modelrecon.cube.writer import ChunkWriter
from modelrecon.errors import BadInputError, CubeError, NonFiniteError
from modelrecon.hooks.trace import hooked
from modelrecon.models.model import Model
from modelrecon.models.sites import parse_site, site_name
from modelrecon.progress import token_progress

_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass
class _Plan:
    """What a capture will write: everything that must match for a resume to continue the same capture."""

    site_names: list[str]  # token-axis sites, model order
    kinds: dict[str, list[int | None]]  # site kind -> model layers along the cube's layer axis
    pattern_layers: list[int]  # layers whose attention patterns are captured
    token_ids: list[list[int]]
    prompts: list[str]
    settings: dict

    @property
    def offsets(self) -> np.ndarray:
        offsets = np.zeros(len(self.token_ids) + 1, dtype=np.int64)
        np.cumsum([len(t) for t in self.token_ids], out=offsets[1:])
        return offsets

    def fingerprint(self, weights_sha256: str) -> str:
        digest = hashlib.sha256(json.dumps([self.settings, self.site_names, weights_sha256], sort_keys=True).encode())
        for ids in self.token_ids:
            digest.update(np.asarray(ids, dtype=np.int64).tobytes() + b"|")
        return digest.hexdigest()


def _plan(model, prompts, sites, dtype, batch_size, max_tokens, context_length, attention, chunk_tokens, padding_side):
    if dtype not in _DTYPES:
        raise BadInputError(f"dtype must be float16 or float32, not {dtype!r}")
    if batch_size < 1 or chunk_tokens < 1:
        raise BadInputError("batch_size and chunk_tokens must be at least 1")
    names = model.resolve_sites(list(sites))
    pattern_layers = [int(n.split(".")[1]) for n in names if n.endswith(".attn.pattern")]
    if attention and not pattern_layers:
        pattern_layers = list(range(model.n_layers))
    names = [n for n in names if not n.endswith(".attn.pattern")]
    if not names:
        raise BadInputError("no token sites to capture; give --sites such as 'layers.*.resid_post'")
    kinds: dict[str, list[int | None]] = {}
    for name in names:
        site = parse_site(name)
        kinds.setdefault(site.kind, []).append(site.layer)
    token_ids, kept = [], []
    total = 0
    for prompt in prompts:
        ids = model.encode(prompt, truncate_to=context_length)
        if max_tokens is not None:
            ids = ids[: max_tokens - total]
        if not ids:
            break
        token_ids.append(ids)
        kept.append(prompt)
        total += len(ids)
    # zarr stores a partial chunk whole: a 5-token cube in 1024-token chunks took 136 MB on disk instead of 0.7
    chunk_tokens = min(chunk_tokens, max(total, 1))
    settings = dict(
        sites=list(sites),
        dtype=dtype,
        batch_size=batch_size,
        max_tokens=max_tokens,
        context_length=context_length,
        attention=bool(pattern_layers),
        attention_layers=pattern_layers,
        chunk_tokens=chunk_tokens,
        padding_side=padding_side,
    )
    return _Plan(names, kinds, pattern_layers, token_ids, kept, settings)


def _versions() -> dict:
    versions = {"python": platform.python_version()}
    for package in ("modelrecon", "torch", "transformers", "zarr", "numpy"):
        try:
            versions[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _metadata(model: Model, plan: _Plan, fingerprint: str, seed: int) -> dict:
    tok = model.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    return {
        "schema": layout.SCHEMA,
        "schema_version": layout.SCHEMA_VERSION,
        "status": layout.STATUS_CAPTURING,
        "progress": layout.progress([], plan.settings["chunk_tokens"], int(plan.offsets[-1])),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "fingerprint": fingerprint,
        "model": {
            "name": model.name,
            "source": {k: v for k, v in model.source.items() if k != "weights_sha256"},
            "weights_sha256": model.weights_sha256(),
            "family": model.adapter.family,
            "model_type": model.hf.config.model_type,
            "n_layers": model.n_layers,
            "d_model": model.d_model,
            "n_heads": model.n_heads,
            "d_head": model.d_head,
            "d_mlp": model.d_mlp,
            "vocab_size": model.vocab_size,
            "dtype": str(model.dtype).removeprefix("torch."),
        },
        "tokenizer": {
            "class": type(tok).__name__,
            "name_or_path": str(getattr(tok, "name_or_path", "")),
            "vocab_size": len(tok),
            "sha256": hashlib.sha256(backend.to_str().encode()).hexdigest() if backend is not None else None,
        },
        "dtype": plan.settings["dtype"],
        "versions": _versions(),
        "capture": {
            **plan.settings,
            "site_names": plan.site_names,
            "n_prompts": len(plan.token_ids),
            "n_tokens": int(plan.offsets[-1]),
        },
        "seed": seed,
        "sites": {kind: {"layers": layers} for kind, layers in plan.kinds.items()},
        "stats": list(layout.STATS),
    }


def _units(model: Model, kind: str, layer: int | None) -> tuple[int, list[int]]:
    shape = list(model.site_shape(site_name(kind, layer))[2:])  # drop batch and pos
    return int(np.prod(shape)), shape


_CREATING = "modelrecon_cube_creating"  # the group attribute of a remote cube whose skeleton is being written


def _create(path: Path | str, model: Model, plan: _Plan, meta: dict) -> None:
    """Write the cube's skeleton (arrays at full size, token table, metadata).

    Locally it is written in a side folder and renamed in. An object store has no rename: the group is first marked
    as being created and the metadata written last, so a killed creation is recognised and started again.
    """
    staging = path if storage.is_url(path) else path.with_name(path.name + ".creating")
    storage.remove_tree(staging)  # left by a run killed while creating
    try:
        group = zarr.open_group(storage.zarr_store(staging), mode="w", zarr_format=3, attributes={_CREATING: True})
        n_tokens, chunk = int(plan.offsets[-1]), plan.settings["chunk_tokens"]
        dtype = plan.settings["dtype"]  # zarr takes the name
        for kind, layers in plan.kinds.items():
            n_units, unit_shape = _units(model, kind, layers[0])
            values = group.create_array(
                f"sites/{kind}",
                shape=(n_tokens, len(layers), n_units),
                dtype=dtype,
                chunks=(chunk, 1, n_units),
                fill_value=0,
                compressors=None,  # activations are near-incompressible: zstd saved 7% at twice the writing CPU
            )
            values.attrs.update({"layers": layers, "unit_shape": unit_shape, "axes": ["token", "layer", "unit"]})
            summaries = group.create_array(
                f"summaries/{kind}",
                shape=(n_tokens, len(layers), len(layout.STATS)),
                dtype=np.float32,
                chunks=(chunk, len(layers), len(layout.STATS)),
                fill_value=np.nan,
                compressors=layout.compressors(),
            )
            summaries.attrs.update({"stats": list(layout.STATS), "layers": layers})
        texts = model.tokenizer.batch_decode([[t] for ids in plan.token_ids for t in ids])
        token_ids = np.concatenate([np.asarray(ids, dtype=np.int64) for ids in plan.token_ids])
        prompt_index = np.repeat(np.arange(len(plan.token_ids), dtype=np.int32), [len(t) for t in plan.token_ids])
        position = np.concatenate([np.arange(len(ids), dtype=np.int32) for ids in plan.token_ids])
        text_bytes, text_offsets = layout.encode_strings(texts)
        prompt_bytes, prompt_offsets = layout.encode_strings(plan.prompts)
        for name, data in {
            "tokens/token_id": token_ids,
            "tokens/prompt_index": prompt_index,
            "tokens/position": position,
            "tokens/text_bytes": text_bytes,
            "tokens/text_offsets": text_offsets,
            "prompts/text_bytes": prompt_bytes,
            "prompts/text_offsets": prompt_offsets,
            "prompts/token_offsets": plan.offsets,
        }.items():
            group.create_array(
                name, data=data, chunks=(max(1, min(len(data), 1 << 20)),), compressors=layout.compressors()
            )
        group.attrs.put({layout.ATTRS_KEY: meta})  # replaces the creating mark
        if staging != path:
            staging.rename(path)
    except OSError as exc:
        storage.remove_tree(staging)
        raise CubeError(f"cannot write a cube at '{path}': {exc.strerror or exc}; choose a writable --out") from None


@dataclass
class Prepared:
    """A capture ready to run: its plan, where the cube is, and the chunk ranges still to write."""

    plan: _Plan
    location: Path | str
    pending: list[tuple[int, int]]  # [first chunk, end chunk) ranges not yet written
    done: list[list[int]]  # chunk ranges already written (the cube's progress.done_chunks)
    complete: bool

    @property
    def n_chunks(self) -> int:
        return layout.n_chunks(int(self.plan.offsets[-1]), self.plan.settings["chunk_tokens"])

    def tokens(self, first_chunk: int, end_chunk: int) -> tuple[int, int]:
        chunk, n_tokens = self.plan.settings["chunk_tokens"], int(self.plan.offsets[-1])
        return first_chunk * chunk, min(end_chunk * chunk, n_tokens)


def prepare(
    model: Model,
    prompts: str | Sequence[str],
    out: str | Path,
    *,
    sites: Sequence[str] = ("layers.*.resid_post",),
    dtype: str = "float16",
    batch_size: int = 8,
    max_tokens: int | None = None,
    context_length: int | None = None,
    attention: bool = False,
    seed: int = 0,
    chunk_tokens: int = 1024,
    padding_side: str = "right",
) -> Prepared:
    """Plan a capture and create its cube (or check that the cube at `out` is this capture, to resume it)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    plan = _plan(
        model, prompts, sites, dtype, batch_size, max_tokens, context_length, attention, chunk_tokens, padding_side
    )
    fingerprint = plan.fingerprint(model.weights_sha256())
    location = storage.location(out)
    meta = None
    if storage.exists(storage.join(location, "zarr.json")):
        if _CREATING in zarr.open_group(storage.zarr_store(location, read_only=True), mode="r").attrs:
            pass  # a remote creation that was killed: create again
        else:
            meta = read_attrs(location)
            if meta.get("fingerprint") != fingerprint:
                raise CubeError(
                    f"'{location}' holds a different capture (other model, prompts or settings); "
                    "choose another --out or delete it"
                )
    elif storage.exists(location) and not storage.is_url(location) and any(Path(location).iterdir()):
        raise CubeError(f"'{location}' exists and is not a cube; choose another --out or delete it")
    if meta is None:
        meta = _metadata(model, plan, fingerprint, seed)
        _create(location, model, plan, meta)
    elif not storage.is_url(location):
        for leftover in Path(location).rglob("*.partial"):  # temporary files of writes a killed run did not finish
            leftover.unlink()
    chunk_tokens = plan.settings["chunk_tokens"]
    n_chunks = layout.n_chunks(int(plan.offsets[-1]), chunk_tokens)
    done = layout.done_chunks(meta["progress"], chunk_tokens)
    return Prepared(plan, location, layout.missing(done, n_chunks), done, meta["status"] == layout.STATUS_COMPLETE)


def capture(
    model: Model | str,
    prompts: str | Sequence[str],
    out: str | Path,
    *,
    sites: Sequence[str] = ("layers.*.resid_post",),
    dtype: str = "float16",
    batch_size: int = 8,
    max_tokens: int | None = None,
    context_length: int | None = None,
    attention: bool = False,
    seed: int = 0,
    chunk_tokens: int = 1024,
    padding_side: str = "right",
    progress: bool = True,
) -> Cube:
    """Record `sites` on `prompts` into an activation cube at `out` (a folder or an fsspec URL) and return it opened.

    Re-running with the same arguments resumes an unfinished cube, or returns a finished one as it is.
    modelrecon.scale.capture.capture_on_ray does the same on a Ray cluster, with an identical result.
    """
    if isinstance(model, str):
        from modelrecon.models.loading import load

        model = load(model)
    torch.manual_seed(seed)
    job = prepare(model, prompts, out, sites=sites, dtype=dtype, batch_size=batch_size, max_tokens=max_tokens,
                  context_length=context_length, attention=attention, seed=seed, chunk_tokens=chunk_tokens,
                  padding_side=padding_side)  # fmt: skip
    if not job.complete:
        group = zarr.open_group(storage.zarr_store(job.location), mode="r+")
        n_tokens = int(job.plan.offsets[-1])
        done_tokens = n_tokens - sum(b - a for a, b in (job.tokens(*r) for r in job.pending))
        with token_progress(n_tokens, done_tokens, enabled=progress) as advance:
            for first, end in job.pending:
                start, stop = job.tokens(first, end)
                write_tokens(model, job.plan, job.location, start, stop,
                             on_chunk=lambda a, b: record(group, [[a, b]]), advance=advance)  # fmt: skip
        finish(group)
    return Cube(job.location)


def record(group, ranges: list[list[int]]) -> dict:
    """Add written chunk ranges to the cube's progress (the coordinator's job: one writer of metadata)."""
    meta = dict(group.attrs[layout.ATTRS_KEY])
    settings = meta["capture"]
    done = layout.merge(layout.done_chunks(meta["progress"], settings["chunk_tokens"]) + ranges)
    meta["progress"] = layout.progress(done, settings["chunk_tokens"], settings["n_tokens"])
    group.attrs[layout.ATTRS_KEY] = meta
    return meta


def finish(group) -> None:
    meta = dict(group.attrs[layout.ATTRS_KEY])
    settings = meta["capture"]
    chunks = layout.n_chunks(settings["n_tokens"], settings["chunk_tokens"])
    meta["progress"] = layout.progress([[0, chunks]] if chunks else [], settings["chunk_tokens"], settings["n_tokens"])
    meta["status"] = layout.STATUS_COMPLETE
    group.attrs[layout.ATTRS_KEY] = meta


def _check_finite(plan: _Plan, kind: str, values: torch.Tensor, stats: torch.Tensor, first_token: int) -> None:
    """A NonFiniteError naming the site and token when activations are NaN or infinite, or too large for a float16
    cube: a cube never stores them silently. The norm (a summary already computed) is non-finite exactly when some
    value is, and bounds every value's size, so the check costs almost nothing."""
    norm = stats[..., 0]
    limit = torch.finfo(torch.float16).max if plan.settings["dtype"] == "float16" else float("inf")
    if bool(torch.isfinite(norm).all()) and float(norm.max()) <= limit:
        return
    bad = ~torch.isfinite(values).all(-1) | (values.abs().amax(-1) > limit)
    if not bad.any():
        return
    row, axis = (int(i) for i in bad.nonzero()[0])
    token = first_token + row
    prompt = int(np.searchsorted(plan.offsets, token, side="right")) - 1
    site = site_name(kind, plan.kinds[kind][axis])
    if bool(torch.isfinite(values[row, axis]).all()):
        raise NonFiniteError(f"{site} reaches {float(values[row, axis].abs().max()):.3g} at prompt {prompt}, position "
                             f"{token - int(plan.offsets[prompt])}: more than a float16 cube holds; capture with "
                             "--store-dtype float32")  # fmt: skip
    raise NonFiniteError(f"{site} is NaN or infinite at prompt {prompt}, position {token - int(plan.offsets[prompt])}: "
                         "the model's forward pass overflows; load it in float32 (--dtype float32), or check its "
                         "weights")  # fmt: skip


def write_tokens(
    model: Model,
    plan: _Plan,
    location: Path | str,
    start: int,
    stop: int,
    on_chunk: Callable[[int, int], None] | None = None,
    advance: Callable[[int], None] | None = None,
) -> None:
    """Compute and write tokens [start, stop) of the cube: `start` is chunk-aligned and `stop` is too, or the end.

    The batches are the capture's fixed batches (prompt order, batch size) that hold these tokens, so any range
    written by any process is bit-identical to the same range of a single-process capture. Only these tokens, and
    the attention of prompts starting in the range, are written (by a writer process, cube/writer.py, while the next
    batch runs). `on_chunk(first, end)` is called in this process once chunks [first, end) are on storage.
    """
    group = zarr.open_group(storage.zarr_store(location), mode="r+")
    offsets, chunk = plan.offsets, plan.settings["chunk_tokens"]
    batch_size = plan.settings["batch_size"]
    if start % chunk or (stop % chunk and stop != int(offsets[-1])) or not 0 <= start < stop <= int(offsets[-1]):
        raise ValueError(f"token range {start}..{stop} is not chunk-aligned in a cube of {int(offsets[-1])} tokens")
    shapes = {kind: group[f"sites/{kind}"].shape[1:] for kind in plan.kinds}
    dtype = _DTYPES[plan.settings["dtype"]]
    need_logits = "logits" in plan.kinds
    record_sites = plan.site_names + [f"layers.{i}.attn.pattern" for i in plan.pattern_layers]
    site_lists = {kind: [site_name(kind, layer) for layer in layers] for kind, layers in plan.kinds.items()}
    # The batch holding `start`, and the first prompt past `stop`; batches are fixed by prompt order and batch size.
    first_batch = int(np.searchsorted(offsets[batch_size::batch_size], start, side="right"))
    end_prompt = int(np.searchsorted(offsets, stop, side="left"))
    writer = ChunkWriter(location, shapes, chunk, plan.settings["dtype"], len(layout.STATS), on_chunk)
    (index, buffers), chunk_start, filled = writer.take(), start, 0

    def send() -> None:
        nonlocal index, buffers, chunk_start, filled
        end = chunk_start + filled
        writer.send(index, chunk_start, end)
        chunk_start, filled = end, 0
        if end < stop:
            index, buffers = writer.take()

    def add(kind_values: dict[str, torch.Tensor]) -> None:
        """Append one prompt's tokens ([tokens, layers, units] fp32 per kind), sending chunks as they fill."""
        nonlocal filled
        n, done = next(iter(kind_values.values())).shape[0], 0
        while done < n:
            take = min(n - done, chunk - filled)
            for kind, values in kind_values.items():
                part = values[done : done + take]
                stats = layout.summarise(part)
                _check_finite(plan, kind, part, stats, chunk_start + filled)
                buffers[kind][0][filled : filled + take] = part  # cast to the cube's dtype on assignment
                buffers[kind][1][filled : filled + take] = stats
            filled += take
            done += take
            if filled == chunk or chunk_start + filled == stop:
                send()

    try:
        for first in range(first_batch * batch_size, end_prompt, batch_size):
            prompt_ids = list(range(first, min(first + batch_size, len(plan.token_ids))))
            batch = model.batch_from_ids([plan.token_ids[i] for i in prompt_ids], plan.settings["padding_side"])
            with (
                torch.inference_mode(),
                hooked(model, batch, record=record_sites, dtype=torch.float32, device="cpu") as trace,
            ):
                model.forward(batch, logits=need_logits)
                for j, prompt in enumerate(prompt_ids):
                    lo, hi = int(offsets[prompt]), int(offsets[prompt + 1])
                    # The prompt's patterns are queued before its tokens, so they are on storage before the chunk
                    # holding its first token is recorded as done.
                    if plan.pattern_layers and start <= lo < stop:
                        patterns = (
                            torch.stack([trace.acts[f"layers.{i}.attn.pattern"][j] for i in plan.pattern_layers])
                            .to(dtype)
                            .numpy()
                        )
                        writer.put_pattern(prompt, patterns)
                    keep = slice(max(start, lo) - lo, min(stop, hi) - lo)  # this prompt's tokens inside the range
                    if keep.stop > keep.start:
                        add(
                            {
                                kind: torch.stack([trace.acts[n][j].flatten(1) for n in names], dim=1)[keep]
                                for kind, names in site_lists.items()
                            }
                        )
            if advance is not None:
                covered = int(offsets[prompt_ids[-1] + 1]) - int(offsets[prompt_ids[0]])
                clipped = min(stop, int(offsets[prompt_ids[-1] + 1])) - max(start, int(offsets[prompt_ids[0]]))
                advance(min(covered, clipped))
        writer.close()
    except BaseException:
        # Let already queued writes finish: the progress they record stays true, and the cube resumes from there.
        try:
            writer.close()
        except Exception:  # noqa: S110 - the original error is the one to report
            pass
        raise
