"""Build the default corpus: gather documents from the installed sources, drop repeated paragraphs, interleave the
sources so that any prefix is a mix of them, and write `corpus.jsonl` with its metadata `corpus.json`."""

from __future__ import annotations

import hashlib
import json
import random
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console

from modelrecon.corpus.sources import DEFAULT_SOURCES, SOURCES, Source
from modelrecon.errors import BadInputError
from modelrecon.files import atomic_target, write_text_atomic
from modelrecon.progress import step, token_progress

FORMAT = "modelrecon-corpus/1"
MAX_DOCUMENT_CHARS = 8000  # longer documents are split at paragraphs, so that the mix is fine-grained
MIN_DEDUP_CHARS = 32  # shorter paragraphs ("Note", "Example:", "}") repeat naturally; dropping them mangles documents
TOKENIZE_BATCH = 256

_stderr = Console(stderr=True, soft_wrap=True)


def source_root(source: Source, root: Path | None) -> Path:
    """Where a source's pattern is resolved: the override, else `/` for apt packages, else the modelrecon cache."""
    if root is not None:
        return Path(root)
    if source.fetch is None:
        return Path("/")
    from modelrecon.models.loading import cache_root

    return cache_root() / "corpus"


def select_sources(names: list[str] | None, root: Path | None) -> list[tuple[Source, list[Path]]]:
    """The sources to read with their files. Named sources must be present (fetched when they can be); of the
    default set, missing ones are skipped with a message."""
    explicit = names is not None
    unknown = sorted(set(names or []) - set(SOURCES))
    if unknown:
        raise BadInputError(f"unknown corpus source {', '.join(unknown)}; choose from {', '.join(SOURCES)}")
    chosen = []
    for name in names if explicit else DEFAULT_SOURCES:
        source = SOURCES[name]
        base = source_root(source, root)
        files = source.files(base)
        if not files and explicit and source.fetch is not None:
            with step(f"downloading source {name}"):
                source.fetch(base)
            files = source.files(base)
        if files:
            chosen.append((source, files))
        elif explicit:
            raise BadInputError(f"corpus source {name} is not installed; install it with: {source.install}")
        else:
            _stderr.print(f"skipping {name}: not installed ({source.install})", markup=False, highlight=False)
    if not chosen:
        raise BadInputError("no corpus source is installed; install one, e.g. sudo apt-get install wordnet-base")
    return chosen


def split_long(text: str, limit: int = MAX_DOCUMENT_CHARS) -> list[str]:
    """The text cut at paragraph boundaries into pieces of at most about `limit` characters."""
    pieces, current, size = [], [], 0
    for paragraph in text.split("\n\n"):
        if current and size + len(paragraph) > limit:
            pieces.append("\n\n".join(current))
            current, size = [], 0
        current.append(paragraph)
        size += len(paragraph) + 2
    if current:
        pieces.append("\n\n".join(current))
    return pieces


class Deduplicator:
    """Exact deduplication of paragraphs across every source, compared case- and whitespace-insensitively."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()

    def unique_paragraphs(self, text: str) -> tuple[str, int]:
        """The text without paragraphs seen before, and how many were dropped."""
        kept, dropped = [], 0
        for paragraph in text.split("\n\n"):
            if len(paragraph) < MIN_DEDUP_CHARS:
                kept.append(paragraph)
                continue
            key = hashlib.blake2b(" ".join(paragraph.lower().split()).encode(), digest_size=16).digest()
            if key in self.seen:
                dropped += 1
            else:
                self.seen.add(key)
                kept.append(paragraph)
        return "\n\n".join(kept), dropped


def mix(documents: dict[str, list[str]], seed: int) -> list[tuple[str, str]]:
    """All documents as (source, text), each source shuffled and the sources interleaved in proportion to their
    characters: at any point of the list, every source has given about the same fraction of its text."""
    rng = random.Random(seed)
    placed = []
    for name, texts in documents.items():
        texts = texts[:]
        rng.shuffle(texts)
        total, done = sum(map(len, texts)), 0
        for text in texts:
            placed.append(((done + len(text) / 2) / total, rng.random(), name, text))
            done += len(text)
    placed.sort()
    return [(name, text) for _, _, name, text in placed]


def gather(chosen: list[tuple[Source, list[Path]]]) -> tuple[dict[str, list[str]], dict[str, dict]]:
    """Each source's deduplicated documents, and per source its paragraph counts."""
    dedup, documents, stats = Deduplicator(), {}, {}
    for source, files in chosen:
        texts, paragraphs, dropped = [], 0, 0
        with step(f"reading {source.name} ({len(files)} files)"):
            for document in source.extract(files):
                paragraphs += document.count("\n\n") + 1
                unique, removed = dedup.unique_paragraphs(document.strip())
                dropped += removed
                texts.extend(split_long(unique) if unique else [])
        documents[source.name] = texts
        stats[source.name] = {"paragraphs": paragraphs, "duplicate_paragraphs_dropped": dropped}
    return documents, stats


