"""What every `modelrecon` command shares (also the commands that live with their package): the result console,
the --model option, and model loading."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

stdout = Console(soft_wrap=True)

ModelOption = Annotated[str, typer.Option("--model", "-m", help="embedded name, local folder, .gguf file or hub id")]


def load_model(name: str):
    from modelrecon.models.loading import load

    return load(name)
