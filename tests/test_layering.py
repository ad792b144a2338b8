"""Imports go one way: every import in src/ (module and function level, parsed with `ast`) goes from a package to
one in a row below it in the README's layer picture, which this test reads, apart from the upward imports listed."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "modelrecon"

# Upward imports allowed inside a function only (the package above loads when it is asked for): module -> reason.
LAZY_UPWARD = {
    "modelrecon.web.notebook": "rich display and HTML pages render through the viewer's one front end",
    "modelrecon.scale.graphs": "circuits runs trace --prompts and graph-eval on a Ray cluster (--ray)",
}


def layers() -> dict[str, int]:
    """Package -> row in the README's picture, counted from the bottom (0: the foundation modules)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Layers\n.*?```text\n(.*?)```", text, re.S)
    assert block, "README.md has no '## Layers' section with a text block"
    rows = [line.split("  ")[0].split() for line in block.group(1).splitlines() if line.strip()]
    return {name: row for row, names in enumerate(reversed(rows)) for name in names}


def imports() -> list[tuple[str, str, str, bool]]:
    """(importing package, imported module, where, inside a function) for every modelrecon import in src/."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        relative = path.relative_to(SRC)
        package = relative.parts[0] if len(relative.parts) > 1 else relative.stem
        here = ["modelrecon", *relative.with_suffix("").parts]  # the module's dotted name
        here = here[:-1] if here[-1] == "__init__" else here
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, up level - 1 more
                    anchor = here if path.name == "__init__.py" else here[:-1]
                    base = ".".join(anchor[: len(anchor) - node.level + 1] + ([base] if base else []))
                # `from modelrecon import storage` imports a module; `from modelrecon import __version__`, the root
                modules = [base] if base != "modelrecon" else [
                    f"modelrecon.{a.name}" if (SRC / a.name).exists() or (SRC / f"{a.name}.py").exists()
                    else "modelrecon" for a in node.names]  # fmt: skip
            else:
                continue
            for module in modules:
                if module.startswith("modelrecon."):
                    found.append((package, module, f"{relative}:{node.lineno}", id(node) not in top))
    return found


def test_the_picture_names_every_package():
    packages = {p.name for p in SRC.iterdir() if (p / "__init__.py").exists()}
    modules = {p.stem for p in SRC.glob("*.py") if not p.stem.startswith("__")} - {"_lazy"}
    assert packages | modules == set(layers()), "README.md's layer picture and src/modelrecon/ differ"


def test_every_import_goes_down():
    rows = layers()
    foundation = {name for name, row in rows.items() if row == 0}
    wrong = []
    for package, module, where, lazy in imports():
        target = module.split(".")[1]
        if package == "__init__" or target == package or target == "_lazy":  # the root re-exports all, lazily
            continue
        if package in foundation and target in foundation:  # the foundation's helpers use each other
            continue
        if rows[target] < rows[package]:
            continue
        if lazy and any(module == m or module.startswith(m + ".") for m in LAZY_UPWARD):
            continue
        wrong.append(f"{where}: {package} (row {rows[package]}) imports {module} (row {rows[target]})"
                     f"{' in a function' if lazy else ''}")  # fmt: skip
    assert wrong == [], "imports against the README's layers:\n" + "\n".join(wrong)


def test_the_check_sees_function_level_imports():
    """The allowed upward imports are found (so a new one would be too), and each is inside a function."""
    seen = {(package, module): lazy for package, module, _, lazy in imports() if module in LAZY_UPWARD}
    assert ("circuits", "modelrecon.scale.graphs") in seen and ("attribution", "modelrecon.web.notebook") in seen
    assert all(seen.values())
