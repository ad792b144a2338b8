"""The examples in the README and docs/ run: python blocks in order per file, `modelrecon ...` lines via the CLI
(and `echo ... > file` lines, which write the files the commands read)."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from modelrecon.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)

pytestmark = pytest.mark.real_model  # the examples use the embedded SmolLM2


def blocks(path: Path, language: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(path.read_text()) if lang == language]


@pytest.fixture
def docs_dir(tmp_path, monkeypatch, smollm2):
    """Examples run in a fresh folder holding the cube the format doc reads (`demo.zarr`)."""
    monkeypatch.chdir(tmp_path)
    import modelrecon as mr

    mr.capture(smollm2, "The capital of France is", "demo.zarr", progress=False)
    return tmp_path


@pytest.mark.parametrize("path", [p for p in DOCS if blocks(p, "python")], ids=lambda p: p.name)
def test_python_examples_run(path, docs_dir):
    namespace: dict = {}
    for code in blocks(path, "python"):
        exec(compile(code, str(path), "exec"), namespace)


@pytest.mark.parametrize("path", [p for p in DOCS if blocks(p, "bash")], ids=lambda p: p.name)
def test_cli_examples_run(path, docs_dir):
    lines = [line for code in blocks(path, "bash") for line in code.splitlines()]
    commands = [line.split("#")[0].strip() for line in lines if line.startswith("modelrecon ")]
    assert commands or path.name == "README.md"
    for line in lines:
        if line.startswith("echo ") and (" > " in line or " >> " in line):
            subprocess.run(["bash", "-c", line], cwd=docs_dir, check=True)
            continue
        if not line.startswith("modelrecon "):
            continue
        command = line.split("#")[0].strip()
        with pytest.raises(SystemExit) as exit_info:
            main(shlex.split(command)[1:])
        assert not exit_info.value.code, command
