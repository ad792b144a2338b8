"""Where results live: a local path or any fsspec URL (s3://, gs://, file://, memory://, ...).

Local paths keep their atomic renames (files.py). Object stores have no rename, but one object is written whole or
not at all, so remote writers put each file in one request and write the file that marks a result complete last.
Credentials and endpoints come from the usual places (environment variables such as AWS_ENDPOINT_URL, config files);
fsspec and the protocol's package (s3fs, gcsfs) come with the `scale` extra.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from modelrecon.errors import BadInputError, ModelreconError

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(location: str | Path) -> bool:
    """True for 'scheme://...' other than file:// (which is a local path)."""
    text = str(location)
    return bool(_URL.match(text)) and not text.startswith("file://")


def local_path(location: str | Path) -> Path:
    """A local location as a Path (file:// stripped)."""
    text = str(location)
    return Path(text.removeprefix("file://")) if text.startswith("file://") else Path(text)


def location(value: str | Path) -> str | Path:
    """What the library keeps: a URL as a string (without a trailing slash), anything else as a Path."""
    return str(value).rstrip("/") if is_url(value) else local_path(value)


def join(base: str | Path, *parts: str) -> str | Path:
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return Path(base).joinpath(*parts)


def filesystem(url: str):
    """(fsspec filesystem, path within it) for a URL; a one-line error when fsspec or the protocol is missing."""
    try:
        import fsspec
    except ImportError:
        raise BadInputError(
            f"'{url}' is a URL: reading and writing URLs needs fsspec: pip install 'modelrecon[scale]'"
        ) from None
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise BadInputError(f"cannot open '{url}': {exc}; install the package for its protocol (e.g. s3fs)") from None
    return fs, path


def exists(target: str | Path) -> bool:
    if not is_url(target):
        return local_path(target).exists()
    fs, path = filesystem(str(target))
    return bool(fs.exists(path))


def read_bytes(target: str | Path) -> bytes:
    """The file's bytes; FileNotFoundError when it is not there (local or remote)."""
    if not is_url(target):
        return local_path(target).read_bytes()
    fs, path = filesystem(str(target))
    return fs.cat_file(path)


def write_bytes(target: str | Path, data: bytes) -> None:
    """Write a whole file: atomically replaced locally, one PUT on an object store (whole or not at all)."""
    if not is_url(target):
        from modelrecon.files import atomic_target

        target = local_path(target)
        with atomic_target(target, target.suffix or ".tmp") as temp:
            temp.write_bytes(data)
        return
    fs, path = filesystem(str(target))
    fs.pipe_file(path, data)


def remove_tree(target: str | Path) -> None:
    """Delete a folder (or prefix) and everything below it; nothing when it is not there."""
    if not is_url(target):
        import shutil

        shutil.rmtree(local_path(target), ignore_errors=True)
        return
    fs, path = filesystem(str(target))
    if fs.exists(path):
        fs.rm(path, recursive=True)


def zarr_store(target: str | Path, read_only: bool = False):
    """The zarr store for a cube's location: a local folder or an fsspec URL (zarr's FsspecStore)."""
    if not is_url(target):
        return local_path(target)
    filesystem(str(target))  # the one-line error when fsspec or the protocol's package is missing
    from zarr.storage import FsspecStore

    return FsspecStore.from_url(str(target), read_only=read_only)


# --- folders: a whole folder published to a URL, a remote folder read -----------------------------------------------
def name(target: str | Path) -> str:
    """The last component of a location (a URL's key name or a path's name)."""
    return str(target).rstrip("/").rsplit("/", 1)[-1] if is_url(target) else local_path(target).name


def parent(target: str | Path) -> str | Path:
    """The folder a location is in."""
    return str(target).rstrip("/").rsplit("/", 1)[0] if is_url(target) else local_path(target).parent


def sibling(target: str | Path, other: str) -> str | Path:
    """`other` in the same folder as `target`."""
    return join(parent(target), other)


def is_file(target: str | Path) -> bool:
    if not is_url(target):
        return local_path(target).is_file()
    fs, path = filesystem(str(target))
    return bool(fs.isfile(path))


def is_dir(target: str | Path) -> bool:
    """A local folder, or a URL prefix with something under it."""
    if not is_url(target):
        return local_path(target).is_dir()
    fs, path = filesystem(str(target))
    return bool(fs.isdir(path))


