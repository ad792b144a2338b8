"""Interop check: modelrecon's SAELens and circuit-tracer exports, loaded by the real `sae-lens` and `circuit-tracer`.

In this (the project's) venv: small random dictionaries of every kind and activation that each format supports
(d_model 16, width 32, normalisation scales not 1, so folding is exercised) are exported to a temporary folder, with
reference inputs and modelrecon's outputs (`encode`, `decode`, `forward`) in safetensors files. Then
`peers/interop_load.py` runs in a peer venv that has `sae-lens` and `circuit-tracer` (and no modelrecon), loads every
export with the package's own loader and compares its outputs with modelrecon's: a case passes when the largest
absolute difference is at most 1e-5.

Run: `.venv/bin/python benchmarks/interop_dictionaries.py --peer-python .bench-venvs/interop/bin/python`
(docs/dictionary-formats.md has the pip commands for that venv). Exit code 1 when a case fails or the peer cannot run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from capture_overhead import ROOT, add_run_arguments, start_run
from modelrecon.dictionaries.formats import export_circuit_tracer, export_saelens
from modelrecon.dictionaries.model import Dictionary, DictionaryConfig
from peers.common import run_peer_script

HERE = Path(__file__).resolve().parent
TOLERANCE = 1e-5
D_MODEL, WIDTH, N_LAYERS, N_POS = 16, 32, 3, 24
SAELENS_CASES = [(kind, act) for kind in ("sae", "transcoder", "skip-transcoder")
                 for act in ("relu", "topk", "batchtopk", "jumprelu") if kind == "sae" or act != "topk"]  # fmt: skip
CIRCUIT_TRACER_CASES = [(kind, act) for kind in ("transcoder", "skip-transcoder", "clt")
                        for act in ("relu", "batchtopk", "jumprelu")]  # fmt: skip


def random_dictionary(kind: str, activation: str, layer: int, n_layers: int, seed: int) -> Dictionary:
    """`initialise` on random activations, then noise on every parameter and random BatchTopK thresholds."""
    suffix_in, suffix_out = ("resid_post", "resid_post") if kind == "sae" else ("mlp.in", "mlp.out")
    layers = range(layer, layer + n_layers)
    config = DictionaryConfig(
        kind=kind, d_in=D_MODEL, d_out=D_MODEL, width=WIDTH, activation=activation,
        k=6 if activation in ("topk", "batchtopk") else None,
        input_sites=tuple(f"layers.{i}.{suffix_in}" for i in layers),
        output_sites=tuple(f"layers.{i}.{suffix_out}" for i in layers),
        provenance={"model": "random", "seed": seed, "recipe": "interop check"},
    )  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    dictionary = Dictionary(config)
    x = 3 * torch.randn(256, n_layers, D_MODEL, generator=generator) + 1
    y = x if kind == "sae" else 2 * torch.randn(256, n_layers, D_MODEL, generator=generator)
    dictionary.initialise(x, y, seed)
    with torch.no_grad():
        for parameter in dictionary.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
        dictionary.threshold.copy_(0.3 * torch.rand(dictionary.threshold.shape, generator=generator))
    return dictionary.eval()


def reference(dictionaries: list[Dictionary], seed: int) -> dict[str, torch.Tensor]:
    """Inputs and modelrecon's outputs, `[pos, d]` for one SAELens dictionary, `[layer, pos, d]` for circuit-tracer."""
    generator = torch.Generator().manual_seed(seed)
    n = max(d.config.n_layers for d in dictionaries) if dictionaries[0].config.kind == "clt" else len(dictionaries)
    x = 3 * torch.randn(N_POS, n, D_MODEL, generator=generator) + 1  # [pos, layer, d]
    with torch.no_grad():
        if dictionaries[0].config.kind == "clt":
            f = dictionaries[0].encode(x)
            y = dictionaries[0].decode(f, x)
        else:
            f = torch.stack([d.encode(x[:, i]) for i, d in enumerate(dictionaries)], 1)
            y = torch.stack([d.decode(f[:, i], x[:, i]) for i, d in enumerate(dictionaries)], 1)
    return {"x": x.transpose(0, 1), "f": f.transpose(0, 1), "y": y.transpose(0, 1)}


