"""What every `modelrecon` command shares (also the commands that live with their package): the result console,
the --model option, and model loading."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

stdout = Console(soft_wrap=True)

ModelOption = Annotated[str, typer.Option("--model", "-m", help="embedded name, local folder, .gguf file or hub id")]
DeviceOption = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N, mps or auto (a GPU when present)")]
TRANSCODERS_HELP = (
    "a tier (demo, standard), default, a folder, a circuit-tracer config.yaml, org/repo\\[/path]\\[@rev] or "
    "saelens:RELEASE/ID"
)
DtypeOption = Annotated[str, typer.Option("--dtype", help="the model's weights: float32, bfloat16 or float16")]
RayOption = Annotated[
    str | None,
    typer.Option(
        "--ray",
        metavar="ADDRESS",
        help="run on Ray (extra 'scale'): local (a cluster on this machine, or RAY_ADDRESS), auto (the one "
        "`ray start` began here) or HOST:PORT",
    ),
]
WorkersOption = Annotated[int | None, typer.Option("--workers", min=1, help="with --ray: workers (default: CPUs / 2)")]


def load_model(name: str, device: str = "auto", dtype: str = "float32"):
    """The model a command runs, on its device and in its dtype (`load` checks both before reading any weights)."""
    from modelrecon.models.loading import load

    return load(name, device=device, dtype=dtype)
