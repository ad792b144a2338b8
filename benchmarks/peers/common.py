"""What the main benchmark and every peer script share: arguments, the side-by-side timing loop, the result file.

This file imports only the standard library and torch, so it runs in every benchmark venv (the peers' venvs do not
have modelrecon installed).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
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


def others_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has been busy minus those of this process (Linux; None elsewhere)."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = ticks
    own = resource.getrusage(resource.RUSAGE_SELF)
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK") - own.ru_utime - own.ru_stime


@dataclass
class Timings:
    """Seconds per call of each variant over the kept repetitions, and how many repetitions were thrown away."""

    seconds: dict[str, list[float]]
    disturbed: int


def side_by_side(
    variants: dict[str, Callable[[], object]], reps: int, warmup: int, busy_limit: float = 0.05
) -> Timings:
    """Time each variant `reps` times, alternately, in this process.

    Every repetition runs each variant once, in forward order on even repetitions and reverse order on odd ones, so a
    slow drift of the machine falls on all variants alike. Garbage is collected before each call, outside the timed
    region, and each call's result is dropped after its clock stops.

    A repetition during which other processes kept the cores busy more than `busy_limit` of the time (the machine is
    shared: tests, builds) is thrown away and run again, up to `2 * reps` times in all; `disturbed` counts them.
    """
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    names = list(variants)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    disturbed = 0
    kept = 0
    while kept < reps:
        before, start_rep = others_cpu_seconds(), time.perf_counter()
        rep = {}
        for name in names if kept % 2 == 0 else names[::-1]:
            gc.collect()
            start = time.perf_counter()
            result = variants[name]()
            rep[name] = time.perf_counter() - start
            del result
        after, wall = others_cpu_seconds(), time.perf_counter() - start_rep
        busy = None if before is None or after is None else (after - before) / (wall * (os.cpu_count() or 1))
        if busy is not None and busy > busy_limit and disturbed < reps:
            disturbed += 1
            continue
        kept += 1
        for name, value in rep.items():
            seconds[name].append(value)
    return Timings(seconds, disturbed)


def write_peer_result(
    out: str | Path, captured: list[torch.Tensor], tool_package: str, timings: Timings, **fields
) -> None:
    """write_result with what every peer reports: versions, threads, what it captured, the timings."""
    write_result(
        out,
        captured[-1],
        tool_package=tool_package,
        versions=versions(tool_package),
        threads=torch.get_num_threads(),
        n_captured=len(captured),
        shape=list(captured[0].shape),
        norms=[float(t.double().norm()) for t in captured],
        seconds=timings.seconds,
        disturbed_reps=timings.disturbed,
        **fields,
    )


def write_result(out: str | Path, last_resid_post: torch.Tensor, **fields) -> None:
    """result.json with the timings and facts; last_resid_post.pt `[batch, pos, d_model]` for the equality check."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(last_resid_post.detach().cpu().contiguous(), out / "last_resid_post.pt")
    write_json(out, **fields)


def write_json(out: str | Path, **fields) -> None:
    """result.json alone, in the folder `out` (created if need be)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(fields, indent=2))


def versions(tool_package: str) -> dict[str, str]:
    """Installed versions of the peer's package, transformers and torch, in the venv this runs in."""
    from importlib.metadata import version

    return {p: version(p) for p in (tool_package, "transformers", "torch")}


# Everything offline and quiet: the peers load the local model folder, never the hub.
PEER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "disabled",
}


def run_peer_script(tool: str, command: list[str], timeout: float) -> bool:
    """Run a peer's script (started by the main benchmark, in the peer's venv); on failure print its last lines."""
    env = {**os.environ, **PEER_ENV}
    print(f"[{tool}] running {' '.join(command[:2])} ...", flush=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        print(f"[{tool}] FAILED (exit {done.returncode}); last lines:\n{tail}")
    return done.returncode == 0


# The one prompt pair of the activation-patching benchmark (`patch_sweep.py` and its peer `tl_patching.py`): the two
# prompts must tokenise to the same length, the answers to one token each.
PATCH_PAIR = {
    "clean": "The capital of France is",
    "corrupted": "The capital of Italy is",
    "answer": " Paris",
    "wrong": " Rome",
}