def build_cases(work: Path, seed: int) -> list[dict]:
    cases = []
    for i, (kind, activation) in enumerate(SAELENS_CASES):
        dictionary = random_dictionary(kind, activation, 2, 1, seed + i)
        folder = work / f"saelens-{kind}-{activation}"
        export_saelens(dictionary, folder)
        ref = {k: v[0].contiguous() for k, v in reference([dictionary], seed + 100 + i).items()}
        if kind != "skip-transcoder":
            ref["y_decode"] = ref["y"].clone()
        cases.append({"format": "saelens", "kind": kind, "activation": activation, "folder": str(folder), "ref": ref})
    for i, (kind, activation) in enumerate(CIRCUIT_TRACER_CASES):
        if kind == "clt":
            dictionaries = [random_dictionary(kind, activation, 0, N_LAYERS, seed + 200 + i)]
        else:
            dictionaries = [random_dictionary(kind, activation, layer, 1, seed + 200 + i + 10 * layer)
                            for layer in range(N_LAYERS)]  # fmt: skip
        folder = work / f"circuit-tracer-{kind}-{activation}"
        export_circuit_tracer(dictionaries[0] if kind == "clt" else dictionaries, folder)
        ref = {k: v.contiguous() for k, v in reference(dictionaries, seed + 300 + i).items()}
        cases.append({"format": "circuit-tracer", "kind": kind, "activation": activation, "folder": str(folder),
                      "ref": ref})  # fmt: skip
    for case in cases:
        path = Path(case["folder"] + ".reference.safetensors")
        save_file(case.pop("ref"), str(path))
        case["reference"] = str(path)
    return cases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    default_peer = ROOT / ".bench-venvs" / "interop" / "bin" / "python"
    parser.add_argument("--peer-python", type=Path, default=default_peer, help="python of a venv with the peers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="write the exports here (kept) instead of a temporary folder")
    parser.add_argument("--peer-timeout", type=int, default=600)
    args = parser.parse_args()
    start_run(args)
    if not args.peer_python.exists():
        print(
            f"no peer python at {args.peer_python}; create the venv (docs/dictionary-formats.md) or pass --peer-python"
        )
        return 1
    with tempfile.TemporaryDirectory(prefix="modelrecon-interop-") as temp:
        work = args.keep or Path(temp)
        work.mkdir(parents=True, exist_ok=True)
        cases = build_cases(work, args.seed)
        (work / "cases.json").write_text(json.dumps(cases, indent=2))
        out = work / "result.json"
        command = [str(args.peer_python), str(HERE / "peers" / "interop_load.py"), "--cases", str(work / "cases.json"),
                   "--out", str(out)]  # fmt: skip
        if not run_peer_script("sae-lens + circuit-tracer", command, args.peer_timeout):
            return 1
        result = json.loads(out.read_text())
    print(f"peer versions: {result['versions']}; modelrecon exports, d_model {D_MODEL}, width {WIDTH}, "
          f"{N_LAYERS} layers for circuit-tracer, {N_POS} positions; pass: max |diff| <= {TOLERANCE:g}")  # fmt: skip
    print("| format | kind | activation | loaded by | encode | decode | forward | result |")
    print("|---|---|---|---|---|---|---|---|")
    failed = 0
    for row in result["results"]:
        if "error" in row:
            failed += 1
            print(
                f"| {row['format']} | {row['kind']} | {row['activation']} | ERROR: {row['error'][:120]} | | | | FAIL |"
            )
            continue
        diffs = row["diffs"]
        ok = all(v <= TOLERANCE for v in diffs.values())
        failed += not ok
        cells = [f"{diffs[k]:.1e}" if k in diffs else "n/a (skip path)" for k in ("encode", "decode", "forward")]
        print(f"| {row['format']} | {row['kind']} | {row['activation']} | {row['loader']} | {' | '.join(cells)} | "
              f"{'ok' if ok else 'FAIL'} |")  # fmt: skip
    print(f"{len(result['results']) - failed} of {len(result['results'])} cases match")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
