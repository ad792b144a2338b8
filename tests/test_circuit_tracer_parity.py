"""The attribution graph equals circuit-tracer's on the same tiny Llama and transcoders (8 tokens, every active
feature attributed), through `benchmarks/trace_vs_circuit_tracer.py`. Needs the peer venv with circuit-tracer
(`make interop-env`); skipped without it."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT / ".bench-venvs" / "interop" / "bin" / "python"


@pytest.mark.skipif(not PEER.exists(), reason="no circuit-tracer venv at .bench-venvs/interop (make interop-env)")
def test_adjacency_equals_circuit_tracers(tmp_path):
    script = ROOT / "benchmarks" / "trace_vs_circuit_tracer.py"
    command = [sys.executable, str(script), "--peer-python", str(PEER), "--lengths", "8", "--active", "3",
               "--keep", str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| 8 |" in done.stdout and "| ok |" in done.stdout
