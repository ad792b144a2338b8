"""What the viewer can show under a folder: cubes, attribution graphs (with their feature dashboards and annotations)
and experiment results (patching sweeps, attribution-vs-patching comparisons).

Every artifact gets an id, its path relative to the folder (POSIX). The server only ever opens paths it found here,
so a request can never name a file outside the folder: ids are looked up, not joined onto the folder. Symbolic links
are not followed, hidden folders are skipped, and a JSON file is classified from its first few kilobytes (a graph is
validated in full when it is opened).

The folder may be an fsspec URL (`s3://bucket/results`; storage.py): it is then listed and read through fsspec on
request (nothing is downloaded ahead), only keys under its prefix are listed, and keys with `.`, `..` or empty parts
are skipped; artifacts' paths are URLs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from modelrecon import storage

MAX_FILES = 20_000  # stop scanning a huge tree; the index says it was truncated
_SNIFF = 4096
ANNOTATIONS_SUFFIX = ".annotations.json"
DASHBOARDS_NAME = "features.json"


@dataclass(frozen=True)
class Artifact:
    id: str  # the path relative to the root, POSIX
    kind: str  # cube | graph | sweep | verify | experiment | lens
    path: Path | str  # a URL when the folder is one
    title: str

    def to_dict(self) -> dict:
        return {"id": self.id, "kind": self.kind, "title": self.title}


def _json_kind(path: Path | str) -> str | None:
    """Which artifact a JSON file is, from its opening bytes (the writers put the telling keys first)."""
    try:
        head = storage.read_head(path, _SNIFF).decode("utf-8", errors="replace")
    except OSError:
        return None
    if storage.name(path).endswith(ANNOTATIONS_SUFFIX) or '"schema": "modelrecon-features"' in head:
        return None
    if head.lstrip().startswith('{"metadata"'):  # save_graph's layout (circuit-tracer's files open the same way)
        return "graph"
    if '"spearman"' in head and '"n_cells"' in head:  # attribution.compare.Comparison
        return "verify"
    if all(f'"{key}"' in head for key in ("direction", "metric", "n_pairs")):  # counterfactual.sweep.SweepResult
        return "sweep"
    if '"metric"' in head and '"base"' in head and '"clean"' in head:  # counterfactual.experiment.ExperimentResult
        return "experiment"
    if re.match(r'\{\s*"prompt"', head) and '"tokens"' in head:  # attribution.lens.LensResult
        return "lens"
    return None


def _is_cube(folder: Path) -> bool:
    return (folder / "zarr.json").is_file() and (folder / "tokens").is_dir()


def scan(root: Path | str) -> tuple[dict[str, Artifact], bool]:
    """(id -> artifact, truncated) for everything the viewer can show under `root` (a folder or a URL)."""
    if storage.is_url(root):
        return _scan_url(str(root).rstrip("/"))
    root = Path(root).resolve()
    found: dict[str, Artifact] = {}
    seen = 0
    for folder, dirs, files in os.walk(root, followlinks=False):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (here / d).is_symlink())
        for d in list(dirs):
            if _is_cube(here / d):
                dirs.remove(d)  # a cube's chunks are not artifacts of their own
                rel = (here / d).relative_to(root).as_posix()
                found[rel] = Artifact(rel, "cube", here / d, d)
        for name in sorted(files):
            seen += 1
            if seen > MAX_FILES:
                return found, True
            path = here / name
            if not name.endswith(".json") or path.is_symlink():
                continue
            kind = _json_kind(path)
            if kind is not None:
                rel = path.relative_to(root).as_posix()
                title = rel if name != "graph.json" else path.parent.name or rel
                found[rel] = Artifact(rel, kind, path, title)
    return found, False


def _scan_url(url: str) -> tuple[dict[str, Artifact], bool]:
    """`scan` of a URL prefix: one listing per folder (none inside a cube), one ranged read per JSON file."""
    fs, base = storage.filesystem(url)
    base = base.rstrip("/")
    fs.invalidate_cache()  # list what is there now, not what an earlier scan saw
    found: dict[str, Artifact] = {}
    seen = 0
    for folder, dirs, files in fs.walk(base, topdown=True):
        here = "" if folder.rstrip("/") == base else storage.relative_key(folder, base)
        if here is None:  # not strictly below the prefix
            dirs[:] = []
            continue
        if here and "zarr.json" in files and "tokens" in dirs:  # a cube: its chunks are not artifacts of their own
            dirs[:] = []
            found[here] = Artifact(here, "cube", f"{url}/{here}", here.rsplit("/", 1)[-1])
            continue
        dirs[:] = sorted(d for d in dirs if d and not d.startswith(".") and "\\" not in d)
        for name in sorted(files):
            seen += 1
            if seen > MAX_FILES:
                return found, True
            rel = f"{here}/{name}" if here else name
            if not name.endswith(".json") or storage.relative_key(f"{base}/{rel}", base) is None:
                continue
            kind = _json_kind(f"{url}/{rel}")
            if kind is not None:
                title = rel if name != "graph.json" else here.rsplit("/", 1)[-1] or rel
                found[rel] = Artifact(rel, kind, f"{url}/{rel}", title)
    return found, False


def annotations_path(graph: Path | str) -> Path | str:
    return storage.sibling(graph, storage.name(graph).removesuffix(".json") + ANNOTATIONS_SUFFIX)


def dashboards_path(graph: Path | str) -> Path | str:
    return storage.sibling(graph, DASHBOARDS_NAME)
