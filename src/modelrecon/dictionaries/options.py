"""How a dictionary is trained (`TrainOptions`): plain settings without torch, so the CLI and the tier table
(`modelrecon models`) build them without loading the training code."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainOptions:
    tokens: int = 1_000_000
    batch_size: int = 4096
    lr: float = 1e-3
    l1: float = 1e-3  # relu
    l0: float = 1e-3  # jumprelu
    aux: float = 1 / 32  # topk / batchtopk AuxK weight
    aux_k: int | None = None  # default: half the input width
    dead_after_tokens: int | None = None  # default: a tenth of the run, at least 10 batches
    seed: int = 0
    checkpoint_every: int = 0  # steps; 0: only at the end
    decay_fraction: float = 0.2  # the learning rate decays linearly to 0 over this last part of the run
    bf16: bool = False  # bfloat16 autocast for the streamed forward and the dictionaries (faster where bf16_is_fast)
    reuse: int = 1  # streamed from the model: each token is trained on this many times (the model runs 1/reuse)

    @property
    def steps(self) -> int:
        return max(1, self.tokens // self.batch_size)

    def dead_after(self) -> int:
        return self.dead_after_tokens or max(10 * self.batch_size, self.tokens // 10)
