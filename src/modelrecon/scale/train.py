"""Dictionary training on a Ray cluster with Ray Train (`TorchTrainer`: gloo on CPUs, NCCL on GPUs).

Two ways to share the work out, both running the single-process training loop (dictionaries/train.py `train`):

- `data` (any kind): data parallel. Every worker serves the same global batches as one process would (same seed, same
  buffer, same order), trains on its contiguous part of each (`DataShard`), and the gradients are averaged by an
  all-reduce before every Adam step; the batch statistics are combined too (which latents fired, BatchTopK's
  threshold over the whole batch). The global batch and the step count are the single-process run's, and so is the
  initialisation. Streamed from the model, the model runs are shared out: of every `workers` consecutive model
  batches each worker runs one, and the activations are all-gathered into every worker's buffer. From a cube every
  worker reads the blocks one process would (each keeps its part of a batch).
  The result equals the single-process run up to float summation order (a gradient summed over each worker's rows,
  then across workers; products over part of the rows), so not bit for bit, and the rounding differences can grow:
  Adam divides each gradient by its running RMS, so a weight whose gradient is near zero moves by a relative
  difference that is no longer small, and a latent that ties with the k-th largest (TopK, BatchTopK, AuxK) may be
  picked on one side only, after which the runs differ by that latent's update. Measured on the tiny test model
  (3 layers, d 32, width 64, k 4, batches of 256, 2 workers): every tensor within 2.6e-7 of its largest value
  after 16 steps for each kind and activation, within 7e-7 after 150 steps except a skip transcoder with BatchTopK
  (3.6e-3, its held-out FVU 1.1e-4 apart), the held-out FVU equal to 1e-7 otherwise. tests/test_scale_train.py
  allows 1e-5 and an FVU difference of 1e-5.
- `layers` (per-layer dictionaries: SAEs on `layers.*.resid_post`, per-layer transcoders; not a `clt`): each worker
  trains a contiguous group of the layers as the single-process run trains them (a stack, its rows served in the
  same order from a buffer of the same size, with only its layers' sites recorded), so the results are the same
  bits, except TopK's decoder gradient (within ~1e-7, tested at 1e-6): it is one `embedding_bag` over every layer of
  a stack, whose backward sums a decoder row's contributions in an order that depends on every index in the call,
  so on the stack's other layers. The model runs on every worker.

Activations come from the model on each worker (a `Model` is shipped through the object store; a name or folder is
loaded by each worker, on its own device) or from a cube every worker can read (a shared folder or an fsspec URL).
The trained dictionaries come back through a small collector actor, so no shared storage is needed. Checkpoints and
resuming are single-process only for now.
"""

from __future__ import annotations

import functools
import importlib.util
import shutil
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

import torch

from modelrecon.dictionaries.model import Dictionary
from modelrecon.dictionaries.sources import StreamSource
from modelrecon.dictionaries.train import DataShard, TrainOptions, activation_source, dictionary_configs, train
from modelrecon.errors import BadInputError, ModelreconError
from modelrecon.scale.cluster import LOCAL, connect, worker_cpus

MODES = ("data", "layers")


