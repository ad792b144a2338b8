"""`modelrecon capture` and `modelrecon cube info|show|export|import`: activation cubes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from modelrecon.cli.common import (
    DeviceOption,
    DtypeOption,
    ModelOption,
    RayOption,
    WorkersOption,
    app,
    interrupted,
    load_model,
    split_patterns,
    stdout,
)
from modelrecon.errors import BadInputError
from modelrecon.models.embedded import DEFAULT_MODEL


@app.command()
def capture(
    out: Annotated[str, typer.Option("--out", "-o", help="the cube to write: a folder (run.zarr) or a URL (s3://...)")],
    model: ModelOption = DEFAULT_MODEL,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    text: Annotated[list[str] | None, typer.Option("--text", help="a prompt (repeatable)")] = None,
    prompts: Annotated[
        Path | None, typer.Option("--prompts", help=".txt (a prompt per line), .jsonl or .parquet")
    ] = None,
    sites: Annotated[list[str], typer.Option("--sites", help="site names or globs (repeatable)")] = None,
    store_dtype: Annotated[str, typer.Option(help="the cube's values: float16 or float32")] = "float16",
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    max_tokens: Annotated[int | None, typer.Option(min=1, help="stop after this many tokens")] = None,
    context_length: Annotated[int | None, typer.Option(min=1, help="truncate each prompt to this many tokens")] = None,
    attention: Annotated[bool, typer.Option("--attention", help="also store attention patterns")] = False,
    chunk_tokens: Annotated[int, typer.Option(min=1, help="tokens per stored chunk")] = 1024,
    ray: RayOption = None,
    workers: WorkersOption = None,
) -> None:
    """Record sites on prompts into an activation cube; re-run the same command to resume after an interruption.
    With --ray, workers of a Ray cluster write the same cube (on a shared folder or object storage)."""
    from modelrecon.cube.prompts import read_prompts

    if (text is None) == (prompts is None):
        raise BadInputError("give either --text TEXT (repeatable) or --prompts FILE")
    prompt_list = list(text) if text else read_prompts(prompts)
    settings = dict(sites=split_patterns(sites or ["layers.*.resid_post"]), dtype=store_dtype, batch_size=batch_size,
                    max_tokens=max_tokens, context_length=context_length, attention=attention,
                    chunk_tokens=chunk_tokens)  # fmt: skip
    try:
        if ray is not None:
            from modelrecon.scale.capture import capture_on_ray

            cube = capture_on_ray(model, prompt_list, out, address=ray, workers=workers, device=device,
                                  model_dtype=dtype, **settings)  # fmt: skip
        else:
            from modelrecon.cube.capture import capture as capture_cube

            cube = capture_cube(load_model(model, device, dtype), prompt_list, out, **settings)
    except KeyboardInterrupt:
        interrupted(out)
    info = cube.describe()
    stdout.print(
        f"cube {info['path']}: {info['prompts']} prompts, {info['tokens']} tokens, "
        f"sites {', '.join(info['sites'])}, {info['bytes_on_disk'] / 1e6:.2f} MB",
        markup=False,
    )


cube_app = typer.Typer(help="Inspect, view and export activation cubes.", no_args_is_help=True)
app.add_typer(cube_app, name="cube")
CubePath = Annotated[Path, typer.Argument(help="a cube folder")]


@cube_app.command("info")
def cube_info(cube: CubePath, partial: Annotated[bool, typer.Option(help="open an unfinished cube")] = False) -> None:
    """Sites, shapes, tokens, size on disk and provenance of a cube."""
    from modelrecon.cube.reader import layer_range, open_cube

    opened = open_cube(cube, allow_partial=partial)
    opened.check()  # a damaged chunk is reported here, not first by a later export or training run
    info = opened.describe()
    table = Table("site kind", "tokens × layers × units", "layers")
    for kind, shape in info["sites"].items():
        table.add_row(kind, " × ".join(map(str, shape)), layer_range(opened.layers(kind)))
    stdout.print(table)
    for key in ("path", "status", "model", "weights_sha256", "prompts", "tokens", "dtype", "attention", "created"):
        stdout.print(f"{key}: {info[key]}", markup=False, highlight=False)
    stdout.print(
        f"size on disk: {info['bytes_on_disk'] / 1e6:.2f} MB ({info['bytes_on_disk'] / max(1, info['tokens']):.0f} "
        "bytes/token)",
        markup=False,
    )
    stdout.print(
        "versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()), markup=False, highlight=False
    )


@cube_app.command("show")
def cube_show(
    cube: CubePath,
    html: Annotated[Path, typer.Option("--html", help="the HTML file to write")],
    prompt: Annotated[int, typer.Option(min=0)] = 0,
    site: Annotated[str | None, typer.Option(help="site kind, e.g. resid_post (default: the first)")] = None,
    metric: Annotated[str, typer.Option(help="norm, mean, std, max or frac_active")] = "norm",
) -> None:
    """Write a self-contained offline page of the viewer's cube view: token × layer heatmap (site, metric and prompt
    switchable), a per-token line across layers, and the attention explorer when the cube has patterns."""
    from modelrecon.cube.reader import open_cube
    from modelrecon.web.notebook import View, cube_page

    opened = open_cube(cube)
    opened.check()  # the page shows summaries only: a damaged activation chunk would otherwise go unnoticed
    written = View(cube_page(opened, kind=site, metric=metric, prompt=prompt)).save(html)
    stdout.print(f"wrote {written}", markup=False)


@cube_app.command("export")
def cube_export(
    cube: CubePath,
    out_file: Annotated[Path, typer.Option("--out", "-o", help="the file to write")],
    fmt: Annotated[str, typer.Option("--format", help="npz, safetensors or activitycube (JSON)")] = "npz",
    site: Annotated[str | None, typer.Option(help="site kind for activitycube (default: the first)")] = None,
    prompt: Annotated[int, typer.Option(min=0, help="prompt for activitycube")] = 0,
) -> None:
    """Export a cube to flat arrays (npz, safetensors) or to the ActivityCube JSON of the seed prototype."""
    from modelrecon.cube.export import export_cube, write_activity_cube
    from modelrecon.cube.reader import open_cube

    opened = open_cube(cube)
    if fmt == "activitycube":
        write_activity_cube(opened, out_file, site, prompt)
    else:
        export_cube(opened, out_file, fmt)
    stdout.print(f"wrote {out_file}", markup=False)


@cube_app.command("import")
def cube_import(
    source: Annotated[Path, typer.Argument(help="an ActivityCube JSON file")],
    out_cube: Annotated[Path, typer.Option("--out", "-o", help="the cube folder to write")],
) -> None:
    """Import an ActivityCube JSON file as a summaries-only cube."""
    from modelrecon.cube.export import import_activity_cube

    cube = import_activity_cube(source, out_cube)
    stdout.print(f"wrote {cube.path}: {cube.n_tokens} tokens, {len(cube.layers('imported'))} layers", markup=False)
