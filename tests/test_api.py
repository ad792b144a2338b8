"""The public API: every area's entry points resolve from `modelrecon` (imported on first use), `import modelrecon`
and the CLI's start import no heavy library, and docs/python-api.md lists every public name on one page."""

import importlib
import pkgutil
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import modelrecon

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "zarr", "numpy", "safetensors", "starlette")


def test_import_and_cli_start_load_no_heavy_library():
    code = (
        "import sys, modelrecon, modelrecon.cli, modelrecon.circuits, modelrecon.dictionaries, modelrecon.cube\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]", f"importing modelrecon or its CLI loaded {loaded}"


def test_help_lists_every_command_and_models_runs_without_torch():
    out = subprocess.run([sys.executable, "-m", "modelrecon.cli", "--help"], capture_output=True, text=True,
                         check=True, env={"COLUMNS": "200", "PATH": ""}).stdout  # fmt: skip
    commands = (
        "models",
        "run",
        "capture",
        "cube",
        "patch",
        "experiment",
        "lens",
        "attribute",
        "verify",
        "train",
        "transcoders",
        "eval-dict",
        "trace",
        "graph-eval",
        "explain",
        "serve",
        "corpus",
        "groundtruth",
    )
    for command in commands:
        assert re.search(rf"│ {re.escape(command)} ", out), f"--help does not list {command}"
    code = "import sys; from modelrecon.cli import main\ntry:\n    main(['models'])\nexcept SystemExit: pass\n"
    code += "print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "smollm2-135m" in result.stdout and result.stdout.strip().endswith("False")


def _areas():
    return [modelrecon, *(importlib.import_module(f"modelrecon.{area}") for area in modelrecon.AREAS)]


@pytest.mark.parametrize("package", _areas(), ids=lambda p: p.__name__)
def test_every_exported_name_resolves_to_the_object_not_a_module(package):
    for name in package.__all__:
        value = getattr(package, name)
        assert not isinstance(value, types.ModuleType), f"{package.__name__}.{name} is a module"
        assert name in dir(package)


def test_a_submodule_import_does_not_shadow_the_function_of_its_name():
    """`cube.capture` is the function even after `modelrecon.cube.capture` (the module) is imported, as with an eager
    `from .capture import capture`; the module stays importable by its full name."""
    for name in [m.name for m in pkgutil.walk_packages(modelrecon.__path__, "modelrecon.")]:
        if not name.startswith(("modelrecon.scale", "modelrecon.cli.__main__")):
            importlib.import_module(name)
    for package, name in [("cube", "capture"), ("hooks", "run"), ("dictionaries", "train"),
                          ("dictionaries", "evaluate"), ("counterfactual", "sweep"), ("counterfactual", "experiment"),
                          ("circuits", "attribute")]:  # fmt: skip
        value = getattr(importlib.import_module(f"modelrecon.{package}"), name)
        assert callable(value) and not isinstance(value, types.ModuleType), f"{package}.{name}"
        assert isinstance(sys.modules[f"modelrecon.{package}.{name}"], types.ModuleType)
    assert modelrecon.capture is modelrecon.cube.capture


def test_the_api_page_lists_every_public_name():
    page = (ROOT / "docs" / "python-api.md").read_text(encoding="utf-8")
    missing = [n for n in modelrecon.__all__ if f"`{n}" not in page and f"mr.{n}" not in page]
    assert not missing, f"docs/python-api.md does not list {missing}"
    for area in modelrecon.AREAS:
        assert f"modelrecon.{area}" in page, f"docs/python-api.md does not name the area modelrecon.{area}"
