"""Transcoder quality against build time: the frontier behind `modelrecon transcoders --quality demo|standard`.

Each variant trains a full set of per-layer transcoders for smollm2-135m (all 30 layers, stacked, streamed from the
model) and is then measured on data it never saw:
- per layer on held-out text (`--heldout`, default: the last documents of `--corpus`, which no variant's run
  reaches): FVU, the share of dead latents (never active), and the median latent firing rate;
- its graphs on held-out prompts (`--prompts`, `graph-eval`'s format): replacement, completeness, the error nodes'
  share, the subject's share of input influence, and how often the causal check agrees.

A variant is `name=kind:width:k:tokens:batch:lr:corpus:context:reuse[:decay]` (corpus `sample`, `corpus` for
`--corpus`, or a folder; decay: the share of the run over which the learning rate decays linearly to 0, default 0.2).
`--built name=FOLDER:MINUTES` measures transcoders built elsewhere (e.g. a `modelrecon transcoders --quality` tier)
the same way, with the build time it took there.
Run: `.venv/bin/python benchmarks/transcoder_frontier.py --corpus corpus/ --prompts P.jsonl --variants ... --json OUT`
(minutes per variant: the build's time, plus about 4 s per prompt). Build times are wall-clock on this machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from modelrecon.circuits.evaluate import evaluate_graphs, read_prompts
from modelrecon.circuits.replacement import ReplacementModel
from modelrecon.corpus import read_texts, token_stream
from modelrecon.dictionaries.formats import load_dictionaries, save_dictionaries
from modelrecon.dictionaries.train import TrainOptions, bf16_is_fast, train_on_model
from modelrecon.hooks.trace import hooked
from modelrecon.models import load


def parse_variant(text: str) -> tuple[str, dict]:
    name, spec = text.split("=", 1)
    kind, width, k, tokens, batch, lr, corpus, context, reuse, *decay = spec.split(":")
    return name, {"kind": kind, "width": int(width), "k": int(k), "tokens": int(tokens), "batch": int(batch),
                  "lr": float(lr), "corpus": corpus, "context": int(context), "reuse": int(reuse),
                  "decay": float(decay[0]) if decay else 0.2}  # fmt: skip


def heldout_windows(model, path: Path, tokens: int, context: int = 128) -> list[list[int]]:
    windows, total = [], 0
    for window in token_stream(read_texts(str(path)), model.tokenizer, context):
        windows.append(window)
        total += len(window) - 1
        if total >= tokens:
            break
    return windows


@torch.no_grad()
def layer_stats(model, dictionaries, windows: list[list[int]]) -> list[dict]:
    """Per layer on the held-out windows (first token of each left out): FVU, dead share, median firing rate."""
    clt = dictionaries[0].config.kind == "clt"  # one dictionary over every layer
    n = dictionaries[0].config.n_layers if clt else len(dictionaries)
    inputs, outputs = [f"layers.{i}.mlp.in" for i in range(n)], [f"layers.{i}.mlp.out" for i in range(n)]
    error = torch.zeros(n, dtype=torch.float64)
    sums = torch.zeros(n, model.site_shape(outputs[0])[-1], dtype=torch.float64)
    squares = torch.zeros(n, dtype=torch.float64)
    fired = torch.zeros(n, dictionaries[0].config.width, dtype=torch.float64)
    count = 0
    for start in range(0, len(windows), 8):
        batch = model.batch_from_ids(windows[start : start + 8])
        with hooked(model, batch, record=inputs + outputs, dtype=torch.float32) as trace:
            model.forward(batch, logits=False)
        if clt:
            x_all = torch.stack([torch.cat([p[1:] for p in trace.acts[s]]) for s in inputs], -2)
            y_all, f_all = dictionaries[0](x_all)
        for layer in range(n):
            y = torch.cat([p[1:] for p in trace.acts[outputs[layer]]])
            if clt:
                y_hat, f = y_all[:, layer], f_all[:, layer]
            else:
                y_hat, f = dictionaries[layer](torch.cat([p[1:] for p in trace.acts[inputs[layer]]]))
            error[layer] += (y_hat - y).double().pow(2).sum()
            sums[layer] += y.double().sum(0)
            squares[layer] += y.double().pow(2).sum()
            fired[layer] += (f > 0).double().sum(0)
        count += len(y)
    variance = squares - sums.pow(2).sum(-1) / count
    rates = fired / count
    return [{"layer": i, "fvu": float(error[i] / variance[i]), "dead": float((rates[i] == 0).double().mean()),
             "median_firing": float(rates[i].median())} for i in range(n)]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="*", default=[])
    parser.add_argument("--built", nargs="*", default=[], help="name=FOLDER:MINUTES, transcoders built elsewhere")
    parser.add_argument("--corpus", help="a corpus folder (modelrecon corpus build) for variants and the held-out text")
    parser.add_argument("--heldout", type=Path, help="held-out text (.jsonl/.txt; default: the corpus's tail)")
    parser.add_argument("--heldout-tokens", type=int, default=8192)
    parser.add_argument("--prompts", type=Path, help="graph-eval prompts (default: the shipped set)")
    parser.add_argument("--json", type=Path, required=True, help="rows are appended here as they finish")
    parser.add_argument("--keep", type=Path, help="save each variant's transcoders under this folder")
    args = parser.parse_args()

    torch.set_grad_enabled(True)
    model = load("smollm2-135m")
    heldout = args.heldout
    if heldout is None:  # the corpus's last 200 documents: no variant's run reads that far
        lines = (Path(args.corpus) / "corpus.jsonl").read_text().splitlines()[-200:]
        heldout = args.json.with_suffix(".heldout.jsonl")
        heldout.write_text("\n".join(lines) + "\n")
    windows = heldout_windows(model, heldout, args.heldout_tokens)
    prompts = read_prompts(args.prompts)
    for text in args.variants + args.built:
        if text in args.built:
            name, spec = text.split("=", 1)
            folder, minutes = spec.rsplit(":", 1)
            dictionaries, seconds = load_dictionaries(folder), 60 * float(minutes)
            c = dictionaries[0].config
            v = {"kind": c.kind, "width": c.width, "k": c.k, "tokens": c.provenance.get("tokens"),
                 "corpus": c.provenance.get("data"), "built": folder}  # fmt: skip
            options = TrainOptions(**c.provenance["options"])
        else:
            name, v = parse_variant(text)
            corpus = args.corpus if v["corpus"] == "corpus" else v["corpus"]
            options = TrainOptions(tokens=v["tokens"], batch_size=v["batch"], lr=v["lr"], seed=0, bf16=bf16_is_fast(),
                                   reuse=v["reuse"], decay_fraction=v["decay"])  # fmt: skip
            start = time.perf_counter()
            dictionaries = train_on_model(model, v["kind"], "layers.*.mlp", v["width"], options, k=v["k"],
                                          corpus=corpus, context_length=v["context"])  # fmt: skip
            seconds = time.perf_counter() - start
            if args.keep:
                save_dictionaries(dictionaries, args.keep / name)
        dictionaries = [d.fold_normalisation() for d in dictionaries]
        layers = layer_stats(model, dictionaries, windows)
        report = evaluate_graphs(model, ReplacementModel(model, dictionaries), prompts, name)
        average = report.averages()
        row = {"name": name, **v, "build_seconds": seconds, "bf16": options.bf16,
               "fvu_mean": statistics.mean(r["fvu"] for r in layers), "fvu_max": max(r["fvu"] for r in layers),
               "dead_mean": statistics.mean(r["dead"] for r in layers),
               "median_firing": statistics.median(r["median_firing"] for r in layers),
               **{k: average[k] for k in ("replacement", "completeness", "error_share", "through_features",
                                          "subject_share", "subject_top", "causal_agrees")},
               "layers": layers, "prompts": report.rows}  # fmt: skip
        with args.json.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(
            f"{name}: {seconds / 60:.1f} min, FVU mean {row['fvu_mean']:.3f} max {row['fvu_max']:.3f}, dead "
            f"{row['dead_mean']:.1%}, median firing {row['median_firing']:.2%}; replacement "
            f"{row['replacement']:.3f} completeness {row['completeness']:.3f} errors {row['error_share']:.2f} "
            f"subject {row['subject_share']:.2f} causal {row['causal_agrees']:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