def stamp(target: str | Path) -> object:
    """A value that changes when the file changes (modification time locally, ETag / time / size remotely)."""
    if not is_url(target):
        return local_path(target).stat().st_mtime_ns
    fs, path = filesystem(str(target))
    fs.invalidate_cache(path)  # not a listing cached before the file was rewritten
    info = fs.info(path)
    return tuple(str(info.get(key)) for key in ("ETag", "LastModified", "mtime", "size"))


def read_head(target: str | Path, size: int) -> bytes:
    """The first `size` bytes of a file (one ranged request remotely)."""
    if not is_url(target):
        with open(local_path(target), "rb") as handle:
            return handle.read(size)
    fs, path = filesystem(str(target))
    return fs.cat_file(path, start=0, end=size)


def relative_key(key: str, base: str) -> str | None:
    """`key` relative to the prefix `base`, or None when it is not strictly below it or has a '.', '..' or empty
    part (an object store allows such keys; written out as local paths they could leave the target folder)."""
    base = base.rstrip("/") + "/"
    if not key.startswith(base):
        return None
    relative = key[len(base) :]
    parts = relative.split("/")
    if any(part in ("", ".", "..") or "\\" in part for part in parts):
        return None
    return relative


def list_files(target: str | Path) -> list[str]:
    """Every file under a folder or URL prefix, as sorted POSIX paths relative to it ([] when there is none)."""
    if not is_url(target):
        root = local_path(target)
        if not root.is_dir():
            return []
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    fs, path = filesystem(str(target))
    if not fs.isdir(path):
        return []
    found = (relative_key(key, path) for key in fs.find(path))
    return sorted(r for r in found if r is not None)


def publish_folder(source: Path, target: str, markers: tuple[str, ...]) -> None:
    """Copy a finished local folder to a URL so that no reader ever takes a partial copy for a complete one.

    Object stores cannot rename a folder into place, so: the old copy's marker files (those whose presence means
    "complete", e.g. config.json) are deleted first, then the rest of the old copy, then every new file is written
    whole (one PUT each) and the markers last. An interrupted publish leaves files without their marker, which
    readers refuse (`check_complete`)."""
    fs, path = filesystem(target)
    path = path.rstrip("/")
    for marker in markers:
        if fs.exists(f"{path}/{marker}"):
            fs.rm_file(f"{path}/{marker}")
    remove_tree(target)
    files = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
    order = [f for f in files if f not in markers] + [f for f in markers if f in files]
    for relative in order:
        fs.put_file(str(source / relative), f"{path}/{relative}")
    fs.invalidate_cache(path)


def check_complete(target: str, markers: tuple[str, ...], what: str) -> None:
    """One-line BadInputErrors for a URL that holds nothing, or files without any of the `markers` (their writer
    writes those last, so this is a copy that is still being written or whose writer was interrupted)."""
    fs, path = filesystem(target)
    fs.invalidate_cache(path.rstrip("/"))
    if any(fs.exists(f"{path.rstrip('/')}/{marker}") for marker in markers):
        return
    if not fs.isdir(path):
        raise BadInputError(f"nothing at '{target}'; give the URL of a {what}")
    raise BadInputError(f"'{target}' has no {' or '.join(markers)}: it is an incomplete {what} (still being written, "
                        f"or its writer was interrupted); write it again")  # fmt: skip


def download_folder(target: str, dest: Path) -> None:
    """Copy every file under a URL prefix into the local folder `dest` (keys that are not plain relative paths are
    skipped: nothing is written outside `dest`)."""
    fs, path = filesystem(target)
    path = path.rstrip("/")
    for relative in list_files(target):
        local = dest.joinpath(*relative.split("/"))
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(f"{path}/{relative}", str(local))


@contextmanager
def local_copy(target: str | Path) -> Iterator[Path]:
    """A local folder holding `target`: the folder itself when it is local, else a temporary copy of everything
    under the URL (deleted afterwards). A modelrecon error raised inside that names the copy names the URL."""
    if not is_url(target):
        yield local_path(target)
        return
    url = str(target).rstrip("/")
    with tempfile.TemporaryDirectory(prefix="modelrecon-") as temp:
        download_folder(url, Path(temp))
        try:
            yield Path(temp)
        except ModelreconError as exc:
            if temp not in str(exc):
                raise
            raise type(exc)(str(exc).replace(temp, url)) from None
