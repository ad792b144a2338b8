"""Dictionary training throughput against SAELens: tokens/s of the same TopK SAE trained on the same activations.

Activations: the embedded `smollm2-135m` run over the shipped sample corpus (windows of 128 tokens, the first token
of each left out, as `StreamSource` does), `--site` recorded in fp32, `--tokens` of them shuffled once (seed 0) and
saved to a safetensors file in `--cache-dir` (made once, then reused). No model runs during training.

Both trainers then train a TopK SAE (d_in 576, each `--configs` width:k) on consecutive `--batch-size`-row slices of
that tensor, in memory, cycling, with Adam at the same constant learning rate, the same seed and the same rule for
dead latents (those AuxK tries to revive): a latent is dead once it has not fired in the last w + 1 batches, for each
w of `--dead-windows` (a run each; by default 1000, SAELens's default window, which keeps AuxK off in runs this short,
and 0, which counts every latent that did not fire in the previous batch, so AuxK runs whenever a side has such
latents; the tables give how many each side had, as the two sides then need not do the same work):
- modelrecon: `modelrecon.dictionaries.train` with `DictionaryConfig("sae", 576, 576, width, "topk", k)` and
  `TrainOptions(decay_fraction=0)` (no learning-rate decay), its defaults otherwise (AuxK weight 1/32 over the
  dead latents' top d_in / 2, decoder rows renormalised after every step, inputs scaled to a mean squared norm of
  d_in), from a small in-memory source; in a process of its own (this script with `--worker`).
- SAELens: `TopKTrainingSAE` and `SAETrainer.fit()` in a peer venv (`peers/saelens_train.py`): its defaults (AuxK
  weight 1 over the dead latents' top d_in / 2, gradient clipping, a dense decoder; `--saelens-sparse` adds a run
  of each configuration with `use_sparse_activations`, its sparse (COO) decoder, which on the CPU only trains with
  `rescale_acts_by_decoder_norm=False`: with the default True its backward pass fails, "aten::view" has no SparseCPU
  kernel).
Each side runs `--steps` steps in a fresh process; the first `--warmup` steps are left out of the timing, which runs
from the moment the trainer asks for the next batch until `train()` / `fit()` returns. The sides alternate over
`--rounds` rounds (the order flips each round: this machine's speed drifts over minutes) and the medians of each
side's tokens/s are compared. Both sides report their parameter counts and FVU and MSE on the last `--eval-rows`
rows of the cache before and after training (rows they also trained on: this checks that both train, it does not
measure generalisation), and how many latents were dead at each step.

Run: `make interop-env && .venv/bin/python benchmarks/train_throughput_vs_saelens.py --threads 2`
(SAELens 6.54 in `.bench-venvs/interop`; `--saelens-sparse` adds its sparse decoder). Caching the activations runs the
model over 65,536 tokens once (137 s on two quiet cores); the default run then takes about 5 minutes (24 training
processes; 7 minutes for 36 with `--saelens-sparse`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch
from safetensors.torch import load_file, save_file

from capture_overhead import ROOT, CpuUse, add_run_arguments, start_run
from peers.common import PEER_ENV, run_peer_script, write_json
from peers.saelens_train import Batches, reconstruction

HERE = Path(__file__).resolve().parent
MODEL = "smollm2-135m"


def cache_activations(path: Path, site: str, tokens: int, seed: int) -> None:
    """`tokens` activations of `site` over the sample corpus, shuffled, to `path` (`activations` [tokens, d])."""
    from modelrecon import hooked, load
    from modelrecon.corpus import read_texts, token_stream

    model = load(MODEL)
    windows = token_stream(read_texts("sample"), model.tokenizer, 128)
    parts, have, started = [], 0, time.perf_counter()
    while have < tokens:
        chunk = list(itertools.islice(windows, 8))
        if not chunk:
            raise SystemExit(f"the sample corpus gives only {have} tokens; ask for fewer with --tokens")
        batch = model.batch_from_ids(chunk)
        with torch.no_grad(), hooked(model, batch, record=[site], dtype=torch.float32) as trace:
            model.forward(batch, logits=False)
        parts += [prompt[1:] for prompt in trace.acts[site]]  # the first token (BOS, an attention sink) left out
        have += sum(len(prompt) - 1 for prompt in trace.acts[site])
    x = torch.cat(parts)[:tokens]
    x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))].contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"activations": x}, str(path), metadata={"model": MODEL, "site": site, "shuffle_seed": str(seed)})
    print(f"cached {len(x):,} activations of {MODEL} {site} in {time.perf_counter() - started:.0f} s: {path}")


def worker(args: argparse.Namespace) -> None:
    """modelrecon's side, in its own process: the same batches, timing and figures as the peer."""
    import importlib

    from modelrecon.dictionaries import Dictionary, DictionaryConfig
    from modelrecon.dictionaries.train import TrainOptions, train

    training = importlib.import_module("modelrecon.dictionaries.train")  # the package's `train` is the function

    torch.set_num_threads(args.threads)
    acts = load_file(args.activations)["activations"]
    held = acts[-args.eval_rows :]
    dead_counts: list[int] = []
    loss_fn = training.dictionary_loss

    def counting_loss(d, x, y, options, dead):  # counts the dead latents each step (one sum of a bool mask)
        dead_counts.append(int(dead.sum()))
        return loss_fn(d, x, y, options, dead)

    training.dictionary_loss = counting_loss

    class Source(Batches):
        """The batches as `train` takes them: `(x, y)`, each `[batch, 1, d]` (an SAE: y is x)."""

        def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
            x = self.take()[:, None]
            return x, x

        def state(self):
            return {"at": self.at}, {}

        def restore(self, meta, tensors):
            self.at = meta["at"]

    site = (args.site,)
    config = DictionaryConfig("sae", acts.shape[1], acts.shape[1], args.width, "topk", args.k, site, site)
    dead_after = max(1, args.dead_window * args.batch_size)  # dead once it missed dead_window + 1 batches
    options = TrainOptions(tokens=args.steps * args.batch_size, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                           decay_fraction=0.0, dead_after_tokens=dead_after)  # fmt: skip
    initial = Dictionary(config)  # what `train` starts from: initialised on the first batch with the same seed
    initial.initialise(acts[: args.batch_size, None], acts[: args.batch_size, None], seed=args.seed)
    with torch.no_grad():
        before = reconstruction(initial(held)[0], held)
    source = Source(acts, args.batch_size)
    (dictionary,) = train(source, [config], options, progress=False)
    end = time.perf_counter()
    if source.at != args.steps:
        raise SystemExit(f"train took {source.at} batches for {args.steps} steps")
    with torch.no_grad():
        after = reconstruction(dictionary(held)[0], held)
    from importlib.metadata import version

    write_json(
        args.out,
        tool="modelrecon",
        versions={p: version(p) for p in ("modelrecon", "torch")},
        threads=torch.get_num_threads(),
        dictionary="Dictionary (topk: the k active decoder rows gathered, embedding_bag)",
        parameters=sum(p.numel() for p in dictionary.parameters()),
        parameter_shapes={name: list(p.shape) for name, p in dictionary.named_parameters()},
        before=before,
        after=after,
        dead_per_step=dead_counts,
        **source.throughput(args.warmup, end),
    )


