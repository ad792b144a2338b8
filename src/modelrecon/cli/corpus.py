"""`modelrecon corpus build|info`: the offline text corpus for training dictionaries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from modelrecon.cli.common import app, stdout
from modelrecon.corpus.sources import DEFAULT_SOURCES

corpus_app = typer.Typer(
    help="Build and inspect the offline text corpus for training dictionaries.",
    no_args_is_help=True,
)
app.add_typer(corpus_app, name="corpus")


@corpus_app.command("build")
def corpus_build(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="the corpus folder to write")],
    sources: Annotated[
        str | None,
        typer.Option(help=f"comma-separated sources (default: the installed ones of {', '.join(DEFAULT_SOURCES)})"),
    ] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", min=1, help="stop after about this many")] = None,
    tokenizer: Annotated[str, typer.Option(help="model whose tokenizer counts tokens, or 'none'")] = "smollm2-135m",
    seed: Annotated[int, typer.Option(help="seed of the shuffle that mixes the sources")] = 0,
    root: Annotated[Path | None, typer.Option(help="look for the source files under this folder, not /")] = None,
) -> None:
    """Build a deduplicated mix of the installed sources into DIR/corpus.jsonl with metadata DIR/corpus.json."""
    from modelrecon.corpus.build import build_corpus
    from modelrecon.errors import BadInputError

    if max_tokens is not None and tokenizer == "none":
        raise BadInputError("--max-tokens needs a tokenizer to count with; drop --tokenizer none")
    names = [n for n in (sources or "").replace(",", " ").split()] or None
    counter = None if tokenizer == "none" else tokenizer
    build_corpus(out_dir, names, max_tokens=max_tokens, tokenizer=counter, seed=seed, root=root)
    show_metadata(out_dir)


@corpus_app.command("info")
def corpus_info(
    corpus: Annotated[str, typer.Argument(help="a corpus folder or its corpus.json, or 'sample'")] = "sample",
) -> None:
    """Per source: kind, licence, documents, characters, tokens and share of a built corpus."""
    show_metadata(corpus)


def show_metadata(corpus: str | Path) -> None:
    from modelrecon.corpus.read import corpus_file
    from modelrecon.errors import BadInputError, reason

    path = corpus_file(corpus).with_suffix(".json")
    if not path.is_file():
        raise BadInputError(f"'{corpus}' has no metadata file {path.name}; build it with: modelrecon corpus build")
    table = Table("source", "kind", "documents", "characters", "tokens", "share", "duplicates dropped", "licence")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        for name, info in meta["sources"].items():
            share = info["share_tokens"] if info["share_tokens"] is not None else info["share_characters"]
            tokens = f"{info['tokens']:,}" if meta["tokens"] is not None else "-"
            row = [str(info["kind"]), f"{info['documents']:,}", f"{info['characters']:,}", tokens, f"{share:.1%}"]
            table.add_row(name, *row, f"{info['duplicate_paragraphs_dropped']:,}", str(info["licence"]))
        total = (
            f"{meta['tokens']:,} tokens ({meta['tokenizer']})" if meta["tokens"] is not None else "tokens not counted"
        )
        summary = (f"{path.parent}: {meta['documents']:,} documents, {meta['characters']:,} characters, {total}; "
                   f"built {meta['created']} by modelrecon {meta['modelrecon_version']}")  # fmt: skip
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # JSON and UTF-8 errors are ValueErrors
        raise BadInputError(f"corpus metadata {path} is damaged ({reason(exc)}); build the corpus again") from None
    stdout.print(table)
    stdout.print(summary, markup=False, highlight=False)
