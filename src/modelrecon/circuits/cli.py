"""`modelrecon graph-eval`: registered on the main app with `app.command("graph-eval")(graph_eval)`.
User errors raise ModelreconError, which the main entry point prints on one line (exit code 2)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from modelrecon.cli_common import (
    TRANSCODERS_HELP,
    DeviceOption,
    DtypeOption,
    ModelOption,
    RayOption,
    WorkersOption,
    stdout,
)
from modelrecon.models.embedded import DEFAULT_MODEL


def _figure(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def graph_eval(
    json_out: Annotated[Path, typer.Option("--json", help="the JSON report to write (per prompt and averages)")],
    transcoders: Annotated[
        str,
        typer.Option(help=TRANSCODERS_HELP),
    ] = "default",
    prompts: Annotated[
        Path | None, typer.Option(help="a JSONL file of {prompt, answer, kind?, subject?} (default: the shipped set)")
    ] = None,  # fmt: skip
    model: ModelOption = DEFAULT_MODEL,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    max_features: Annotated[int, typer.Option("--max-features", min=1, help="feature rows per graph")] = 1000,
    check_features: Annotated[int, typer.Option(min=1, help="features ablated by each causal check")] = 10,
    limit: Annotated[int | None, typer.Option(min=1, help="only the first N prompts")] = None,
    ray: RayOption = None,
    workers: WorkersOption = None,
) -> None:
    """Graph quality on held-out prompts: each traced to its answer, scored (replacement, completeness, errors'
    share, influence through features, top input tokens, subject's share) and checked by intervention. With --ray,
    the prompts are spread over Ray workers that each load the model once; the report is the same."""
    from modelrecon.circuits.batch import TraceSource
    from modelrecon.circuits.evaluate import evaluate_batch, read_prompts
    from modelrecon.errors import BadInputError
    from modelrecon.files import write_text_atomic

    if workers is not None and ray is None:
        raise BadInputError("--workers needs --ray ADDRESS (local: a Ray cluster on this machine)")
    chosen = read_prompts(prompts)[:limit]
    source = TraceSource(model, transcoders, "features", device, dtype)
    report = evaluate_batch(source, chosen, max_feature_nodes=max_features, check_features=check_features,
                            ray=ray, workers=workers)  # fmt: skip
    data = report.to_dict()
    columns = {"replacement": "replacement", "completeness": "completeness", "error_share": "error share",
               "through_features": "via features", "subject_share": "subject share", "subject_top": "subject top",
               "causal_agrees": "causal agrees", "causal_accounted": "accounted (median)"}  # fmt: skip
    table = Table("prompts", "n", *columns.values(), title=f"graph quality of {transcoders} on {report.model}")
    for name, row in [*data["by_kind"].items(), ("all", data["average"])]:
        table.add_row(name, str(row["prompts"]), *(_figure(row[k]) for k in columns))
    stdout.print(table)
    wrong = [r["prompt"] for r in data["prompts"] if not r["correct"]]
    if wrong:
        stdout.print(f"{len(wrong)} prompt(s) the model does not answer: {wrong[:3]}", markup=False)
    stdout.print(f"wrote {write_text_atomic(json_out, json.dumps(data, indent=1))}", markup=False)
