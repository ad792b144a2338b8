"""What the main benchmark and every peer script share: arguments, the side-by-side timing loop, the result file.

This file imports only the standard library and torch, so it runs in every benchmark venv (the peers' venvs do not
have modelrecon installed).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch


def peer_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model-dir", required=True, help="local Hugging Face folder (config.json, safetensors)")
    parser.add_argument("--tokens", required=True, help="JSON file: list of prompts, each a list of token ids")
    parser.add_argument("--out", required=True, help="folder for result.json and last_resid_post.pt")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--reps", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    return parser.parse_args()


def read_tokens(path: str | Path) -> torch.Tensor:
    """The prompts as one `[batch, pos]` tensor (all prompts have the same length: no padding anywhere)."""
    return torch.tensor(json.loads(Path(path).read_text()), dtype=torch.long)


def side_by_side(variants: dict[str, Callable[[], object]], reps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each variant, timed alternately in one process.

    Every repetition runs each variant once, in forward order on even repetitions and reverse order on odd ones, so a
    slow drift of the machine (heat, another process) falls on all variants alike. Garbage is collected before each
    call, outside the timed region, and each call's result is dropped after its clock stops.
    """
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    names = list(variants)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            gc.collect()
            start = time.perf_counter()
            result = variants[name]()
            seconds[name].append(time.perf_counter() - start)
            del result
    return seconds


def write_result(out: str | Path, last_resid_post: torch.Tensor, **fields) -> None:
    """result.json with the timings and facts; last_resid_post.pt `[batch, pos, d_model]` for the equality check."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(last_resid_post.detach().cpu().contiguous(), out / "last_resid_post.pt")
    (out / "result.json").write_text(json.dumps(fields, indent=2))
