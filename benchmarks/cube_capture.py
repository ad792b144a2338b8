"""Activation-cube capture on smollm2-135m: throughput against the plain forward, bounded memory, size on disk.

1. Throughput: the same prompts (batches of 8 x 128 tokens) through the plain forward pass and through `capture` of
   every resid_post in fp16, alternated in one process; ratio of tokens/s (goal >= 0.9: writing overlaps compute).
   The plain pass is the base model without the unembedding, which a capture of resid_post does not run either.
2. Memory: capture of N and of 4N tokens, each in a fresh process; peak RSS (goal: differ by < 20%), and the growth
   above the RSS with the model loaded.
3. Size on disk per token.

Usage: .venv/bin/python benchmarks/cube_capture.py [--tokens 2048] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

WORDS = (
    "the of and to in is was for on that with as by at from his her their it an be this which or are had not but "
    "city river king paper light water music garden table window winter summer history science village market "
    "mountain language machine student teacher morning evening capital country ocean forest island bridge"
).split()


def make_prompts(n_prompts: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(200)) for _ in range(n_prompts)]


CHILD = r"""
import json, resource, sys, time
import modelrecon as mr
from cube_capture import make_prompts
n_prompts, out = int(sys.argv[1]), sys.argv[2]
model = mr.load("smollm2-135m")
base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cube = mr.capture(model, make_prompts(n_prompts), out, sites=["layers.*.resid_post"], dtype="float16",
                  batch_size=8, context_length=128, progress=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
writer = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the writer process (it has exited)
print(json.dumps({"tokens": cube.n_tokens, "base_kb": base_rss, "peak_kb": peak, "writer_kb": writer,
                  "bytes": cube.size_on_disk()}))
"""


def memory_run(n_prompts: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "TRANSFORMERS_VERBOSITY": "error",
            "PYTHONPATH": os.path.dirname(os.path.abspath(__file__)),
        }
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(n_prompts), f"{tmp}/c.zarr"],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])


def throughput(n_prompts: int, repeats: int) -> tuple[float, float, int]:
    import torch

    import modelrecon as mr

    model = mr.load("smollm2-135m")
    model.weights_sha256()  # a one-off 0.5 s per loaded model that every capture records; not per-token cost
    prompts = make_prompts(n_prompts)
    ids = [model.encode(p)[:128] for p in prompts]
    n_tokens = sum(len(i) for i in ids)
    plain_times, capture_times = [], []
    with torch.inference_mode():
        model.forward(model.batch_from_ids(ids[:8]), logits=False)  # warm-up
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.inference_mode():
            for b in range(0, len(ids), 8):
                model.forward(model.batch_from_ids(ids[b : b + 8]), logits=False)
        plain_times.append(time.perf_counter() - start)
        tmp = tempfile.mkdtemp()
        start = time.perf_counter()
        mr.capture(
            model,
            prompts,
            f"{tmp}/c.zarr",
            sites=["layers.*.resid_post"],
            dtype="float16",
            batch_size=8,
            context_length=128,
            progress=False,
        )
        capture_times.append(time.perf_counter() - start)
        shutil.rmtree(tmp)
    return n_tokens / statistics.median(plain_times), n_tokens / statistics.median(capture_times), n_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="N for the memory test (multiple of 128)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import torch

    print(f"torch threads: {torch.get_num_threads()}, cpu count: {os.cpu_count()}")
    n_prompts = max(1, args.tokens // 128)
    plain, captured, n_tokens = throughput(n_prompts * 2, args.repeats)
    print(
        f"throughput over {n_tokens} tokens (median of {args.repeats}): plain forward {plain:,.0f} tok/s, "
        f"capture all resid_post fp16 {captured:,.0f} tok/s, ratio {captured / plain:.3f}"
    )
    small, large = memory_run(n_prompts), memory_run(4 * n_prompts)
    for label, run in (("N", small), ("4N", large)):
        print(
            f"memory {label:>2} = {run['tokens']:>6} tokens: peak RSS {run['peak_kb'] / 1024:,.0f} MiB "
            f"(model loaded: {run['base_kb'] / 1024:,.0f} MiB, "
            f"growth {(run['peak_kb'] - run['base_kb']) / 1024:,.0f} MiB; writer process peak "
            f"{run['writer_kb'] / 1024:,.0f} MiB, mostly the model's pages it shares after the fork)"
        )
    print(f"peak RSS 4N / N: {large['peak_kb'] / small['peak_kb']:.3f} (goal < 1.20)")
    print(
        f"size on disk: {large['bytes'] / large['tokens']:,.0f} bytes/token for 30 x 576 fp16 values "
        f"({30 * 576 * 2:,} bytes raw)"
    )


if __name__ == "__main__":
    main()