def train_on_ray(
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
    ray_address: str | None = LOCAL,
    workers: int | None = None,
    mode: str = "data",
    device: str = "auto",
    dtype: str = "float32",
) -> list[Dictionary]:
    """`train_on_model` on a Ray cluster, by Ray Train's `TorchTrainer` with `workers` workers (default: one per two
    of the cluster's CPUs) in `mode` 'data' (data parallel, any kind) or 'layers' (per-layer dictionaries shared out
    by layer); see the module docstring for what each gives back compared with one process.

    `model` is a `Model` (shipped to the workers) or a name / folder / hub id (loaded by each worker with `dtype`;
    the driver loads it on the CPU too, for the sites and provenance). `cube`: a `Cube` or its path, which every
    worker must be able to read. `ray_address`: 'local', 'auto' or HOST:PORT (`cluster.connect`). `device`: 'auto'
    (GPUs when the cluster has one per worker, with NCCL; else CPUs with gloo), 'cpu' or 'cuda'. Returns the
    dictionaries, in the driver's memory, as `train_on_model` does."""
    from modelrecon.models.model import Model

    if mode not in MODES:
        raise BadInputError(f"unknown --ray-mode {mode!r}; use data or layers")
    if mode == "layers" and kind == "clt":
        raise BadInputError("a clt is one dictionary over every layer: train it with --ray-mode data")
    if importlib.util.find_spec("ray") is None:  # before loading the model
        raise BadInputError("--ray needs Ray: pip install 'modelrecon[scale]'")
    name = None
    if not isinstance(model, Model):
        from modelrecon.models.embedded import EMBEDDED
        from modelrecon.models.loading import load

        name = str(model)
        if name not in EMBEDDED and Path(name).expanduser().exists():  # workers start elsewhere: the absolute path
            name = str(Path(name).expanduser().resolve())
        model = load(name, device="cpu", dtype=dtype)
    cube_path = None
    if cube is not None:
        from modelrecon.cube.reader import Cube

        cube = cube if isinstance(cube, Cube) else Cube(cube)
        cube_path = str(cube.path.resolve()) if isinstance(cube.path, Path) else str(cube.path)
    configs = dictionary_configs(model, kind, site, width, options, activation=activation, k=k, cube=cube,
                                 corpus=corpus, context_length=context_length)  # fmt: skip
    data = dict(corpus=corpus, context_length=context_length, buffer_bytes=buffer_bytes)
    whole = activation_source(model, configs, options, cube=cube, **data)  # checks the data before any worker starts
    ray = connect(ray_address)
    n, cpus = worker_cpus(ray, workers)
    if mode == "layers":
        n = min(n, len(configs))
    elif options.batch_size < n:
        raise BadInputError(f"--batch-size {options.batch_size} cannot be shared by {n} workers; give fewer")
    use_gpu = _use_gpu(ray, device, n)
    parts = [list(part) for part in _split(len(configs), n)]

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    collector = ray.remote(num_cpus=0)(_Collector).remote()
    storage = tempfile.mkdtemp(prefix="modelrecon-ray-train-")  # Ray Train's run folder (nothing is checkpointed)
    loop_config = {
        "model": name if name is not None else ray.put(model),
        "dtype": dtype,
        "cube": cube_path,
        "data": data,
        "configs": configs,
        "options": options,
        "mode": mode,
        "parts": parts,
        "buffer_tokens": getattr(whole, "buffer_tokens", None),
        "threads": max(1, int(cpus)),
        "results": collector,
    }
    trainer = TorchTrainer(
        _worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=n, use_gpu=use_gpu, resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(name=f"modelrecon-train-{uuid.uuid4().hex[:8]}", storage_path=storage),
    )
    try:
        trainer.fit()
        states, seconds = ray.get(collector.results.remote())
    except Exception as exc:  # a worker's one-line error comes back as it is; anything else keeps its traceback
        error = _user_error(exc)
        if error is None:
            raise
        raise error from None
    finally:
        ray.kill(collector)
        shutil.rmtree(storage, ignore_errors=True)
    run = {"mode": mode, "workers": n, "train_seconds": round(max(seconds), 2)}  # the slowest worker's training
    out = []
    for i, config in enumerate(configs):
        d = Dictionary(replace(config, provenance={**config.provenance, "ray": run}))
        d.load_state_dict(states[i])
        out.append(d)
    return out


def _use_gpu(ray, device: str, workers: int) -> bool:
    gpus = float(ray.cluster_resources().get("GPU", 0))
    if device == "cpu":
        return False
    if device == "auto":
        return gpus >= workers
    if not device.startswith("cuda"):
        raise BadInputError(f"--device {device!r} with --ray: use auto, cpu or cuda")
    if gpus < workers:
        raise BadInputError(f"the Ray cluster has {gpus:g} GPUs for {workers} workers; give --workers or --device cpu")
    return True


