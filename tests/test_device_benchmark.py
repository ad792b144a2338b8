"""The device benchmark (benchmarks/device_benchmark.py) runs here on the CPU with `--small`, so the script a GPU
run depends on cannot rot: every stage reports, and its figures are sane."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_benchmark_runs_every_stage_on_the_cpu(tmp_path):
    out = tmp_path / "small.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_benchmark.py"), "--device", "cpu",
                           "--small", "--dtype", "float32", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and set(report["models"]) == {"llama-135m", "gemma2-2b"}
    for name, entry in report["models"].items():
        capture, training = entry["capture"], entry["training"]
        assert capture["plain_tok_s"] > 0 and 0 < capture["recorded_vs_plain"] < 2, name
        assert capture["cube_tok_s"] > 0
        assert training["steps_only_tok_s"] > 0 and training["with_model_tok_s"] > 0
        assert [row["tokens"] for row in entry["attribution"]] == [16, 64]
        for row in entry["attribution"]:
            assert "error" not in row, row
            assert row["edge_check_error"] < 1e-4 and row["nodes"] > 0 and row["peak_gib"] > 0
