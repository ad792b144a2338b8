"""GGUF load time, first (de-quantize + write the cache) vs second (read the cached safetensors folder).

Each load runs in a fresh Python process against an empty temporary MODELRECON_CACHE, so nothing is shared but the
disk cache under test. Usage: .venv/bin/python benchmarks/load_cache.py [--model smollm2-135m] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = """
import sys, time
import modelrecon
start = time.perf_counter()
modelrecon.load(sys.argv[1])
print(time.perf_counter() - start)
"""


def timed_load(model: str, cache: str) -> float:
    env = {**os.environ, "MODELRECON_CACHE": cache, "TRANSFORMERS_VERBOSITY": "error"}
    out = subprocess.run([sys.executable, "-c", CHILD, model], env=env, check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    firsts, seconds = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            firsts.append(timed_load(args.model, cache))
            seconds.append(timed_load(args.model, cache))
    first, second = statistics.median(firsts), statistics.median(seconds)
    print(f"model {args.model}, {args.repeats} repeats, times inside the process after import (median)")
    print(f"first load (de-quantize + cache): {first:7.2f} s   runs {', '.join(f'{t:.2f}' for t in firsts)}")
    print(f"second load (cached folder):      {second:7.2f} s   runs {', '.join(f'{t:.2f}' for t in seconds)}")
    print(f"speed-up: {first / second:.1f}x")


if __name__ == "__main__":
    main()
