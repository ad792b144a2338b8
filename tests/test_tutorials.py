"""The notebooks in docs/tutorials run: their code cells in order, in one namespace, in a fresh folder (the `assert`
lines in them are the claims they make)."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "docs" / "tutorials").glob("*.ipynb"))

pytestmark = pytest.mark.real_model  # they use the embedded SmolLM2 and its transcoders (built on first use)


def code_cells(path: Path) -> list[str]:
    cells = json.loads(path.read_text())["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


def test_there_is_a_tutorial():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for number, code in enumerate(code_cells(path), 1):
        exec(compile(code, f"{path.name} cell {number}", "exec"), namespace)
