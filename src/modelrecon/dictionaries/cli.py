"""`modelrecon eval-dict`: registered on the main app with `app.command("eval-dict")(eval_dict)`.
User errors raise ModelreconError, which the main entry point prints on one line (exit code 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from modelrecon.cli_common import DeviceOption, DtypeOption, ModelOption, load_model, stdout
from modelrecon.models.embedded import DEFAULT_MODEL


def _load_dictionaries(names: list[str]) -> list:
    """Every dictionary the names give (a folder or hub name may hold one, or one per layer)."""
    from modelrecon.dictionaries.hub import open_dictionaries

    return [d for name in names for d in open_dictionaries(name)]


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
    from modelrecon.errors import BadInputError
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
