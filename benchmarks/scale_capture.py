"""Capture on a local Ray cluster against one process: throughput with 1 and 2 workers, and Ray's fixed overhead.

The same prompts (batches of 8 x 128 tokens, every resid_post of smollm2-135m in fp16) are captured
1. in this process (`modelrecon.capture`, torch using every core),
2. on a local Ray cluster of this machine's CPUs with 1 worker (all CPUs) and with 2 workers (half each),
   each worker loading the model by name (as `modelrecon capture --ray` does).
Each Ray time is split into start-up (actors created and the model loaded: the time to the first finished segment
minus one segment's compute) and the whole run; every cube is checked equal to the single-process one with the
same threads per process (bit for bit) or to within float rounding (other thread counts).

Usage: .venv/bin/python benchmarks/scale_capture.py [--tokens 8192] [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

from cube_capture import make_prompts

SETTINGS = dict(sites=["layers.*.resid_post"], dtype="float16", batch_size=8, context_length=128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    import ray
    import torch

    import modelrecon as mr
    from modelrecon.scale.capture import capture_on_ray
    from modelrecon.scale.cluster import connect

    cpus = os.cpu_count() or 1
    prompts = make_prompts(max(1, args.tokens // 128))
    model = mr.load("smollm2-135m")
    model.weights_sha256()
    work = tempfile.mkdtemp()
    try:
        times = []
        for r in range(args.repeats):
            start = time.perf_counter()
            single = mr.capture(model, prompts, f"{work}/single{r}.zarr", progress=False, **SETTINGS)
            times.append(time.perf_counter() - start)
        n_tokens = single.n_tokens
        base = n_tokens / statistics.median(times)
        print(f"{n_tokens} tokens, {cpus} CPUs, torch threads {torch.get_num_threads()}")
        print(f"one process:            {base:8,.0f} tok/s  ({statistics.median(times):.1f} s)")
        start = time.perf_counter()
        connect("local", num_cpus=cpus)
        print(f"ray.init (local cluster): {time.perf_counter() - start:.1f} s")
        for workers in (1, 2):
            runs = []
            for r in range(args.repeats):
                first: list[float] = []
                out = f"{work}/ray{workers}-{r}.zarr"
                start = time.perf_counter()
                cube = capture_on_ray("smollm2-135m", prompts, out, workers=workers, progress=False,
                                      on_segment=lambda *_, first=first: first.append(time.perf_counter()),
                                      **SETTINGS)  # fmt: skip
                total = time.perf_counter() - start
                runs.append((total, first[0] - start if first else total))
                same_threads = (cpus // workers) == torch.get_num_threads()
                a, b = cube.get("resid_post"), single.get("resid_post")
                if same_threads:
                    assert np.array_equal(a, b), "not bit-identical"
                else:
                    assert np.abs(a.astype(np.float32) - b.astype(np.float32)).max() < 1e-2
                shutil.rmtree(out)
            total, to_first = (statistics.median(x) for x in zip(*runs, strict=True))
            print(
                f"ray, {workers} worker(s) x {cpus // workers} CPU: {n_tokens / total:8,.0f} tok/s  ({total:.1f} s, "
                f"{n_tokens / total / base:.2f}x one process; first segment after {to_first:.1f} s; "
                f"{'bit-identical' if same_threads else 'equal to float rounding'})"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        ray.shutdown()


if __name__ == "__main__":
    main()
