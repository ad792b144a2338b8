"""Default-transcoder recipe variants: how FVU depends on tokens, batch size and reuse, on a few of smollm2's layers.

The layers' MLP inputs and outputs are streamed from the model once (the same shuffle buffer as training) and kept
in memory; each variant then trains skip transcoders (width 512, TopK 16, lr 2e-3, seed 0) on them through the real
`StreamSource` buffer logic, with the model's forward replaced by reading the cache, so every variant sees the same
text in the same order and differs only in its options. `reuse` keeps the buffer of the 30-layer run (512 MiB: 3,885
tokens), so repeated tokens come back as soon as they would in the real build. FVU is measured on the last 2,048
cached tokens (text the runs also trained on: the sample corpus is smaller than a run), which compares variants; it
does not measure generalisation.

Run: `.venv/bin/python benchmarks/transcoder_recipe.py [--layers 3 12 20 29] [--variants 126976:512:1 ...]`
(about 5 minutes of streaming, then 20-40 s per variant on two cores).
"""

from __future__ import annotations

import argparse
import time

import torch

from modelrecon.corpus import read_texts, token_stream
from modelrecon.dictionaries.model import DictionaryConfig
from modelrecon.dictionaries.sources import StreamSource
from modelrecon.dictionaries.train import TrainOptions, dictionary_loss, train
from modelrecon.models import load

VARIANTS = ["126976:512:1", "126976:512:2", "126976:512:3", "98304:512:2", "65536:512:1", "65536:512:2",
            "65536:256:2"]  # fmt: skip
HELD = 2048
FULL_RUN_BUFFER = 3885  # tokens in the 512 MiB buffer of all 30 layers' inputs and outputs


class CachedSource(StreamSource):
    """`StreamSource`'s buffer, fed from cached activations in stream order instead of the model."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, reuse: int) -> None:
        self.x, self.y, self.position, self.batch_size, self.reuse = x, y, 0, batch_size, reuse
        self.buffer_tokens, self.half = FULL_RUN_BUFFER, FULL_RUN_BUFFER // 2
        self.generator = torch.Generator().manual_seed(0)
        self.buffer = self.carry = self.order = None
        self.served = self.windows_used = 0

    def _activations(self) -> tuple[torch.Tensor, torch.Tensor]:
        start, self.position = self.position, self.position + 8 * 127  # a model batch: 8 windows of 128, less BOS
        if self.position > len(self.x):
            raise SystemExit("the cache is too short for this variant; raise --cache-tokens")
        return self.x[start : self.position], self.y[start : self.position]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 12, 20, 29])
    parser.add_argument("--variants", nargs="+", default=VARIANTS, help="tokens:batch:reuse[:aux_k]")
    parser.add_argument("--cache-tokens", type=int, default=135_168)
    args = parser.parse_args()

    model = load("smollm2-135m")
    inputs = [f"layers.{i}.mlp.in" for i in args.layers]
    outputs = [f"layers.{i}.mlp.out" for i in args.layers]

    def windows():
        return token_stream(read_texts("sample"), model.tokenizer, 128)

    started = time.perf_counter()
    stream = StreamSource(model, windows, inputs, outputs, 512)
    batches = [next(stream) for _ in range(args.cache_tokens // 512)]
    x, y = (torch.cat([b[i] for b in batches]) for i in (0, 1))
    held_x, held_y, x, y = x[-HELD:], y[-HELD:], x[:-HELD], y[:-HELD]
    print(f"cached {len(x) + HELD} tokens of layers {args.layers} in {time.perf_counter() - started:.0f} s")

    print("| variant | model tokens | FVU " + " / ".join(f"L{i}" for i in args.layers) + " | mean | s |")
    print("|---|---|---|---|---|")
    for variant in args.variants:
        tokens, batch, reuse, *aux_k = (int(v) for v in variant.split(":"))
        configs = [DictionaryConfig("skip-transcoder", 576, 576, 512, "topk", 16, (a,), (b,))
                   for a, b in zip(inputs, outputs, strict=True)]  # fmt: skip
        options = TrainOptions(tokens=tokens, batch_size=batch, lr=2e-3, seed=0, aux_k=aux_k[0] if aux_k else None)
        source = CachedSource(x, y, batch, reuse)
        started = time.perf_counter()
        dictionaries = train(source, configs, options, progress=False)
        seconds = time.perf_counter() - started
        dead = torch.zeros(1, 512, dtype=torch.bool)
        with torch.no_grad():
            fvu = [dictionary_loss(d, held_x[:, [j]], held_y[:, [j]], options, dead)[1]["fvu"]
                   for j, d in enumerate(dictionaries)]  # fmt: skip
        print(f"| {variant} | {source.position:,} | " + " / ".join(f"{v:.3f}" for v in fvu)
              + f" | {sum(fvu) / len(fvu):.3f} | {seconds:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