def build_corpus(
    out_dir: str | Path,
    sources: list[str] | None = None,
    max_tokens: int | None = None,
    tokenizer=None,
    seed: int = 0,
    root: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Build the corpus into `out_dir` (corpus.jsonl and corpus.json) and return its metadata.

    sources: names from SOURCES (default: every installed one that needs no download).
    tokenizer: a Hugging Face tokenizer, or the name of a model whose tokenizer to load, to count tokens with
    (needed for max_tokens). root: look for the source files under this folder instead of / (tests use it).
    """
    if max_tokens is not None and tokenizer is None:
        raise BadInputError("max_tokens needs a tokenizer to count with; pass tokenizer=model.tokenizer")
    tokenizer_name = None if tokenizer is None else getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if isinstance(tokenizer, str):
        from modelrecon.models.loading import load

        tokenizer_name, tokenizer = tokenizer, load(tokenizer).tokenizer
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = select_sources(sources, Path(root) if root is not None else None)
    documents, stats = gather(chosen)
    mixed = mix({name: texts for name, texts in documents.items() if texts}, seed)
    counts = {s.name: {"documents": 0, "characters": 0, "tokens": 0} for s, _ in chosen}
    total_tokens, total_chars = 0, sum(len(text) for _, text in mixed)
    with (
        atomic_target(out_dir / "corpus.jsonl", ".jsonl") as temp,
        temp.open("w", encoding="utf-8") as out,
        token_progress(total_chars, enabled=progress, label="writing", unit="chars", rate_unit="char") as advance,
    ):
        for start in range(0, len(mixed), TOKENIZE_BATCH):
            if max_tokens is not None and total_tokens >= max_tokens:
                break
            batch = mixed[start : start + TOKENIZE_BATCH]
            lengths = _token_counts(tokenizer, [t for _, t in batch])
            for (name, text), n_tokens in zip(batch, lengths, strict=True):
                if max_tokens is not None and total_tokens >= max_tokens:
                    break
                out.write(json.dumps({"text": text, "source": name}, ensure_ascii=False) + "\n")
                counts[name]["documents"] += 1
                counts[name]["characters"] += len(text)
                counts[name]["tokens"] += n_tokens
                total_tokens += n_tokens
            advance(sum(len(t) for _, t in batch))
    metadata = _metadata(chosen, counts, stats, tokenizer_name, seed, max_tokens)
    write_text_atomic(out_dir / "corpus.json", json.dumps(metadata, indent=2) + "\n")
    return metadata


def _token_counts(tokenizer, texts: list[str]) -> list[int]:
    if tokenizer is None:
        return [0] * len(texts)
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _metadata(chosen, counts, stats, tokenizer_name, seed, max_tokens) -> dict:
    from modelrecon import __version__

    characters = sum(c["characters"] for c in counts.values()) or 1
    tokens = sum(c["tokens"] for c in counts.values())
    per_source = {}
    for source, _ in chosen:
        count = counts[source.name]
        per_source[source.name] = {
            "kind": source.kind,
            "licence": source.licence,
            "notes": source.notes,
            **count,
            "share_characters": round(count["characters"] / characters, 6),
            "share_tokens": round(count["tokens"] / tokens, 6) if tokens else None,
            **stats[source.name],
        }
    return {
        "format": FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "modelrecon_version": __version__,
        "seed": seed,
        "max_tokens": max_tokens,
        "tokenizer": tokenizer_name,
        "documents": sum(c["documents"] for c in counts.values()),
        "characters": sum(c["characters"] for c in counts.values()),
        "tokens": tokens if tokenizer_name is not None else None,
        "sources": per_source,
    }


def default_corpus(max_tokens: int, tokenizer, root: str | Path | None = None, progress: bool = True) -> Path:
    """The offline default corpus (every installed source) of about `max_tokens` tokens, built once into the modelrecon
    cache and reused: what the `standard` transcoder tier trains on. A one-line error when no source is installed."""
    from modelrecon.models.loading import cache_root

    folder = cache_root() / "corpus" / f"default-{max_tokens}"
    if not (folder / "corpus.json").is_file():  # corpus.json is written last, so its presence means complete
        build_corpus(folder, max_tokens=max_tokens, tokenizer=tokenizer, root=root, progress=progress)
    return folder
