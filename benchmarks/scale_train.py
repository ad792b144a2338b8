"""Dictionary training on Ray: training tokens/s of one process without Ray against Ray Train with 1 and 2 workers
on a local Ray cluster of 2 CPUs (`modelrecon.scale.train.train_on_ray`), on the embedded smollm2-135m.

Every run trains the same dictionaries: TopK SAEs (`--width`, k 32) on each layer of `--site`, streamed from the
model on the shipped sample corpus (windows of 128 tokens), `--tokens` tokens in batches of `--batch-size`, seed 0, a
shuffle buffer of 4 batches (so the model runs from the first step). Runs, in this order:
- `one process`: `train_on_model` in this process (torch's default threads: one per core), the model loaded first;
- `ray data xN`: `train_on_ray(mode="data")` with N workers (N = 1: one worker with both CPUs; N = 2: one CPU each,
  each runs the model on half of the model batches and trains on half of every batch, gradients all-reduced);
- `ray layers x2` (with `--modes data,layers`): each of 2 workers trains half of the layers (each runs the whole model).
Each Ray worker loads the model by name (from the cache the first load made). Columns:
- `train tok/s`: tokens / training time, model runs included (one process: the wall time of `train_on_model`; Ray:
  the slowest worker's time from its model being loaded to its dictionaries being done, as the run records it in
  `provenance["ray"]["train_seconds"]`);
- `end-to-end tok/s`: tokens / the wall time of the whole call (Ray: Ray Train starting its controller and workers,
  each worker importing torch and loading the model, the dictionaries coming back);
- `FVU`: the mean over layers on 2,048 held-out tokens (another seed's batch): the runs must train alike (data
  parallel equals one process up to rounding; layers mode up to ~1e-7).
The local cluster is started first (not timed). Ray runs its workers at niceness 15: on cores shared with other work
they get less of them than the one-process run at 0; `--nice 15` runs this script at 15 too (set after starting Ray,
whose processes would inherit it). Two threads at a low priority on busy cores fare badly (measured: one process at
15 with a load average of 3-4 on two cores, 72 tok/s, against 390 for two one-thread workers), so the comparison only
means something on otherwise idle cores: the load average is printed before and after.

Usage: .venv/bin/python benchmarks/scale_train.py [--tokens 8192] [--site 'layers.[0-3].resid_post']
    [--modes data,layers]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

MODEL = "smollm2-135m"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--site", default="layers.[0-3].resid_post")
    parser.add_argument("--modes", default="data", help="Ray modes to run: data (x1 and x2), and layers (x2)")
    parser.add_argument("--nice", type=int, default=0, help="this process's niceness (Ray's workers run at 15)")
    args = parser.parse_args()

    import modelrecon
    from modelrecon.dictionaries.train import (
        TrainOptions,
        activation_source,
        dictionary_configs,
        dictionary_loss,
        train_on_model,
    )
    from modelrecon.scale.cluster import connect
    from modelrecon.scale.train import train_on_ray

    connect("local", num_cpus=2)
    os.nice(max(0, args.nice - os.nice(0)))  # after Ray started (its workers run at 15 above its own niceness)
    model = modelrecon.load(MODEL)
    layers = len(model.resolve_sites(args.site))
    options = TrainOptions(tokens=args.tokens, batch_size=args.batch_size, lr=1e-3, seed=0)
    buffer_bytes = 4 * args.batch_size * 4 * model.d_model * 2 * layers  # 4 batches of x and y, fp32
    common = dict(activation="topk", k=32, context_length=128, buffer_bytes=buffer_bytes)
    print(f"{MODEL}: TopK SAEs (width {args.width}, k 32) on {args.site} ({layers} layers), {args.tokens:,} tokens "
          f"in batches of {args.batch_size}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")  # fmt: skip

    # the held-out tokens, made first: this also runs the model once before anything is timed (its weights paged in)
    configs = dictionary_configs(model, "sae", args.site, args.width, options, k=32)
    x, y = next(activation_source(model, configs, TrainOptions(batch_size=2048, seed=9), context_length=128,
                                  buffer_bytes=buffer_bytes))  # fmt: skip

    def fvu(dictionaries) -> float:
        dead = torch.zeros(1, args.width, dtype=torch.bool)
        with torch.no_grad():
            values = [dictionary_loss(d, x[:, i : i + 1], y[:, i : i + 1], options, dead)[1]["fvu"]
                      for i, d in enumerate(dictionaries)]  # fmt: skip
        return sum(values) / len(values)

    rows = []
    started = time.perf_counter()
    single = train_on_model(model, "sae", args.site, args.width, options, progress=False, **common)
    seconds = time.perf_counter() - started
    rows.append(("one process", seconds, seconds, fvu(single)))
    print(f"  one process done in {seconds:.0f} s", flush=True)

    runs = [("data", 1), ("data", 2)] + ([("layers", 2)] if "layers" in args.modes.split(",") else [])
    for mode, workers in runs:
        started = time.perf_counter()
        trained = train_on_ray(MODEL, "sae", args.site, args.width, options, ray_address="local", workers=workers,
                               mode=mode, device="cpu", **common)  # fmt: skip
        wall = time.perf_counter() - started
        train_seconds = trained[0].config.provenance["ray"]["train_seconds"]
        rows.append((f"ray {mode} x{workers}", train_seconds, wall, fvu(trained)))
        print(f"  ray {mode} x{workers} done in {wall:.0f} s", flush=True)

    print(f"\n{'run':<16} {'train tok/s':>12} {'end-to-end tok/s':>17} {'FVU':>8}")
    for name, train_seconds, wall, value in rows:
        print(f"{name:<16} {args.tokens / train_seconds:>12.0f} {args.tokens / wall:>17.0f} {value:>8.4f}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
