"""Writing result files and folders safely: every writer writes a temporary file or folder beside the target and
renames it into place, so an error or Ctrl-C never leaves a half-written one."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from modelrecon.errors import BadInputError, reason


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


@contextmanager
def atomic_folder(folder: str | Path, shared: str | None = None) -> Iterator[Path]:
    """Yield a new temporary folder beside `folder`; on success it takes `folder`'s place, on an error or Ctrl-C it is
    removed and `folder` is left as it was. An existing `folder` is moved aside, not deleted, until the new one is in.

    shared: for a cache that other processes may build at the same time, the name of the file that marks a finished
    folder. A finished folder is then never replaced: the process that renames first wins, the others drop their copy
    (the content is the same), and no process sees a half-written folder or loses one it is reading."""
    folder = Path(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    except OSError as exc:
        raise BadInputError(f"cannot write '{folder}': {reason(exc)}; choose a writable folder") from None
    try:
        yield temp
        if shared is not None:
            try:  # one rename: a finished folder is never moved aside, so a process reading it never loses it
                os.replace(temp, folder)
                return
            except OSError:
                if (folder / shared).is_file():
                    return
        old = folder.parent / f".{folder.name}.{uuid.uuid4().hex}.old"
        if folder.exists():
            os.replace(folder, old)
        try:
            os.replace(temp, folder)
        except OSError as exc:
            if old.exists():
                os.replace(old, folder)
            raise BadInputError(f"cannot write '{folder}': {reason(exc)}; choose a writable folder") from None
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def write_text_atomic(out: str | Path, text: str) -> Path:
    with atomic_target(out, Path(out).suffix or ".tmp") as temp:
        temp.write_text(text, encoding="utf-8")
    return Path(out)


def read_text(path: str | Path, what: str) -> str:
    """A UTF-8 text file's content, or a one-line BadInputError naming it (missing, a folder, unreadable, not UTF-8):
    the readers of prompt, pair and component files share this instead of each catching a different subset."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInputError(f"{what} '{path}' does not exist; check the path") from None
    except IsADirectoryError:
        raise BadInputError(f"{what} '{path}' is a folder; give a file") from None
    except UnicodeDecodeError as exc:
        raise BadInputError(f"{what} '{path}' is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise BadInputError(f"cannot read {what} '{path}': {exc.strerror or exc}") from None


def json_safe(value):
    """A copy of nested dicts/lists with NaN and infinities as None: JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
