"""Dependencies are declared as imported: every third-party import in src/ (module or function level) is declared in
pyproject.toml, and every declared runtime dependency is imported, apart from the ones listed with their reason."""

import ast
import re
import sys
import tomllib
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "modelrecon"

# Declared but never imported by modelrecon itself: distribution -> why it is needed.
NOT_IMPORTED = {
    "accelerate": "transformers' from_pretrained(gguf_file=...) refuses to load a GGUF without it",
    "s3fs": "fsspec's backend for s3:// URLs, found by fsspec by protocol",
}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> dict[str, str]:
    """Normalised distribution -> the group that declares it (dependencies, or an extra), from pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    groups = {"dependencies": project["dependencies"], **project.get("optional-dependencies", {})}
    return {_norm(re.match(r"[A-Za-z0-9._-]+", req).group()): group for group, reqs in groups.items() for req in reqs}


def _guarded(tree: ast.AST) -> set[int]:
    """Import nodes inside `try: ... except ImportError` (optional packages, used only when installed)."""
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") for h in node.handlers
        ):
            guarded |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return guarded


@cache
def third_party_imports(optional_too: bool = False) -> dict[str, list[str]]:
    """Top-level import name -> where it is imported; `optional_too`: with the imports guarded by `except
    ImportError` (an extra, or a package used only when installed)."""
    found: dict[str, list[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        optional = _guarded(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if (
                    top not in sys.stdlib_module_names
                    and top != "modelrecon"
                    and (optional_too or id(node) not in optional)
                ):
                    found.setdefault(top, []).append(f"{path.relative_to(SRC)}:{node.lineno}")
    return found


@cache
def distributions() -> dict[str, list[str]]:
    return packages_distributions()  # slow: it reads every installed distribution's file list


def test_every_import_is_declared():
    groups = declared()
    missing = []
    for name, where in sorted(third_party_imports().items()):
        candidates = {_norm(d) for d in distributions().get(name, [name])}
        if not candidates & set(groups):
            missing.append(f"{name} (installed as {sorted(candidates)}), imported at {', '.join(where[:3])}")
    assert missing == [], "imported but not declared in pyproject.toml:\n" + "\n".join(missing)


def test_every_runtime_dependency_is_imported():
    imported = {_norm(d) for name in third_party_imports(optional_too=True) for d in distributions().get(name, [name])}
    groups = declared()
    unused = [d for d, group in groups.items() if group != "dev" and d not in imported and d not in NOT_IMPORTED]
    assert unused == [], f"declared but never imported (remove, or say why in NOT_IMPORTED): {unused}"
    assert set(NOT_IMPORTED) <= set(groups) and not set(NOT_IMPORTED) & imported  # the list itself stays true


def test_the_scan_finds_function_level_and_skips_guarded_imports():
    found = third_party_imports()
    assert any(w.startswith("counterfactual/stats.py") for w in found["scipy"])  # imported inside a function
    assert "sae_lens" not in found and "sae_lens" in third_party_imports(optional_too=True)  # used when installed
