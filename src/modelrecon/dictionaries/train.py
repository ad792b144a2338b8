"""Training dictionaries: several layers' dictionaries (or one cross-layer transcoder) from one activation source.

Loss per dictionary, in normalised units (inputs and targets scaled to a mean squared norm of d):
- reconstruction: ||y - ŷ||², summed over the output, mean over tokens and layers (a CLT) or summed over layers
  (per-layer dictionaries, so that a stack of them trains exactly as each layer alone);
- relu: + l1 * sum_i f_i ||W_dec,i|| (the decoder norm keeps the penalty from being dodged by shrinking f);
- jumprelu: + l0 * sum_i H(pre_i - threshold_i) (straight-through gradient for the threshold);
- topk / batchtopk: + aux * AuxK (Gao et al. 2024): the latents dead for `dead_after_tokens` tokens reconstruct the
  remaining error with their top `aux_k` activations, which gives dead latents a gradient again.
TopK and BatchTopK decoders are renormalised to unit rows after every step. BatchTopK's inference threshold is the
running mean of the smallest activation it kept per batch.

Checkpoints (a folder: `state.safetensors` + `state.json`) hold the dictionaries, the optimiser, the dead-
latent counters and the source's position; `train` resumes from one when it exists, and a resumed run ends with the
same weights as an uninterrupted one.

Data-parallel training (`shard=DataShard(rank, world)`, several processes joined by torch.distributed, e.g. on Ray
Train: modelrecon.scale.train) is this same loop: each process gets the same global batches, trains on its part of
each, and the gradients and batch statistics are combined before every optimiser step.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from modelrecon.dictionaries.model import Dictionary, DictionaryConfig, step
from modelrecon.dictionaries.options import TrainOptions
from modelrecon.errors import BadInputError
from modelrecon.files import atomic_folder
from modelrecon.progress import token_progress


@dataclass
class TrainState:
    step: int
    dead_for: list[torch.Tensor]  # per dictionary, tokens since each latent last fired `[layer, width]`
    kept_min_sum: list[torch.Tensor]  # batchtopk: sums of the smallest kept activation per layer
    last: dict  # the last step's loss, fvu, l0, dead fraction (for the progress bar and the report)


def bf16_is_fast(device: torch.device | str = "cpu") -> bool:
    """Whether bfloat16 matmuls are worth it here: on GPUs, and on CPUs that oneDNN runs bf16 on natively (AVX-512
    BF16, AMX: 4.5x float32, measured). With AVX2 alone torch emulates them, about 70x slower than float32 (measured
    on an AMD EPYC)."""
    if torch.device(device).type != "cpu":
        return True
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _layer_slices(dictionaries: list[Dictionary]) -> list[slice]:
    """Which of the source's layers each dictionary reads (per-layer dictionaries one each, a CLT all of its own)."""
    out, start = [], 0
    for d in dictionaries:
        out.append(slice(start, start + d.config.n_layers))
        start += d.config.n_layers
    return out


class DataShard:
    """One process's part of a data-parallel run over `world` processes (torch.distributed initialised): it trains on
    part `rank` of every global batch (`tensor_split`: contiguous rows), and before each optimiser step the gradients
    are averaged over the processes (all-reduce; each loss weighted by its share of the batch, so the average is the
    gradient of the global batch's mean) and the batch statistics combined: which latents fired (the dead-latent
    counters), BatchTopK's threshold (the top k x batch over the whole global batch, as one process would keep) and its
    smallest kept activation. Every process then holds the same dictionaries, the single-process ones up to float
    summation order."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world, self.batch = rank, world, 0

    def split(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's rows of a global batch `x [B, layer, d_in]`, `y [B, layer, d_out]`."""
        self.batch = len(x)
        return x.tensor_split(self.world)[self.rank], y.tensor_split(self.world)[self.rank]

    def weight(self, rows: int) -> float:
        """The loss weight of a part of `rows` rows: 1 when the batch divides evenly."""
        return rows * self.world / self.batch

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """All-reduced mean of the gradients, in one flat buffer (the set with a gradient is the same everywhere)."""
        import torch.distributed as dist

        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(part.view_as(g))

    def reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        """`t` combined over processes by `op` ('max' or 'min'), as float32 (a copy)."""
        import torch.distributed as dist

        out = t.to(torch.float32, copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN)
        return out

    def batch_topk(self, pre: torch.Tensor, k: int) -> torch.Tensor:
        """BatchTopK's training latents `[b, layer, width]` for this part of the batch: per layer, the relu'd
        pre-activations at or above the (k x global batch)-th largest over every process's part (each process sends
        its own top k x batch values: the global ones are among them)."""
        import torch.distributed as dist

        relu = torch.relu(pre)
        keep = k * self.batch
        flat = relu.detach().movedim(-2, 0).flatten(1)  # `[layer, b x width]`
        mine = flat.topk(min(keep, flat.shape[1]), dim=-1).values
        mine = torch.nn.functional.pad(mine, (0, keep - mine.shape[1]), value=-1.0)  # relu values are >= 0
        every = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine)
        threshold = torch.cat(every, -1).topk(keep, dim=-1).values[:, -1]
        return relu * (relu >= threshold[:, None])


