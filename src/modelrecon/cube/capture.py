"""Capture: stream a model's internals on many prompts into an activation cube, resumably.

Memory stays bounded: one batch of activations plus less than one chunk of tokens is held at a time. A writer thread
compresses and writes while the next batch runs. Data is written in whole chunks of `chunk_tokens` tokens, and after
each write the cube's `progress.tokens_written` moves forward; both are atomic file replacements (zarr's local store),
so a process killed at any point (even SIGKILL) leaves a cube whose recorded progress is true. Re-running the same
capture resumes from the batch holding the first unwritten token. Batches are fixed by the prompt order and batch
size, so a resumed cube is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import platform
import queue
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np
import torch
import zarr

from modelrecon.cube import layout
from modelrecon.cube.reader import Cube, read_attrs
from modelrecon.errors import BadInputError, CubeError
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
        ids = model.encode(prompt)[:context_length]
        if max_tokens is not None:
            ids = ids[: max_tokens - total]
        if not ids:
            break
        token_ids.append(ids)
        kept.append(prompt)
        total += len(ids)
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
        "progress": {"tokens_written": 0},
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


def _create(path: Path, model: Model, plan: _Plan, meta: dict) -> None:
    """Write the cube's skeleton (arrays at full size, token table, metadata) in a side folder, then rename it in."""
    staging = path.with_name(path.name + ".creating")
    shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while creating
    try:
        group = zarr.open_group(staging, mode="w", zarr_format=3)
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
            )
            values.attrs.update({"layers": layers, "unit_shape": unit_shape, "axes": ["token", "layer", "unit"]})
            summaries = group.create_array(
                f"summaries/{kind}",
                shape=(n_tokens, len(layers), len(layout.STATS)),
                dtype=np.float32,
                chunks=(chunk, len(layers), len(layout.STATS)),
                fill_value=np.nan,
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
            group.create_array(name, data=data, chunks=(max(1, min(len(data), 1 << 20)),))
        group.attrs[layout.ATTRS_KEY] = meta
        staging.rename(path)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise CubeError(f"cannot write a cube at '{path}': {exc.strerror or exc}; choose a writable --out") from None


class _Writer:
    """Runs write jobs in order on one thread, so compression and I/O overlap the next forward pass."""

    def __init__(self) -> None:
        self.jobs: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.error is None:
                try:
                    job()
                except BaseException as exc:  # re-raised on the capturing thread
                    self.error = exc
            self.jobs.task_done()

    def put(self, job: Callable[[], None]) -> None:
        self.check()
        self.jobs.put(job)

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()
        self.check()

    def check(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            if isinstance(error, OSError):
                raise CubeError(
                    f"writing the cube failed: {error.strerror or error}; free space or fix permissions, "
                    "then re-run to resume"
                ) from None
            raise error


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
    """Record `sites` on `prompts` into an activation cube at `out` and return it opened.

    Re-running with the same arguments resumes an unfinished cube, or returns a finished one as it is.
    """
    if isinstance(model, str):
        from modelrecon.models.loading import load

        model = load(model)
    if isinstance(prompts, str):
        prompts = [prompts]
    torch.manual_seed(seed)
    plan = _plan(
        model, prompts, sites, dtype, batch_size, max_tokens, context_length, attention, chunk_tokens, padding_side
    )
    fingerprint = plan.fingerprint(model.weights_sha256())
    path = Path(out)
    if path.exists():
        meta = read_attrs(path)
        if meta.get("fingerprint") != fingerprint:
            raise CubeError(
                f"'{path}' holds a different capture (other model, prompts or settings); "
                "choose another --out or delete it"
            )
        if meta["status"] == layout.STATUS_COMPLETE:
            return Cube(path)
    else:
        _create(path, model, plan, _metadata(model, plan, fingerprint, seed))
    _stream(model, plan, path, progress)
    return Cube(path)


class _ChunkBuffers:
    """Chunk-sized buffers for every site kind, reused so large arrays are not re-allocated for every chunk.

    A buffer set is filled token by token; when full (or at the end) it goes to the writer, which hands it back to
    the pool after writing. Three sets suffice: one filling, one queued, one being written.
    """

    def __init__(self, shapes: dict[str, tuple[int, int]], chunk: int, dtype, n_stats: int, n_sets: int = 3) -> None:
        self.pool: queue.Queue = queue.Queue()
        for _ in range(n_sets):  # torch tensors: torch casts to fp16 vectorised and multi-threaded, numpy does not
            self.pool.put(
                {
                    kind: (torch.empty((chunk, *shape), dtype=dtype), torch.empty((chunk, shape[0], n_stats)))
                    for kind, shape in shapes.items()
                }
            )

    def take(self, writer: _Writer) -> dict:
        while True:  # a failed writer never hands buffers back: surface its error instead of waiting forever
            try:
                return self.pool.get(timeout=0.1)
            except queue.Empty:
                writer.check()

    def give_back(self, buffers: dict) -> None:
        self.pool.put(buffers)


def _stream(model: Model, plan: _Plan, path: Path, show_progress: bool) -> None:
    for leftover in path.rglob("*.partial"):  # temporary files of writes a killed run did not finish
        leftover.unlink()
    group = zarr.open_group(path, mode="r+")
    meta = dict(group.attrs[layout.ATTRS_KEY])
    offsets, chunk = plan.offsets, plan.settings["chunk_tokens"]
    n_tokens, batch_size = int(offsets[-1]), plan.settings["batch_size"]
    written = int(meta["progress"]["tokens_written"])
    arrays = {kind: (group[f"sites/{kind}"], group[f"summaries/{kind}"]) for kind in plan.kinds}
    dtype = _DTYPES[plan.settings["dtype"]]
    pool = _ChunkBuffers(
        {kind: values.shape[1:] for kind, (values, _) in arrays.items()}, chunk, dtype, len(layout.STATS)
    )
    need_logits = "logits" in plan.kinds
    record = plan.site_names + [f"layers.{i}.attn.pattern" for i in plan.pattern_layers]
    site_lists = {kind: [site_name(kind, layer) for layer in layers] for kind, layers in plan.kinds.items()}
    # Resume at the batch holding the first unwritten token; batches are fixed by prompt order and batch size.
    first_batch = int(np.searchsorted(offsets[batch_size::batch_size], written, side="right"))
    writer = _Writer()
    buffers, chunk_start, filled = pool.take(writer), written, 0  # chunk_start is chunk-aligned (or the end)

    def send(final: bool) -> None:
        nonlocal buffers, chunk_start, filled
        full, start, stop = buffers, chunk_start, chunk_start + filled

        def job() -> None:
            try:
                for kind, (values, summaries) in arrays.items():
                    if stop > start:
                        values[start:stop] = full[kind][0][: stop - start].numpy()
                        summaries[start:stop] = full[kind][1][: stop - start].numpy()
            finally:
                pool.give_back(full)
            meta["progress"] = {"tokens_written": stop}
            if final:
                meta["status"] = layout.STATUS_COMPLETE
            group.attrs[layout.ATTRS_KEY] = meta

        writer.put(job)
        if not final:
            buffers, chunk_start, filled = pool.take(writer), stop, 0

    def add(kind_values: dict[str, torch.Tensor]) -> None:
        """Append one prompt's tokens ([tokens, layers, units] fp32 per kind), sending chunks as they fill."""
        nonlocal filled
        n, done = next(iter(kind_values.values())).shape[0], 0
        while done < n:
            take = min(n - done, chunk - filled)
            for kind, values in kind_values.items():
                part = values[done : done + take]
                buffers[kind][0][filled : filled + take] = part  # cast to the cube's dtype on assignment
                buffers[kind][1][filled : filled + take] = layout.summarise(part)
            filled += take
            done += take
            if filled == chunk:
                send(final=False)

    try:
        with token_progress(n_tokens, written, enabled=show_progress) as advance:
            for start in range(first_batch * batch_size, len(plan.token_ids), batch_size):
                prompt_ids = list(range(start, min(start + batch_size, len(plan.token_ids))))
                batch = model.batch_from_ids([plan.token_ids[i] for i in prompt_ids], plan.settings["padding_side"])
                with (
                    torch.inference_mode(),
                    hooked(model, batch, record=record, dtype=torch.float32, device="cpu") as trace,
                ):
                    model.forward(batch, logits=need_logits)
                    for j, prompt in enumerate(prompt_ids):
                        skip = max(0, written - int(offsets[prompt]))  # tokens already on disk (resumed batch)
                        if skip < len(plan.token_ids[prompt]):
                            add(
                                {
                                    kind: torch.stack([trace.acts[n][j].flatten(1) for n in names], dim=1)[skip:]
                                    for kind, names in site_lists.items()
                                }
                            )
                        if plan.pattern_layers:
                            patterns = (
                                torch.stack([trace.acts[f"layers.{i}.attn.pattern"][j] for i in plan.pattern_layers])
                                .to(dtype)
                                .numpy()
                            )
                            writer.put(lambda p=prompt, a=patterns: _write_pattern(group, p, a))
                advance(int(offsets[prompt_ids[-1] + 1]) - max(written, int(offsets[prompt_ids[0]])))
            send(final=True)
            writer.close()
    except BaseException:
        # Let already queued writes finish: the progress they record stays true, and the cube resumes from there.
        try:
            writer.close()
        except Exception:  # noqa: S110 - the original error is the one to report
            pass
        raise


def _write_pattern(group, prompt: int, patterns: np.ndarray) -> None:
    group.create_array(f"attention/prompt_{prompt}", data=patterns, chunks=patterns.shape, overwrite=True)
    group[f"attention/prompt_{prompt}"].attrs.update({"axes": ["layer", "head", "q", "k"]})
