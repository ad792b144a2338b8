"""Capture on a Ray cluster: one coordinator, many workers, one cube bit-identical to a single-process capture.

The coordinator (the calling process) plans the capture and creates the cube and its metadata once
(`cube.capture.prepare`). The cube's chunks are cut into segments of whole chunks; a pool of actors, each holding
the model, writes segments (`cube.capture.write_tokens`: the capture's own fixed batches, so the values are the
same whichever process computes them), and the coordinator alone records each finished segment in the cube's
`progress.done_chunks`. A worker killed mid-segment is restarted by Ray and its segment run again (a chunk written
twice holds the same bytes). Interrupting the coordinator leaves a cube whose recorded progress is true: running the
same capture again, with or without Ray, writes only the missing segments.

The cube must be where every worker can reach it: a shared folder, or object storage (s3://, gs://, ...).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import zarr

from modelrecon import storage
from modelrecon.cube.capture import finish, prepare, record, write_tokens
from modelrecon.cube.reader import Cube
from modelrecon.errors import CubeError, reason
from modelrecon.models.model import Model
from modelrecon.progress import token_progress
from modelrecon.scale.cluster import LOCAL, connect, worker_cpus


class CaptureWorker:
    """One Ray actor: the model, loaded once (by name on its own machine, or sent as an object), and the plan."""

    def __init__(self, model, plan, location, threads: int, device: str, dtype: str, seed: int) -> None:
        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        if isinstance(model, str):
            from modelrecon.models.loading import load

            model = load(model, device=device, dtype=dtype)
        self.model, self.plan, self.location = model, plan, location

    def write(self, segment: tuple[int, int]) -> tuple[int, int]:
        chunk, n_tokens = self.plan.settings["chunk_tokens"], int(self.plan.offsets[-1])
        start, stop = segment[0] * chunk, min(segment[1] * chunk, n_tokens)
        write_tokens(self.model, self.plan, self.location, start, stop)
        return segment

    def pid(self) -> int:
        return os.getpid()


def segments(pending: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The pending chunk ranges cut into pieces of at most `size` chunks."""
    return [(a, min(a + size, end)) for first, end in pending for a in range(first, end, size)]


def capture_on_ray(
    model: Model | str,
    prompts: str | Sequence[str],
    out: str | Path,
    *,
    address: str | None = LOCAL,
    workers: int | None = None,
    segment_chunks: int | None = None,
    threads: int | None = None,
    device: str = "auto",
    model_dtype: str = "float32",
    progress: bool = True,
    on_segment: Callable[[tuple[int, int], list], None] | None = None,
    **settings,
) -> Cube:
    """`cube.capture.capture` on a Ray cluster, with the same arguments (`settings`) and the same cube.

    model: a Model (sent to every worker through Ray's object store) or a name/folder each worker loads itself
    (with `device` and `model_dtype`; `dtype` is the stored values', as in `capture`).
    workers: actors (default: one per two CPUs of the cluster; one GPU each when the cluster has GPUs).
    segment_chunks: chunks per task (default: about four tasks per worker).
    threads: torch threads per worker (default: its CPUs). The values are bit-identical to `capture` run with the
    same number of torch threads: CPU kernels split some sums by thread, so other thread counts differ by float
    rounding (about 1e-7 relative), as two single-process captures on machines with different core counts do.
    on_segment(segment, actors): called on the coordinator after each recorded segment (progress reporting; the
    tests kill a worker from it).
    """
    ray = connect(address)
    loaded = model
    if isinstance(model, str):
        from modelrecon.models.loading import load

        loaded = load(model, device="cpu", dtype=model_dtype)  # the coordinator plans: tokenizer, weights' hash
    job = prepare(loaded, prompts, out, **settings)
    if job.complete:
        return Cube(job.location)
    n_workers, cpus = worker_cpus(ray, workers)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= n_workers else 0
    if segment_chunks is None:
        pending_chunks = sum(end - first for first, end in job.pending)
        segment_chunks = max(1, -(-pending_chunks // (4 * n_workers)))
    work = segments(job.pending, segment_chunks)
    location = str(Path(job.location).resolve()) if not storage.is_url(job.location) else job.location
    shipped = ray.put(model) if isinstance(model, Model) else model
    actor = ray.remote(num_cpus=cpus, num_gpus=gpus, max_restarts=3, max_task_retries=3)(CaptureWorker)
    pool = [
        actor.remote(
            shipped, job.plan, location, threads or max(1, int(cpus)), device, model_dtype, settings.get("seed", 0)
        )
        for _ in range(min(n_workers, len(work)))
    ]
    group = zarr.open_group(storage.zarr_store(job.location), mode="r+")
    n_tokens = int(job.plan.offsets[-1])
    done_tokens = n_tokens - sum(b - a for a, b in (job.tokens(*r) for r in job.pending))
    in_flight: dict = {}

    def submit(worker) -> None:
        if work:
            segment = work.pop(0)
            in_flight[worker.write.remote(segment)] = (worker, segment)

    try:
        with token_progress(n_tokens, done_tokens, enabled=progress) as advance:
            for worker in pool:  # two segments queued per worker: no idle gap between them
                submit(worker)
                submit(worker)
            while in_flight:
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                worker, segment = in_flight.pop(ready[0])
                try:
                    ray.get(ready[0])
                except Exception as exc:  # a worker failed more often than Ray restarts it, or raised
                    cause = getattr(exc, "cause", None) or exc
                    if isinstance(cause, CubeError):
                        raise cause from None
                    raise CubeError(
                        f"a capture worker failed ({type(cause).__name__}: {reason(cause)}); the cube keeps what "
                        f"was finished: re-run the same command to resume {job.location}"
                    ) from None
                record(group, [list(segment)])
                start, stop = job.tokens(*segment)
                advance(stop - start)
                if on_segment is not None:
                    on_segment(segment, pool)
                submit(worker)
        finish(group)
    finally:
        for worker in pool:
            ray.kill(worker)
    return Cube(job.location)
