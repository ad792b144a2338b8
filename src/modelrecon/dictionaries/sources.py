"""Where training activations come from: a cube on disk, or the model itself run on a text corpus.

Both yield `(x, y)` batches, `[batch, layer, d_in]` inputs and `[batch, layer, d_out]` targets, in an order fixed by
the seed, and can save and restore their position exactly (`state` / `restore`), so that a killed training run
resumes with the very batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from modelrecon.errors import BadInputError
from modelrecon.models.model import Model


class CubeSource:
    """Batches from a cube's stored sites. Tokens are read a block at a time (`block_tokens`, consecutive), each block
    shuffled; the block order is a seeded permutation per epoch."""

    def __init__(self, cube, input_kind: str, output_kind: str, layers: list[int], batch_size: int, seed: int = 0,
                 block_tokens: int = 65536) -> None:  # fmt: skip
        for kind in (input_kind, output_kind):
            if kind not in cube.site_kinds:
                raise BadInputError(
                    f"the cube has no {kind!r} sites (it has {', '.join(cube.site_kinds)}); capture them with "
                    f"modelrecon capture --sites 'layers.*.{kind}'"
                )
        self.cube, self.kinds, self.layers = cube, (input_kind, output_kind), layers
        self.batch_size, self.seed = batch_size, seed
        self.block_tokens = max(batch_size, block_tokens)
        self.n_blocks = max(1, -(-cube.n_tokens // self.block_tokens))
        self.epoch, self.block, self.offset = 0, 0, 0
        self._block_data: tuple[torch.Tensor, torch.Tensor] | None = None
        self._raw: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def _load_block(self) -> tuple[torch.Tensor, torch.Tensor]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_blocks)
        block = int(order[self.block])
        if self._raw is None or self._raw[0] != block:  # a cube of one block is read once
            start = block * self.block_tokens
            rows = slice(start, min(start + self.block_tokens, self.cube.n_tokens))
            self._raw = (
                block,
                *(torch.from_numpy(np.asarray(self._read(k, rows), dtype=np.float32)) for k in self.kinds),
            )
        _, x, y = self._raw
        shuffle = torch.from_numpy(np.random.default_rng([self.seed, self.epoch, self.block]).permutation(len(x)))
        return x[shuffle], y[shuffle]

    def _read(self, kind: str, rows: slice) -> np.ndarray:
        return self.cube.get(kind, layers=self.layers, tokens=rows)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys, need = [], [], self.batch_size
        while need:
            if self._block_data is None:
                self._block_data = self._load_block()
            x, y = self._block_data
            take = min(need, len(x) - self.offset)
            xs.append(x[self.offset : self.offset + take])
            ys.append(y[self.offset : self.offset + take])
            self.offset += take
            need -= take
            if self.offset >= len(x):
                self._block_data, self.offset = None, 0
                self.block += 1
                if self.block == self.n_blocks:
                    self.block, self.epoch = 0, self.epoch + 1
        return torch.cat(xs), torch.cat(ys)

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        return {"epoch": self.epoch, "block": self.block, "offset": self.offset}, {}

    def restore(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.epoch, self.block, self.offset = meta["epoch"], meta["block"], meta["offset"]
        self._block_data = None


class StreamSource:
    """Batches from the model run on a text stream, all layers' sites recorded in one forward pass.

    Windows of tokens are run `model_batch` at a time into a shuffle buffer of at most `buffer_bytes`. Batches are
    gathered from the buffer in a random order; once half of it has been served, the served rows are refilled with
    new activations and a new order is drawn (only the rows a batch takes are copied, never the whole buffer).
    Memory stays bounded and each batch mixes many documents. `windows` makes
    a fresh iterator of token windows: when one runs out, the next epoch starts. The first token of each window
    (often a BOS: an attention sink with outsized activations) is left out.

    With `reuse` r > 1 each new token fills r buffer rows, so it is served r times, in different batches: the model
    runs on 1/r of the tokens trained on (its forward pass is a third to a half of a streamed run's time).

    `buffer_tokens` sets the buffer's size in tokens instead (a source of some of a run's sites that must serve the
    same rows as the whole run's source: layers trained apart, modelrecon.scale.train).
    """

    def __init__(self, model: Model, windows: Callable[[], Iterator[list[int]]], input_sites: list[str],
                 output_sites: list[str], batch_size: int, seed: int = 0, buffer_bytes: int = 512 * 2**20,
                 model_batch: int = 8, reuse: int = 1, buffer_tokens: int | None = None) -> None:  # fmt: skip
        if reuse < 1:
            raise BadInputError(f"reuse must be at least 1 (each token served that many times), got {reuse}")
        self.model, self.make_windows, self.reuse = model, windows, reuse
        self.input_sites, self.output_sites = input_sites, output_sites
        self.batch_size, self.model_batch = batch_size, model_batch
        per_token = 4 * sum(model.site_shape(s)[-1] for s in input_sites + output_sites)
        self.buffer_tokens = buffer_tokens or max(2 * batch_size, buffer_bytes // per_token)
        self.half = self.buffer_tokens // 2
        self.generator = torch.Generator().manual_seed(seed)
        self.windows, self.windows_used, self.epochs = windows(), 0, 0
        self.buffer: tuple[torch.Tensor, torch.Tensor] | None = None
        self.carry: tuple[torch.Tensor, torch.Tensor] | None = None  # activations made beyond the last fill
        self.order: torch.Tensor | None = None  # the buffer rows in serving order
        self.served = 0

    def _next_windows(self) -> list[list[int]]:
        chunk = []
        while len(chunk) < self.model_batch:
            window = next(self.windows, None)
            if window is None:
                if not chunk and self.windows_used == 0:
                    raise BadInputError("the text gives no window of tokens; give more text or a shorter context")
                self.windows, self.epochs = self.make_windows(), self.epochs + 1
                if chunk:
                    break
                continue
            chunk.append(window)
        return chunk

    def _activations(self) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self._next_windows()
        self.windows_used += len(chunk)
        return self._run(chunk)

    def _run(self, chunk: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """`x [tokens, layer, d_in]`, `y [tokens, layer, d_out]` of one model batch of windows."""
        from modelrecon.hooks.trace import hooked

        sites = list(dict.fromkeys(self.input_sites + self.output_sites))
        batch = self.model.batch_from_ids(chunk)
        with torch.no_grad(), hooked(self.model, batch, record=sites, dtype=torch.float32) as trace:
            self.model.forward(batch, logits=False)  # no unembedding: training needs none
        x, y = (self._tokens_by_layer(trace.acts, group) for group in (self.input_sites, self.output_sites))
        return x, y

    @staticmethod
    def _tokens_by_layer(acts: dict[str, list[torch.Tensor]], sites: list[str]) -> torch.Tensor:
        """`[tokens, layer, d]` from per-prompt recordings, each prompt's first token left out."""
        prompts = acts[sites[0]]
        out = torch.empty(sum(len(p) - 1 for p in prompts), len(sites), prompts[0].shape[-1], device=prompts[0].device)
        for j, site in enumerate(sites):
            start = 0
            for prompt in acts[site]:
                out[start : start + len(prompt) - 1, j] = prompt[1:]
                start += len(prompt) - 1
        return out

    def _fill(self, rows: torch.Tensor) -> None:
        """New activations into the buffer's `rows` (the surplus of the last model batch first), each new token into
        `reuse` consecutive entries of `rows` (a random order, except at the first fill, which is shuffled anyway)."""
        have, need = 0, -(-len(rows) // self.reuse)
        while have < need:
            x, y = self.carry if self.carry is not None else self._activations()
            self.carry = None
            take = min(len(x), need - have)
            targets = rows[have * self.reuse : (have + take) * self.reuse]
            self.buffer[0][targets] = x[:take].repeat_interleave(self.reuse, 0)[: len(targets)]
            self.buffer[1][targets] = y[:take].repeat_interleave(self.reuse, 0)[: len(targets)]
            if take < len(x):
                self.carry = (x[take:].clone(), y[take:].clone())
            have += take

    def _shuffle(self) -> None:
        self.order = torch.randperm(self.buffer_tokens, generator=self.generator)
        self.served = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.buffer is None:
            x, y = self.carry = self._activations()
            self.buffer = (x.new_empty(self.buffer_tokens, *x.shape[1:]), y.new_empty(self.buffer_tokens, *y.shape[1:]))
            self._fill(torch.arange(self.buffer_tokens))
            self._shuffle()
        elif self.served + self.batch_size > self.half:
            self._fill(self.order[: self.served])
            self._shuffle()
        rows = self.order[self.served : self.served + self.batch_size]
        self.served += self.batch_size
        return self.buffer[0][rows], self.buffer[1][rows]

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        meta = {"windows_used": self.windows_used, "served": self.served,
                "generator": self.generator.get_state().tolist()}  # fmt: skip
        tensors = {}
        if self.buffer is not None:
            tensors |= {"buffer_x": self.buffer[0], "buffer_y": self.buffer[1], "order": self.order}
        if self.carry is not None:
            tensors |= {"carry_x": self.carry[0], "carry_y": self.carry[1]}
        return meta, tensors

    def restore(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Back to a saved position: the text already used is skipped (tokenised, not run through the model)."""
        self.windows, self.windows_used, self.epochs = self.make_windows(), 0, 0
        while self.windows_used < meta["windows_used"]:
            if next(self.windows, None) is None:
                self.windows, self.epochs = self.make_windows(), self.epochs + 1
                continue
            self.windows_used += 1
        self.generator.set_state(torch.tensor(meta["generator"], dtype=torch.uint8))
        self.served = meta["served"]
        device = self.model.device  # the buffer lives with the model (a checkpoint is read to the host)
        self.buffer = (
            (tensors["buffer_x"].to(device), tensors["buffer_y"].to(device)) if "buffer_x" in tensors else None
        )
        self.order = tensors.get("order")
        self.carry = (tensors["carry_x"], tensors["carry_y"]) if "carry_x" in tensors else None