def run_side(side: str, args: argparse.Namespace, width: int, k: int, window: int, out: Path) -> dict:
    """One training process of one side; its result.json."""
    common = ["--activations", str(args.cache), "--out", str(out), "--width", str(width), "--k", str(k),
              "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--dead-window", str(window), "--eval-rows", str(args.eval_rows),
              "--threads", str(args.threads), "--seed", str(args.seed)]  # fmt: skip
    if side == "modelrecon":
        command = [sys.executable, __file__, "--worker", "--site", args.site, *common]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **PEER_ENV},
                              timeout=args.timeout)  # fmt: skip
        if done.returncode != 0:
            raise SystemExit("[modelrecon] FAILED:\n" + "\n".join((done.stdout + done.stderr).splitlines()[-15:]))
    else:
        command = [str(args.peer_python), str(HERE / "peers" / "saelens_train.py"), *common]
        if side == "SAELens sparse":
            command.append("--sparse")
        if not run_peer_script(side, command, args.timeout):
            raise SystemExit(1)
    return json.loads((out / "result.json").read_text())


def report(results: dict, sides: list[str], warmup: int) -> None:
    """The tables (Markdown) and warnings where the dictionaries differ in size or one did not train."""
    print("\n| SAE (d_in 576) | dead after | side | parameters | tokens/s: median (each round) | median step s | "
          "FVU before -> after | MSE before -> after | dead latents per timed step |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for (spec, window), runs in results.items():
        width, k = spec.split(":")
        for side in sides:
            rs = runs[side]
            rates = [r["tokens_per_s"] for r in rs]
            dead = [n for r in rs for n in r["dead_per_step"][warmup:]]
            print(f"| width {width}, k {k} | {window + 1} missed batches | {side} | {rs[0]['parameters']:,} | "
                  f"**{median(rates):,.0f}** ({', '.join(f'{v:,.0f}' for v in rates)}) | "
                  f"{median(r['median_step_s'] for r in rs):.3f} | {rs[0]['before']['fvu']:.3f} -> "
                  f"{median(r['after']['fvu'] for r in rs):.3f} | {rs[0]['before']['mse']:.4f} -> "
                  f"{median(r['after']['mse'] for r in rs):.4f} | {sum(dead) / max(1, len(dead)):.1f} "
                  f"(max {max(dead, default=0)}) |")  # fmt: skip
    print("\n| SAE (d_in 576) | dead after | " + " | ".join(f"modelrecon ÷ {s}" for s in sides[1:]) + " |")
    print("|---|---|" + "---|" * (len(sides) - 1))
    for (spec, window), runs in results.items():
        ours = median(r["tokens_per_s"] for r in runs["modelrecon"])
        ratios = [ours / median(r["tokens_per_s"] for r in runs[s]) for s in sides[1:]]
        width, k = spec.split(":")
        print(f"| width {width}, k {k} | {window + 1} missed batches | "
              + " | ".join(f"**{v:.2f}**" for v in ratios) + " |")  # fmt: skip
    for (spec, window), runs in results.items():
        counts = {side: runs[side][0]["parameters"] for side in sides}
        if len(set(counts.values())) != 1:
            print(f"WARNING: {spec} (window {window}): parameter counts differ: {counts}")
        for side in sides:
            if any(r["after"]["fvu"] >= r["before"]["fvu"] for r in runs[side]):
                print(f"WARNING: {spec} (window {window}): {side} did not lower its FVU in every run")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    default_peer = ROOT / ".bench-venvs" / "interop" / "bin" / "python"
    parser.add_argument("--peer-python", type=Path, default=default_peer, help="python of a venv with sae-lens")
    parser.add_argument("--site", default="layers.6.mlp.in", help=f"the {MODEL} site whose activations are cached")
    parser.add_argument("--tokens", type=int, default=65_536, help="activations cached")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "modelrecon-bench")
    parser.add_argument("--configs", nargs="+", default=["2048:32", "512:16"], help="width:k of each TopK SAE")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=12, help="training steps per process, warm-up included")
    parser.add_argument("--warmup", type=int, default=3, help="first steps of each process left out of the timing")
    parser.add_argument("--dead-windows", type=int, nargs="+", default=[1000, 0],
                        help="dead: missed this many batches besides the last (a run each)")  # fmt: skip
    parser.add_argument("--eval-rows", type=int, default=4096, help="rows (the cache's last) for FVU before and after")
    parser.add_argument("--rounds", type=int, default=3, help="processes per side and configuration, alternating")
    parser.add_argument("--saelens-sparse", action="store_true", help="also SAELens with its sparse decoder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--json", type=Path, help="also write every process's result to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--activations", "--out", "--width", "--k", "--dead-window"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.width, args.k, args.dead_window = int(args.width), int(args.k), int(args.dead_window)
        worker(args)
        return 0
    cpu_use: CpuUse = start_run(args)
    if not args.peer_python.exists():
        print(f"no peer python at {args.peer_python}; `make interop-env` or pass --peer-python")
        return 1
    args.cache = args.cache_dir / f"{MODEL}_{args.site}_{args.tokens}.safetensors"
    if not args.cache.exists():
        cache_activations(args.cache, args.site, args.tokens, args.seed)
    shape = list(load_file(str(args.cache))["activations"].shape)
    print(f"activations: {args.cache} {shape}; batch {args.batch_size}, lr {args.lr}, {args.steps} steps per process "
          f"({args.warmup} untimed), {args.rounds} rounds")  # fmt: skip
    sides = ["modelrecon", "SAELens"] + (["SAELens sparse"] if args.saelens_sparse else [])
    started = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="modelrecon-train-bench-") as temp:
        for window in args.dead_windows:
            for spec in args.configs:
                width, k = (int(v) for v in spec.split(":"))
                runs = {side: [] for side in sides}
                for round_ in range(args.rounds):
                    for side in sides if round_ % 2 == 0 else sides[::-1]:
                        out = Path(temp) / f"{side.replace(' ', '_')}_{width}_{k}_{window}_{round_}"
                        r = runs[side].append(run_side(side, args, width, k, window, out)) or runs[side][-1]
                        print(f"  width {width}, k {k}, dead after {window + 1} missed: {side}: "
                              f"{r['tokens_per_s']:,.0f} tok/s (median step {r['median_step_s']:.3f} s), FVU "
                              f"{r['before']['fvu']:.3f} -> {r['after']['fvu']:.3f}", flush=True)  # fmt: skip
                results[(spec, window)] = runs
    wall = time.perf_counter() - started
    first = next(iter(results.values()))
    versions = ", ".join(f"{side} {first[side][0]['versions']}" for side in sides)
    print(f"\n{versions}; {args.threads} torch threads; {wall:.0f} s of training processes")
    print(cpu_use.report())
    report(results, sides, args.warmup)
    if args.json:
        rows = [{"config": spec, "dead_window": window, "side": side, **r}
                for (spec, window), runs in results.items() for side in sides for r in runs[side]]  # fmt: skip
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