def dictionary_loss(d: Dictionary, x: torch.Tensor, y: torch.Tensor, options: TrainOptions, dead: torch.Tensor,
                    shard: DataShard | None = None):  # fmt: skip
    """(loss, figures, latents, pre-activations) for one batch `x [B, layer, d_in]`, `y [B, layer, d_out]` (with
    `shard`, this process's part of a data-parallel batch)."""
    c = d.config
    pre = d.pre_activations(x)
    if c.activation == "topk":  # the decoder rows of the k active latents, not a product with a mostly-zero f
        top = d.top_latents(pre)
        y_hat = d.decode_top(top.indices, top.values, x)
        f = torch.zeros_like(pre).scatter(-1, top.indices, top.values.detach())  # for the figures
    elif c.activation == "batchtopk" and shard is not None:  # the threshold of the whole global batch
        f = shard.batch_topk(pre, c.k)
        y_hat = d.decode(f, x)
    else:
        f = d.activate(pre, training=True)
        y_hat = d.decode(f, x)

    def reduce(per_token_layer: torch.Tensor) -> torch.Tensor:  # `[batch, layer]` -> the loss term
        return per_token_layer.mean() if c.kind == "clt" else per_token_layer.mean(0).sum()

    scale = d.output_scale[:, None]
    error = (y_hat - y) * scale
    loss = reduce(error.pow(2).sum(-1))
    if c.activation == "relu":
        loss = loss + options.l1 * reduce((f * d.decoder_norms()).sum(-1))
    elif c.activation == "jumprelu":
        loss = loss + options.l0 * reduce(step(pre, d.log_threshold.exp(), c.jumprelu_bandwidth).sum(-1))
    elif dead.any():  # AuxK, each layer with its own count: min(aux_k, its dead latents)
        aux_k = (dead.sum(-1)).clamp(max=options.aux_k or max(1, c.d_in // 2))
        masked = torch.where(dead, torch.relu(pre), torch.zeros_like(pre))
        top = masked.topk(int(aux_k.max()), dim=-1)
        kept = top.values * (torch.arange(top.values.shape[-1], device=pre.device) < aux_k[:, None])
        if 8 * top.values.shape[-1] <= c.width:  # few latents: gather their decoder rows (normalised units)
            revived = d.latent_sum(top.indices, kept)
        else:  # many (the default aux_k, half of d_in): the dense product is faster
            revived = d.latent_product(torch.zeros_like(masked).scatter(-1, top.indices, kept))
        loss = loss + options.aux * reduce((revived + error.detach()).pow(2).sum(-1))
    centred = (y - y.mean(0)) * scale
    fvu = error.detach().pow(2).sum((0, -1)) / centred.pow(2).sum((0, -1)).clamp_min(1e-12)  # per layer
    figures = {
        "loss": float(loss.detach()),
        "fvu": float(fvu.mean()),
        "l0": float((f > 0).sum(-1).float().mean()),
    }
    return loss, figures, f, pre


def train(
    source,
    configs: list[DictionaryConfig],
    options: TrainOptions,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
    shard: DataShard | None = None,
    stack: bool | None = None,
) -> list[Dictionary]:
    """Train one dictionary per config on `source`'s batches (`source` yields `x [B, layers, d_in]`, `y [B, layers,
    d_out]`, the configs' layers in order) on `device` (where the source's batches are moved, a no-op when they are
    made there). With `checkpoint` (a folder), the state is saved there every `options.checkpoint_every` steps and
    at the end, and a run resumes from it when it exists. With `shard`, this process trains its part of each batch
    of a data-parallel run (`DataShard`). `stack`: train per-layer dictionaries as one stack (default: when there are
    several and they have one shape; True stacks a single one too, which then runs a larger stack's kernels)."""
    from modelrecon.memory import keep_freed_memory

    keep_freed_memory()  # large per-step temporaries stay in the heap instead of faulting in fresh pages
    torch.manual_seed(options.seed)
    device = torch.device(device)
    dictionaries = [Dictionary(c).to(device) for c in configs]
    stacked = (len(dictionaries) > 1 if stack is None else stack) and _stackable(configs)
    if stacked:  # one set of batched products over every layer instead of a loop over layers
        dictionaries = [Dictionary.stack(dictionaries)]
    slices = _layer_slices(dictionaries)
    params = [p for d in dictionaries for p in d.parameters()]
    optimiser = torch.optim.Adam(params, lr=options.lr, fused=params[0].device.type in ("cpu", "cuda"))
    decay_start = int(options.steps * (1 - options.decay_fraction))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser,
        lambda s: 1.0 if s < decay_start else max(0.0, (options.steps - s) / max(1, options.steps - decay_start)),
    )
    state = TrainState(0, [torch.zeros(d.config.n_layers, d.config.width, device=device) for d in dictionaries],
                       [torch.zeros(d.config.n_layers, device=device) for d in dictionaries], {})  # fmt: skip
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    first = None
    if checkpoint is not None and (checkpoint / "state.json").exists():
        _restore(checkpoint, dictionaries, optimiser, schedule, state, source, device)
    else:
        first = tuple(t.to(device) for t in next(source))
        for d, rows in zip(dictionaries, slices, strict=True):
            d.initialise(first[0][:, rows], first[1][:, rows], seed=options.seed)
    dead_after = options.dead_after()
    fast = torch.autocast(params[0].device.type, dtype=torch.bfloat16, enabled=options.bf16)
    bar = token_progress(options.steps * options.batch_size, done=state.step * options.batch_size, enabled=progress,
                         label="train", unit="tokens", rate_unit="tok")  # fmt: skip
    with fast, bar as advance:
        while state.step < options.steps:
            x, y = first if first is not None else (t.to(device, non_blocking=True) for t in next(source))
            first = None
            xs, ys = (x, y) if shard is None else shard.split(x, y)  # the rows this process trains on
            optimiser.zero_grad()
            total, figures = 0.0, []
            for i, (d, rows) in enumerate(zip(dictionaries, slices, strict=True)):
                dead = state.dead_for[i] > dead_after
                loss, fig, f, _ = dictionary_loss(d, xs[:, rows], ys[:, rows], options, dead, shard)
                if shard is not None and shard.weight(len(xs)) != 1:
                    loss = loss * shard.weight(len(xs))
                total = total + loss
                figures.append(fig)
                fired = (f > 0).any(0)
                if shard is not None:
                    fired = shard.reduce(fired, "max") > 0
                state.dead_for[i] = torch.where(fired, torch.zeros_like(state.dead_for[i]),
                                                state.dead_for[i] + len(x))  # fmt: skip
                if d.config.activation == "batchtopk":
                    kept = torch.where(f > 0, f, torch.full_like(f, float("inf"))).amin(dim=(0, -1)).detach()
                    kept = kept if shard is None else shard.reduce(kept, "min")
                    state.kept_min_sum[i] += torch.where(torch.isinf(kept), torch.zeros_like(kept), kept)
            total.backward()
            if shard is not None:
                shard.average_gradients(params)
            optimiser.step()
            schedule.step()
            state.step += 1
            for i, d in enumerate(dictionaries):
                if d.config.activation in ("topk", "batchtopk"):
                    d.normalise_decoder()
                if d.config.activation == "batchtopk":
                    d.threshold.copy_((state.kept_min_sum[i] / state.step)[:, None].expand_as(d.threshold))
            state.last = {k: sum(f[k] for f in figures) / len(figures) for k in ("loss", "fvu", "l0")}
            if stacked:  # per layer, as the figures of separate dictionaries would read
                state.last["loss"] /= dictionaries[0].config.n_layers
            state.last["dead"] = float(sum((t > dead_after).float().mean() for t in state.dead_for) / len(figures))
            advance(len(x), "  ".join(f"{k} {v:.3g}" for k, v in state.last.items()))
            at_checkpoint = options.checkpoint_every and state.step % options.checkpoint_every == 0
            if checkpoint is not None and (at_checkpoint or state.step == options.steps):
                _save(checkpoint, dictionaries, optimiser, schedule, state, source, options)
    return dictionaries[0].unstack() if stacked else dictionaries


def _stackable(configs: list[DictionaryConfig]) -> bool:
    """Per-layer dictionaries of one kind, shape and activation (they differ only in their sites)."""

    def shape(c: DictionaryConfig) -> DictionaryConfig:
        return replace(c, input_sites=(), output_sites=())

    return all(c.kind != "clt" and shape(c) == shape(configs[0]) for c in configs)


def _save(folder: Path, dictionaries, optimiser, schedule, state: TrainState, source, options: TrainOptions) -> None:
    """The whole training state, written to a temporary folder and swapped in (a kill never leaves half of it)."""
    tensors: dict[str, torch.Tensor] = {}
    for i, d in enumerate(dictionaries):
        tensors |= {f"dict.{i}.{k}": v.detach().contiguous() for k, v in d.state_dict().items()}
        tensors[f"dead.{i}"] = state.dead_for[i]
        tensors[f"kept_min.{i}"] = state.kept_min_sum[i]
    opt = optimiser.state_dict()
    opt_meta = {"param_groups": opt["param_groups"], "steps": {}}
    for index, values in opt["state"].items():
        for key, value in values.items():
            if key == "step":
                opt_meta["steps"][str(index)] = float(value)
            else:
                tensors[f"adam.{index}.{key}"] = value.contiguous()
    source_meta, source_tensors = source.state()
    tensors |= {f"source.{k}": v for k, v in source_tensors.items()}
    meta = {"step": state.step, "last": state.last, "optimiser": opt_meta, "schedule": schedule.state_dict(),
            "source": source_meta, "options": asdict(options)}  # fmt: skip
    with atomic_folder(folder) as temp:
        save_file(tensors, str(temp / "state.safetensors"))
        (temp / "state.json").write_text(json.dumps(meta))


def _restore(folder: Path, dictionaries, optimiser, schedule, state: TrainState, source, device) -> None:
    try:
        meta = json.loads((folder / "state.json").read_text())
        tensors = load_file(str(folder / "state.safetensors"), device=str(device))
    except (OSError, ValueError) as exc:
        raise BadInputError(f"cannot resume from {folder}: {exc}; delete that folder to start over") from exc
    for i, d in enumerate(dictionaries):
        prefix = f"dict.{i}."
        d.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        state.dead_for[i] = tensors[f"dead.{i}"]
        state.kept_min_sum[i] = tensors[f"kept_min.{i}"]
    opt_state: dict = {}
    for key, value in tensors.items():
        if key.startswith("adam."):
            _, index, name = key.split(".", 2)
            opt_state.setdefault(int(index), {})[name] = value
    for index, count in meta["optimiser"]["steps"].items():
        opt_state.setdefault(int(index), {})["step"] = torch.tensor(count)
    optimiser.load_state_dict({"state": opt_state, "param_groups": meta["optimiser"]["param_groups"]})
    schedule.load_state_dict(meta["schedule"])
    source.restore(meta["source"], {k[len("source.") :]: v for k, v in tensors.items() if k.startswith("source.")})
    state.step, state.last = meta["step"], meta["last"]


# --- training on a model ------------------------------------------------------------------------------------------
def site_pairs(model, kind: str, pattern: str) -> list[tuple[str, str]]:
    """(input site, output site) per layer for a site pattern: an SAE reads and writes its own site (e.g.
    `layers.*.resid_post`); transcoders read `mlp.in` and write `mlp.out` of the layers `layers.N.mlp` matches."""
    if kind == "sae":
        return [(site, site) for site in model.resolve_sites(pattern)]
    base = pattern.removesuffix(".in").removesuffix(".out")
    if not base.endswith(".mlp"):
        raise BadInputError(f"a {kind} reads an MLP: give --site layers.N.mlp (or 'layers.*.mlp'), not {pattern!r}")
    return [(site, site.removesuffix(".in") + ".out") for site in model.resolve_sites(base + ".in")]


def train_on_model(
    model,
    kind: str,
    site: str,
    width: int,
    options: TrainOptions,
    *,
    activation: str = "topk",
    k: int | None = 32,
    cube=None,
    corpus: str = "sample",
    context_length: int = 128,
    buffer_bytes: int = 512 * 2**20,
    checkpoint: str | Path | None = None,
    progress: bool = True,
) -> list[Dictionary]:
    """Train dictionaries on a model's activations, from a cube or streamed from the model run on a corpus (all
    layers from one forward pass). A `clt` is one dictionary over every matched layer; other kinds one per layer."""
    configs = dictionary_configs(model, kind, site, width, options, activation=activation, k=k, cube=cube,
                                 corpus=corpus, context_length=context_length)  # fmt: skip
    source = activation_source(model, configs, options, cube=cube, corpus=corpus, context_length=context_length,
                               buffer_bytes=buffer_bytes)  # fmt: skip
    return train(source, configs, options, checkpoint=checkpoint, progress=progress, device=model.device)


def dictionary_configs(
    model,
    kind: str,
    site: str,
    width: int,
    options: TrainOptions,
    *,
    activation: str = "topk",
    k: int | None = 32,
    cube=None,
    corpus: str = "sample",
    context_length: int = 128,
    provenance: dict | None = None,
) -> list[DictionaryConfig]:
    """The configs `train_on_model` trains (checked; their provenance records the model, data and options, and
    `provenance`'s entries): one `clt` over every matched layer, or one dictionary per layer."""
    import datetime

    from modelrecon import __version__

    pairs = site_pairs(model, kind, site)
    inputs, outputs = [p[0] for p in pairs], [p[1] for p in pairs]
    d_in, d_out = model.site_shape(inputs[0])[-1], model.site_shape(outputs[0])[-1]
    provenance = {"model": model.name, "weights_sha256": model.weights_sha256(), "tokens": options.tokens,
                  "data": f"cube {cube.path}" if cube is not None else f"corpus {corpus}", "seed": options.seed,
                  "options": asdict(options), "context_length": context_length, "modelrecon": __version__,
                  "date": datetime.date.today().isoformat()} | (provenance or {})  # fmt: skip
    groups = [pairs] if kind == "clt" else [[p] for p in pairs]
    return [DictionaryConfig(kind, d_in, d_out, width, activation, k, tuple(p[0] for p in g),
                             tuple(p[1] for p in g), provenance=provenance).check() for g in groups]  # fmt: skip


def activation_source(
    model,
    configs: list[DictionaryConfig],
    options: TrainOptions,
    *,
    cube=None,
    corpus: str = "sample",
    context_length: int = 128,
    buffer_bytes: int = 512 * 2**20,
    buffer_tokens: int | None = None,
    stream_class=None,
):
    """The batches `configs` train on (their input and output sites, in order): from `cube`, or the model streamed
    on `corpus` (`stream_class`: a StreamSource subclass; `buffer_tokens` fixes its shuffle buffer's size, which is
    otherwise what `buffer_bytes` holds of these sites)."""
    inputs = [s for c in configs for s in c.input_sites]
    outputs = [s for c in configs for s in c.output_sites]
    layers = [int(s.split(".")[1]) for s in inputs]
    if cube is not None:
        from modelrecon.dictionaries.sources import CubeSource

        kinds = [s.split(".", 2)[2] for s in (inputs[0], outputs[0])]
        source = CubeSource(cube, *kinds, layers, options.batch_size, seed=options.seed)
    else:
        from modelrecon.corpus import read_texts, token_stream
        from modelrecon.dictionaries.sources import StreamSource

        def windows():
            return token_stream(read_texts(corpus), model.tokenizer, context_length)

        source = (stream_class or StreamSource)(model, windows, inputs, outputs, options.batch_size, seed=options.seed,
                                                buffer_bytes=buffer_bytes, buffer_tokens=buffer_tokens,
                                                reuse=options.reuse)  # fmt: skip
    return source