def _split(n: int, parts: int) -> list[range]:
    """`n` items in `parts` contiguous groups, sizes differing by at most one."""
    sizes = [n // parts + (i < n % parts) for i in range(parts)]
    starts = [sum(sizes[:i]) for i in range(parts)]
    return [range(s, s + size) for s, size in zip(starts, sizes, strict=True)]


def _user_error(exc: Exception) -> ModelreconError | None:
    """A worker's modelrecon error (a user mistake: the text gives no window, ...) behind a failed run, if any."""
    for failure in (getattr(exc, "worker_failures", None) or {}).values():
        cause = failure
        for _ in range(8):  # Ray wraps it (RayTaskError.cause, __cause__)
            if cause is None or isinstance(cause, ModelreconError):
                break
            cause = getattr(cause, "cause", None) or cause.__cause__
        if isinstance(cause, ModelreconError):
            return cause
    return None


class _Collector:
    """Where the workers leave their trained dictionaries' states and how long they trained (an actor: no shared
    storage needed)."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}
        self.seconds: list[float] = []

    def put(self, states: dict[int, dict[str, torch.Tensor]], seconds: float) -> None:
        self.states |= states
        self.seconds.append(seconds)

    def results(self) -> tuple[dict[int, dict[str, torch.Tensor]], list[float]]:
        return self.states, self.seconds


# --- on the workers ------------------------------------------------------------------------------------------------
def _worker(config: dict) -> None:
    """Ray Train's loop on each worker: its model and data, the ordinary training loop on its part, and the result
    left with the collector."""
    import ray
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(config["threads"])
    model = _worker_model(config["model"], device, config["dtype"])
    cube = None
    if config["cube"] is not None:
        from modelrecon.cube.reader import Cube

        cube = Cube(config["cube"])
    started = time.perf_counter()
    states = _train_part(model, config["configs"], config["options"], config["mode"], rank, world, cube=cube,
                         data=config["data"], parts=config["parts"], buffer_tokens=config["buffer_tokens"])  # fmt: skip
    ray.get(config["results"].put.remote(states, time.perf_counter() - started))


def _train_part(model, configs, options: TrainOptions, mode: str, rank: int, world: int, *, cube, data: dict,
                parts: list[list[int]], buffer_tokens: int | None) -> dict[int, dict[str, torch.Tensor]]:  # fmt: skip
    """Worker `rank`'s training: 'data', its part of every batch (torch.distributed initialised; rank 0 returns the
    dictionaries, which every worker holds); 'layers', the configs `parts[rank]`. Returns {config index: state}."""
    if mode == "data":
        stream = functools.partial(_ShardedStream, rank=rank, world=world)
        source = activation_source(model, configs, options, cube=cube, stream_class=stream, **data)
        trained = train(source, configs, options, progress=False, device=model.device, shard=DataShard(rank, world))
        if rank != 0:  # every worker holds the same dictionaries
            return {}
        mine = list(range(len(configs)))
    else:
        mine = parts[rank]
        group = [configs[i] for i in mine]
        source = activation_source(model, group, options, cube=cube, buffer_tokens=buffer_tokens, **data)
        trained = train(source, group, options, progress=False, device=model.device, stack=len(configs) > 1)
    return {i: {key: v.detach().cpu() for key, v in d.state_dict().items()} for i, d in zip(mine, trained, strict=True)}


def _worker_model(model, device: torch.device, dtype: str):
    import ray

    if isinstance(model, str):
        from modelrecon.models.loading import load

        return load(model, device=device, dtype=dtype)
    model = ray.get(model)
    if model.device != device:
        model.hf.to(device)
    return model


class _ShardedStream(StreamSource):
    """A StreamSource that serves exactly the batches of the single-process one while running the model on a
    `world`-th of them: of every `world` consecutive model batches (every worker reads the same windows) worker
    `rank` runs one, and the activations are all-gathered, so each worker's buffer is the single-process buffer."""

    def __init__(self, *args, rank: int, world: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rank, self.world = rank, world
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _activations(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.pending:
            chunks = []
            for _ in range(self.world):
                chunks.append(self._next_windows())
                self.windows_used += len(chunks[-1])
            x, y = self._run(chunks[self.rank])
            self.pending = _all_gather_rows(x, y, same=self.input_sites == self.output_sites)
        return self.pending.pop(0)


def _all_gather_rows(x: torch.Tensor, y: torch.Tensor, same: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every worker's `(x [tokens, layer, d_in], y [tokens, layer, d_out])`, in rank order (token counts may differ;
    an SAE's `y` is its `x`, sent once)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    t = x if same else torch.cat([x, y], -1)
    sizes = [torch.zeros(1, dtype=torch.int64, device=t.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(t)], device=t.device))
    rows = [int(s) for s in sizes]
    padded = torch.nn.functional.pad(t, (0, 0, 0, 0, 0, max(rows) - len(t)))
    every = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(every, padded)
    parts = [part[:n] for part, n in zip(every, rows, strict=True)]
    d_in = x.shape[-1]
    return [(p, p) if same else (p[..., :d_in], p[..., d_in:]) for p in parts]
