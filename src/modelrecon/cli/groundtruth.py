"""`modelrecon groundtruth run`: every method scored on white-box models with known circuits."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelrecon.cli.common import app, split_patterns, stdout

groundtruth_app = typer.Typer(
    help="White-box models with known circuits that score the explainers.", no_args_is_help=True
)
app.add_typer(groundtruth_app, name="groundtruth")


@groundtruth_app.command("run")
def groundtruth_run(
    json_out: Annotated[Path, typer.Option("--json", help="the JSON report to write")],
    tasks: Annotated[list[str] | None, typer.Option("--tasks", help="task names (repeatable; default all)")] = None,
    methods: Annotated[list[str] | None, typer.Option("--methods", help="method names (default all)")] = None,
    markdown_out: Annotated[Path | None, typer.Option("--markdown", help="also write the results table")] = None,
) -> None:
    """Score every method on every white-box task against its known ground truth."""
    from modelrecon.files import write_text_atomic
    from modelrecon.groundtruth.runner import markdown, run_suite, to_json

    report = run_suite(split_patterns(tasks or []) or None, split_patterns(methods or []) or None)
    table = markdown(report)
    stdout.print(table, markup=False, highlight=False)
    write_text_atomic(json_out, to_json(report))
    stdout.print(f"wrote {json_out}", markup=False)
    if markdown_out is not None:
        stdout.print(f"wrote {write_text_atomic(markdown_out, table)}", markup=False)
