"""Peer of `interop_dictionaries.py`: load modelrecon's exports with the real SAELens and circuit-tracer packages.

Runs in a venv with `sae-lens` and `circuit-tracer` (not modelrecon). For every case listed in `cases.json` it loads
the folder with the package's own loader (SAELens `SAE.load_from_disk`; circuit-tracer `load_transcoders_from_cache`,
which reads `config.yaml` and then `load_transcoder_set` / `load_clt`), runs encode / decode / forward on the
reference inputs and writes the largest absolute difference to modelrecon's outputs in `result.json`.
"""

from __future__ import annotations

import argparse
import json
import traceback
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise ValueError(f"shape {list(a.shape)} != reference {list(b.shape)}")
    return float((a.float() - b.float()).abs().max())


def check_saelens(case: dict, ref: dict[str, torch.Tensor]) -> dict:
    from sae_lens import SAE

    sae = SAE.load_from_disk(case["folder"], device="cpu")
    sae.eval()
    x = ref["x"]
    diffs = {"encode": max_diff(sae.encode(x), ref["f"]), "forward": max_diff(sae(x), ref["y"])}
    if "y_decode" in ref:  # SAELens' decode leaves out a skip transcoder's skip path (its forward adds it)
        diffs["decode"] = max_diff(sae.decode(ref["f"]), ref["y_decode"])
    return {"loader": f"SAE.load_from_disk -> {type(sae).__name__}", "diffs": diffs}


def check_circuit_tracer(case: dict, ref: dict[str, torch.Tensor]) -> dict:
    from circuit_tracer.utils.caching import load_transcoders_from_cache

    folder = Path(case["folder"])
    transcoders, config = load_transcoders_from_cache(
        folder.name, cache_dir=folder.parent, device=torch.device("cpu"), dtype=torch.float32
    )
    x = ref["x"]  # [layer, pos, d_model]
    f = transcoders.encode(x)
    if f.is_sparse:
        f = f.to_dense()
    if case["kind"] == "clt":
        y = transcoders.decode(ref["f"].to_sparse(), x)
        y_forward = transcoders(x)
    else:
        y = transcoders.decode(ref["f"], x)
        y_forward = torch.stack([tc(x[i]) for i, tc in enumerate(transcoders)])
    diffs = {"encode": max_diff(f, ref["f"]), "decode": max_diff(y, ref["y"]), "forward": max_diff(y_forward, ref["y"])}
    name = type(transcoders).__name__
    hooks = f"{config['feature_input_hook']} -> {config['feature_output_hook']}"
    return {"loader": f"load_transcoders_from_cache -> {name} ({hooks})", "diffs": diffs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", required=True, help="cases.json written by interop_dictionaries.py")
    parser.add_argument("--out", required=True, help="result.json to write")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    cases = json.loads(Path(args.cases).read_text())
    results = []
    for case in cases:
        ref = load_file(case["reference"])
        try:
            check = check_saelens if case["format"] == "saelens" else check_circuit_tracer
            results.append({**case, **check(case, ref)})
        except Exception as exc:  # report every case, even when one loader fails
            results.append({**case, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
    packages = {p: version(p) for p in ("sae-lens", "circuit-tracer", "torch")}
    Path(args.out).write_text(json.dumps({"versions": packages, "results": results}, indent=2))


if __name__ == "__main__":
    main()
