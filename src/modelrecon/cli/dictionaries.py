"""`modelrecon train`, `transcoders`, `eval-dict`: train, build and evaluate dictionaries (SAEs and transcoders)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from modelrecon.cli.common import (
    DeviceOption,
    DtypeOption,
    ModelOption,
    RayOption,
    WorkersOption,
    app,
    load_model,
    stdout,
)
from modelrecon.errors import BadInputError
from modelrecon.models.embedded import DEFAULT_MODEL


@app.command("train")
def train_command(
    out: Annotated[str, typer.Option("--out", "-o", help="the dictionary folder to write (a path or a URL)")],
    kind: Annotated[str, typer.Option(help="sae, transcoder, skip-transcoder or clt")] = "sae",
    site: Annotated[str, typer.Option(help="sae: a site or glob (layers.*.resid_post); others: layers.N.mlp")] = (
        "layers.*.resid_post"
    ),
    width: Annotated[int, typer.Option(min=1, help="latents per layer")] = 4096,
    k: Annotated[int, typer.Option(min=1, help="topk / batchtopk: active latents per token")] = 32,
    activation: Annotated[str, typer.Option(help="topk, batchtopk, jumprelu or relu")] = "topk",
    tokens: Annotated[int, typer.Option(min=1, help="training tokens")] = 1_000_000,
    model: ModelOption = DEFAULT_MODEL,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    cube: Annotated[str | None, typer.Option(help="train from this cube's stored activations (a path or URL)")] = None,
    corpus: Annotated[
        str, typer.Option(help="or stream the model on this text (.txt/.jsonl/.parquet, a corpus folder, or 'sample')")
    ] = "sample",  # fmt: skip
    batch_size: Annotated[int, typer.Option(min=1, help="tokens per step")] = 4096,
    lr: Annotated[float, typer.Option(help="Adam learning rate")] = 1e-3,
    l1: Annotated[float, typer.Option(help="relu: L1 coefficient")] = 1e-3,
    l0: Annotated[float, typer.Option(help="jumprelu: L0 coefficient")] = 1e-3,
    seed: Annotated[int, typer.Option()] = 0,
    context_length: Annotated[int, typer.Option(min=2, help="tokens per streamed window")] = 128,
    checkpoint_every: Annotated[int, typer.Option(min=0, help="steps between checkpoints (0: at the end)")] = 100,
    bf16: Annotated[
        bool, typer.Option(help="bfloat16 autocast for the model and dictionary matmuls (weights stay fp32)")
    ] = False,
    reuse: Annotated[
        int, typer.Option(min=1, help="streamed: train on each token this many times (the model runs on 1/N)")
    ] = 1,
    ray: RayOption = None,
    workers: WorkersOption = None,
    ray_mode: Annotated[
        str | None,
        typer.Option(
            "--ray-mode",
            help="with --ray: data (each worker trains on part of every batch; the default) or layers (per-layer "
            "dictionaries shared out by layer)",
        ),
    ] = None,
) -> None:
    """Train SAEs or transcoders (per layer, skip, or cross-layer) on the model's activations. Checkpoints go to
    .OUT.checkpoint beside OUT; the same command resumes from there after a kill. With --ray, Ray Train workers
    train instead (data parallel or by layer; no checkpoints)."""
    import shutil

    from modelrecon.dictionaries.formats import save_dictionaries
    from modelrecon.dictionaries.train import TrainOptions, train_on_model

    if cube is not None and corpus != "sample":
        raise BadInputError("give --cube or --corpus, not both")
    if ray is None and (workers is not None or ray_mode is not None):
        raise BadInputError("--workers and --ray-mode need --ray ADDRESS (local: a Ray cluster on this machine)")
    options = TrainOptions(tokens=tokens, batch_size=batch_size, lr=lr, l1=l1, l0=l0, seed=seed,
                           checkpoint_every=checkpoint_every, bf16=bf16, reuse=reuse)  # fmt: skip
    if ray is not None:
        from modelrecon.scale.train import train_on_ray

        dictionaries = train_on_ray(model, kind, site, width, options, activation=activation, k=k, cube=cube,
                                    corpus=corpus, context_length=context_length, ray_address=ray, workers=workers,
                                    mode=ray_mode or "data", device=device, dtype=dtype)  # fmt: skip
        save_dictionaries(dictionaries, out)
        run = dictionaries[0].config.provenance["ray"]
        stdout.print(f"wrote {len(dictionaries)} dictionar{'y' if len(dictionaries) == 1 else 'ies'} to {out} "
                     f"(Ray: {run['workers']} workers, {run['mode']})", markup=False)  # fmt: skip
        return
    loaded = load_model(model, device, dtype)
    cube_obj = None
    if cube is not None:
        from modelrecon.cube.reader import Cube

        cube_obj = Cube(cube)
    checkpoint = _checkpoint_folder(out)
    dictionaries = train_on_model(loaded, kind, site, width, options, activation=activation, k=k, cube=cube_obj,
                                  corpus=corpus, context_length=context_length, checkpoint=checkpoint)  # fmt: skip
    save_dictionaries(dictionaries, out)
    shutil.rmtree(checkpoint, ignore_errors=True)
    stdout.print(
        f"wrote {len(dictionaries)} dictionar{'y' if len(dictionaries) == 1 else 'ies'} to {out}", markup=False
    )


def _checkpoint_folder(out: str) -> Path:
    """Training checkpoints: beside a local OUT; for a URL, in the user cache (keyed by the URL), so a kill resumes."""
    from modelrecon import storage

    if not storage.is_url(out):
        out = storage.local_path(out)
        return out.parent / f".{out.name}.checkpoint"
    import hashlib

    from modelrecon.models.loading import cache_root

    return cache_root() / "checkpoints" / hashlib.sha256(out.encode()).hexdigest()[:16]


@app.command("transcoders")
def transcoders_command(
    model: ModelOption = DEFAULT_MODEL,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    quality: Annotated[
        str, typer.Option(help="demo (a few minutes on two cores) or standard (up to an hour; resumable, cached)")
    ] = "demo",
) -> None:
    """Build (once) or locate the embedded model's transcoders of a quality tier; a killed build resumes."""
    from modelrecon.dictionaries.defaults import check_tier, default_transcoders, default_transcoders_folder

    loaded = load_model(model, device, dtype)
    check_tier(loaded, quality)  # a bad tier or model fails before anything is built
    dictionaries = default_transcoders(loaded, quality)
    stdout.print(f"{len(dictionaries)} {quality} transcoders of {loaded.name}: "
                 f"{default_transcoders_folder(loaded, quality)}", markup=False)  # fmt: skip


