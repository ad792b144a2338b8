"""Prompt sources for capture: text (one prompt per line), JSONL with a `text` field, Parquet with a `text` column."""

from __future__ import annotations

import json
from pathlib import Path

from modelrecon.errors import BadInputError, reason
from modelrecon.files import read_text


def read_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"prompt file '{path}' does not exist; give a .txt, .jsonl or .parquet file")
    suffix = path.suffix.lower()
    if suffix in (".txt", ".text"):
        prompts = [line for line in read_text(path, "prompt file").splitlines() if line.strip()]
    elif suffix in (".jsonl", ".ndjson"):
        prompts = []
        for number, line in enumerate(read_text(path, "prompt file").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadInputError(
                    f"{path}:{number} is not valid JSON ({exc.msg}); each line must be an object"
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise BadInputError(f'{path}:{number} has no string "text" field; each line needs {{"text": "..."}}')
            prompts.append(record["text"])
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path, columns=["text"])
        except Exception as exc:  # pyarrow raises several kinds for a bad file or a missing column
            raise BadInputError(f"cannot read a 'text' column from Parquet file '{path}': {reason(exc)}") from None
        prompts = [t for t in table.column("text").to_pylist() if isinstance(t, str)]
    else:
        raise BadInputError(
            f"prompt file '{path}' has unknown format '{suffix or 'no suffix'}'; use .txt (one prompt per line), "
            ".jsonl (a 'text' field per line) or .parquet (a 'text' column)"
        )
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise BadInputError(f"prompt file '{path}' holds no non-empty prompts")
    return prompts
