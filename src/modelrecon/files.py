"""Writing result files safely: every writer writes a temporary file beside the target and renames it into place,
so an error or Ctrl-C never leaves a half-written file."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from modelrecon.errors import BadInputError


@contextmanager
def atomic_target(out: str | Path, suffix: str) -> Iterator[Path]:
    """Yield a temporary path beside `out`; on success it replaces `out`, on failure it is removed."""
    out = Path(out)
    try:
        handle, temp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=suffix)
    except OSError as exc:
        raise BadInputError(f"cannot write '{out}': {exc.strerror}; choose a writable output path") from None
    os.close(handle)
    try:
        yield Path(temp)
        os.replace(temp, out)
    finally:
        Path(temp).unlink(missing_ok=True)


def write_text_atomic(out: str | Path, text: str) -> Path:
    with atomic_target(out, Path(out).suffix or ".tmp") as temp:
        temp.write_text(text, encoding="utf-8")
    return Path(out)


def json_safe(value):
    """A copy of nested dicts/lists with NaN and infinities as None: JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