def _load_dictionaries(names: list[str]) -> list:
    """Every dictionary the names give (a folder or hub name may hold one, or one per layer)."""
    from modelrecon.dictionaries.hub import open_dictionaries

    return [d for name in names for d in open_dictionaries(name)]


@app.command("eval-dict")
def eval_dict(
    dictionary: Annotated[
        list[str], typer.Option("--dict", help="a dictionary folder or hub name (repeatable: evaluated together)")
    ],
    model: ModelOption = DEFAULT_MODEL,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    corpus: Annotated[
        str, typer.Option("--corpus", help="a .txt, .jsonl or .parquet file, a corpus folder, or 'sample'")
    ] = "sample",
    tokens: Annotated[int, typer.Option("--tokens", min=2, help="evaluate on this many tokens")] = 32768,
    context_length: Annotated[int, typer.Option("--context-length", min=2, help="tokens per window")] = 128,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="windows per forward pass")] = 8,
    ablation: Annotated[str, typer.Option(help="the baseline of CE recovered: zero or mean")] = "zero",
    splice: Annotated[
        str, typer.Option(help="both (each layer alone, and all at once), each, all, or none (no loss figures)")
    ] = "both",
    json_out: Annotated[Path | None, typer.Option("--json", help="the JSON report to write")] = None,
    markdown_out: Annotated[Path | None, typer.Option("--markdown", help="also write the table as Markdown")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar on stderr")] = True,
) -> None:
    """Evaluate dictionaries: FVU, L0, dead/dense latents, cosine, and CE loss recovered, delta LM loss and KL with
    each spliced into the forward pass, per layer."""
    from modelrecon.corpus import read_texts
    from modelrecon.dictionaries.evaluate import ABLATIONS, SPLICES, evaluate
    from modelrecon.files import write_text_atomic

    if ablation not in ABLATIONS:
        raise BadInputError(f"unknown --ablation {ablation!r}; use one of {', '.join(ABLATIONS)}")
    if splice not in SPLICES:
        raise BadInputError(f"unknown --splice {splice!r}; use one of {', '.join(SPLICES)}")
    texts = read_texts(corpus)  # before the model loads: a bad corpus path should fail fast
    dictionaries = _load_dictionaries(dictionary)
    loaded = load_model(model, device, dtype)
    report = evaluate(
        loaded,
        dictionaries,
        texts,
        batch_size=batch_size,
        context_length=context_length,
        max_tokens=tokens,
        ablation=ablation,
        splice=splice,
        progress=progress,
    )
    Console(width=max(stdout.width, 150), soft_wrap=True).print(report.table())  # no number cut short when narrow
    if json_out is not None:
        stdout.print(f"wrote {write_text_atomic(json_out, report.to_json())}", markup=False)
    if markdown_out is not None:
        stdout.print(f"wrote {write_text_atomic(markdown_out, report.markdown())}", markup=False)
