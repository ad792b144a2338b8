"""Reading training text (the shipped sample, a built corpus, or the user's own txt/JSONL/Parquet) and cutting it
into fixed-length token chunks for training."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from modelrecon.errors import BadInputError, reason

SAMPLE_CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus_sample.jsonl"
TOKENIZE_BATCH = 64


def corpus_file(path: str | Path) -> Path:
    """The file behind a name: "sample" is the shipped sample, a folder is a built corpus (its corpus.jsonl)."""
    if str(path) == "sample":
        return SAMPLE_CORPUS
    path = Path(path)
    if path.is_dir():
        path = path / "corpus.jsonl"
    if not path.is_file():
        raise BadInputError(f"no text at '{path}'; give a .txt, .jsonl or .parquet file, a corpus folder or 'sample'")
    return path


def read_texts(path: str | Path) -> Iterator[str]:
    """The documents of a text source, lazily: .txt (documents separated by blank lines), .jsonl (field "text"),
    .parquet (column "text"), a folder built by `modelrecon corpus build`, or "sample"."""
    path = corpus_file(path)
    readers = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}
    if path.suffix not in readers:
        raise BadInputError(f"cannot read '{path}': unknown file type; use .txt, .jsonl or .parquet")
    return readers[path.suffix](path)


def _read_txt(path: Path) -> Iterator[str]:
    document = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.strip():
                document.append(line)
            elif document:
                yield "".join(document).strip("\n")
                document = []
    if document:
        yield "".join(document).strip("\n")


def _read_jsonl(path: Path) -> Iterator[str]:
    try:
        yield from _jsonl_texts(path)
    except UnicodeDecodeError as exc:
        raise BadInputError(f"{path} is not UTF-8 text (byte {exc.start} of a block); save it as UTF-8") from None


def _jsonl_texts(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise BadInputError(f"{path} line {number} is not JSON; write one JSON object per line") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise BadInputError(f'{path} line {number} has no string field "text"; write {{"text": "..."}}')
            yield record["text"]


def _read_parquet(path: Path) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BadInputError("reading Parquet needs pyarrow; install it with: pip install pyarrow") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own error types for corrupt files
        raise BadInputError(f"cannot read '{path}' as Parquet ({exc.__class__.__name__}); check the file") from None
    if "text" not in table.schema_arrow.names:
        raise BadInputError(f'{path} has no column "text" (it has {", ".join(table.schema_arrow.names)}); rename it')
    try:
        for batch in table.iter_batches(columns=["text"]):
            yield from (text for text in batch.column(0).to_pylist() if text is not None)
    except Exception as exc:  # a damaged data page is found only when its batch is read
        raise BadInputError(f"cannot read '{path}' as Parquet ({reason(exc)}); check the file") from None


def token_stream(texts: Iterable[str], tokenizer, context_length: int) -> Iterator[list[int]]:
    """Fixed-length chunks of token ids over the texts laid end to end.

    Each text is followed by the tokenizer's end-of-sequence token (when it has one) so that document boundaries
    stay visible; each chunk starts with the beginning-of-sequence token (when it has one), as the model saw in
    training, and is filled with `context_length - 1` text tokens. The last, incomplete chunk is dropped.
    """
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    fill = context_length - (bos is not None)
    if fill < 1:
        raise BadInputError(f"context_length {context_length} leaves no room for text; use at least 2")
    pending: list[int] = []
    for ids in _tokenized(texts, tokenizer):
        pending.extend(ids)
        if eos is not None:
            pending.append(eos)
        start = 0
        while len(pending) - start >= fill:
            yield ([bos] if bos is not None else []) + pending[start : start + fill]
            start += fill
        del pending[:start]  # once per text, not per chunk: a long text is not copied over and over


def _tokenized(texts: Iterable[str], tokenizer) -> Iterator[list[int]]:
    """Token ids per text, tokenizing in batches (much faster with the Rust tokenizers)."""
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == TOKENIZE_BATCH:
            yield from tokenizer(batch, add_special_tokens=False)["input_ids"]
            batch = []
    if batch:
        yield from tokenizer(batch, add_special_tokens=False)["input_ids"]
