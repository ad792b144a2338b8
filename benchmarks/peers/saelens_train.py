"""Peer of `train_throughput_vs_saelens.py`: SAELens's own trainer on the cached activations, timed.

Runs in a venv with `sae-lens` 6.x (not modelrecon). Reads the activations `[tokens, d_in]` from the safetensors file
written by the main benchmark (already shuffled), builds a `TopKTrainingSAE` (its defaults: decoder rows initialised
to norm 0.1, the encoder their transpose, pre-activations rescaled by the decoder norms, the AuxK loss on with
coefficient 1, no activation normalisation, a dense decoder unless `--sparse`, which also turns
`rescale_acts_by_decoder_norm` off: with it on, the sparse decoder's backward pass fails on the CPU), and trains it
with `SAETrainer.fit()`
(Adam, constant learning rate, gradient clipping at norm 1, as SAELens does) for `--steps` steps on consecutive
`--batch-size`-row slices of the activations, cycling. The data provider records the time of each batch it hands
out: throughput counts the steps after the first `--warmup` ones (from the moment the trainer asks for batch
`warmup + 1` until `fit()` returns). FVU and MSE on the last `--eval-rows` rows of the cache are measured before and
after training. Writes `result.json`.

The batches, the timing and the reconstruction figures are defined here once and imported by the main benchmark
(modelrecon's side), so both sides read the same rows in the same order and are measured the same way.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402


class Batches:
    """Consecutive `batch_size`-row slices of `acts` (cycling), with the time each one was handed out."""

    def __init__(self, acts: torch.Tensor, batch_size: int) -> None:
        if len(acts) < batch_size:
            raise SystemExit(f"the cache has {len(acts)} rows, fewer than one batch of {batch_size}")
        self.acts, self.batch_size, self.at, self.times = acts, batch_size, 0, []
        self.per_epoch = len(acts) // batch_size

    def take(self) -> torch.Tensor:
        i = self.at % self.per_epoch
        self.at += 1
        self.times.append(time.perf_counter())
        return self.acts[i * self.batch_size : (i + 1) * self.batch_size]

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> torch.Tensor:
        return self.take()

    def throughput(self, warmup: int, end: float) -> dict:
        """Tokens per second over the steps after the first `warmup` (each step starts when it takes its batch; the
        last ends at `end`), and the median step."""
        marks = [*self.times[warmup:], end]
        steps = [b - a for a, b in zip(marks[:-1], marks[1:], strict=True)]
        seconds = end - self.times[warmup]
        return {"timed_steps": len(steps), "timed_seconds": seconds, "tokens_per_s": len(steps) * self.batch_size /
                seconds, "median_step_s": sorted(steps)[len(steps) // 2], "step_seconds": steps}  # fmt: skip


def reconstruction(recon: torch.Tensor, x: torch.Tensor) -> dict:
    """FVU (squared error over the variance around the batch mean) and MSE (mean over tokens and dimensions)."""
    error = (recon - x).double().pow(2).sum()
    return {"fvu": float(error / (x.double() - x.double().mean(0)).pow(2).sum()), "mse": float(error / x.numel())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--activations", required=True, help="safetensors file with `activations` [tokens, d_in]")
    parser.add_argument("--out", required=True, help="folder for result.json")
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--k", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--steps", type=int, required=True, help="training steps in all, warm-up included")
    parser.add_argument("--warmup", type=int, required=True, help="first steps left out of the timing")
    parser.add_argument("--dead-window", type=int, required=True, help="steps without firing before a latent is dead")
    parser.add_argument("--eval-rows", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--sparse", action="store_true", help="use_sparse_activations (a COO decoder), rescale_acts_by_decoder_norm off"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from importlib.metadata import version

    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from safetensors.torch import load_file

    acts = load_file(args.activations)["activations"]
    held = acts[-args.eval_rows :]
    dead_counts: list[int] = []

    class CountingTopKSAE(TopKTrainingSAE):
        """SAELens's TopK training SAE, counting the dead latents it is handed each step (one sum of a bool mask)."""

        def calculate_topk_aux_loss(self, sae_in, sae_out, hidden_pre, dead_neuron_mask):
            dead_counts.append(0 if dead_neuron_mask is None else int(dead_neuron_mask.sum()))
            return super().calculate_topk_aux_loss(sae_in, sae_out, hidden_pre, dead_neuron_mask)

    torch.manual_seed(args.seed)
    config = TopKTrainingSAEConfig(d_in=acts.shape[1], d_sae=args.width, k=args.k, dtype="float32", device="cpu",
                                   use_sparse_activations=args.sparse,
                                   rescale_acts_by_decoder_norm=not args.sparse)  # fmt: skip
    sae = CountingTopKSAE(config)
    with torch.no_grad():
        before = reconstruction(sae(held), held)
    batches = Batches(acts, args.batch_size)
    # lr_end: what LanguageModelSAERunnerConfig sets (lr / 10); the constant schedule ignores it
    trainer_config = SAETrainerConfig(total_training_samples=args.steps * args.batch_size,
                                      train_batch_size_samples=args.batch_size, lr=args.lr, lr_end=args.lr / 10,
                                      dead_feature_window=args.dead_window, device="cpu")  # fmt: skip
    trainer = SAETrainer(cfg=trainer_config, sae=sae, data_provider=batches)
    trainer.fit()
    end = time.perf_counter()
    if batches.at != args.steps:
        raise SystemExit(f"SAETrainer took {batches.at} batches for {args.steps} steps")
    sae.eval()
    with torch.no_grad():
        after = reconstruction(sae(held), held)
    write_json(
        args.out,
        tool="SAELens",
        versions={p: version(p) for p in ("sae-lens", "torch")},
        threads=torch.get_num_threads(),
        dictionary=f"{type(sae).__mro__[1].__name__} (use_sparse_activations={args.sparse}, "
        f"rescale_acts_by_decoder_norm={not args.sparse})",
        parameters=sum(p.numel() for p in sae.parameters()),
        parameter_shapes={name: list(p.shape) for name, p in sae.named_parameters()},
        before=before,
        after=after,
        dead_per_step=dead_counts,
        **batches.throughput(args.warmup, end),
    )


if __name__ == "__main__":
    main()
