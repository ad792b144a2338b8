"""The activation cube's on-disk layout (docs/cube-format.md is the specification; keep the two in step).

A cube is a Zarr v3 group:

    zarr.json                      attributes["modelrecon_cube"]: the metadata document (schema, provenance, status)
    prompts/text_bytes, text_offsets   UTF-8 text of each prompt, laid end to end
    prompts/token_offsets          int64 [n_prompts + 1]: prompt i owns tokens token_offsets[i] : token_offsets[i+1]
    tokens/prompt_index, position, token_id    [n_tokens]
    tokens/text_bytes, text_offsets            decoded text of each token, UTF-8, laid end to end
    sites/<kind>                   [n_tokens, n_layers, n_units], e.g. sites/resid_post, sites/mlp.neurons
    summaries/<kind>               float32 [n_tokens, n_layers, 5]: norm, mean, std, max, frac_active
    attention/prompt_<i>           [n_layers, n_heads, q, k] when attention was captured
"""

from __future__ import annotations

import numpy as np
import torch

SCHEMA = "modelrecon.cube"
SCHEMA_VERSION = 1
ATTRS_KEY = "modelrecon_cube"
STATS = ("norm", "mean", "std", "max", "frac_active")
STATUS_COMPLETE = "complete"
STATUS_CAPTURING = "capturing"


def compressors() -> tuple:
    """The codec of every array but `sites/<kind>`: zstd with its content checksum, so a damaged chunk fails to
    decode instead of reading as other numbers (zstd alone misses many flipped bytes)."""
    from zarr.codecs import ZstdCodec

    return (ZstdCodec(level=0, checksum=True),)


def summarise(values: torch.Tensor) -> torch.Tensor:
    """[tokens, layers, units] -> float32 [tokens, layers, 5] in STATS order, reduced over units.

    std is the population std, so a single unit gives 0, never NaN.
    """
    values = values.float()
    n = values.shape[-1]
    norm, mean = torch.linalg.vector_norm(values, dim=-1), values.mean(-1)
    # var = E[x^2] - mean^2 from the norm: one cheap pass instead of torch.var_mean's slow one on CPU; the
    # cancellation only matters when |mean| >> std, which activations are not (checked in the tests).
    var = (norm * norm / n - mean * mean).clamp_(min=0)
    return torch.stack(
        [norm, mean, var.sqrt(), values.amax(-1), values.sign().clamp_(min=0).mean(-1)],
        dim=-1,
    )


def n_chunks(n_tokens: int, chunk_tokens: int) -> int:
    return -(-n_tokens // chunk_tokens)


def merge(ranges: list[list[int]]) -> list[list[int]]:
    """[first, end) chunk ranges sorted, with touching or overlapping ones joined."""
    merged: list[list[int]] = []
    for first, end in sorted(ranges):
        if merged and first <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        elif end > first:
            merged.append([first, end])
    return merged


def missing(done: list[list[int]], total: int) -> list[tuple[int, int]]:
    """The chunk ranges of [0, total) not in `done` (merged ranges)."""
    gaps, at = [], 0
    for first, end in done:
        if first > at:
            gaps.append((at, first))
        at = max(at, end)
    return gaps + ([(at, total)] if at < total else [])


def progress(done: list[list[int]], chunk_tokens: int, n_tokens: int) -> dict:
    """The metadata's progress: the written chunk ranges, and the tokens of their unbroken run from the start
    (`tokens_written`: what schema 1 readers of a partial cube may read)."""
    done = merge(done)
    prefix = done[0][1] if done and done[0][0] == 0 else 0
    return {"tokens_written": min(prefix * chunk_tokens, n_tokens), "done_chunks": done}


def done_chunks(progress: dict, chunk_tokens: int) -> list[list[int]]:
    """The written chunk ranges of a progress record (a cube written before `done_chunks` has only the prefix)."""
    if "done_chunks" in progress:
        return merge([list(r) for r in progress["done_chunks"]])
    return merge([[0, n_chunks(int(progress["tokens_written"]), chunk_tokens)]])


def encode_strings(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings -> (uint8 bytes laid end to end, int64 offsets [n + 1])."""
    encoded = [t.encode("utf-8") for t in texts]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


def decode_strings(data: np.ndarray, offsets: np.ndarray) -> list[str]:
    """Inverse of encode_strings for a run of strings: `data` starts at byte offsets[0]."""
    raw, base = data.tobytes(), int(offsets[0])
    return [raw[int(a) - base : int(b) - base].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
