"""Peer of `trace_vs_circuit_tracer.py`: one attribution graph with circuit-tracer's own `attribute`.

Runs in a venv with `circuit-tracer` 0.5 (nnsight 0.6.3, transformers <= 4.57.3), not modelrecon. Loads the local
model folder and the transcoder folder (circuit-tracer's format, written by modelrecon's `export_circuit_tracer`)
with `load_transcoders_from_cache` and `ReplacementModel.from_pretrained_and_transcoders(..., backend="nnsight")`,
warms up on the first 8 tokens, then times one `attribute` call on the given token ids and records the peak resident
memory of this process during it (the high-water mark is reset just before). Writes `graph.pt` (the dense adjacency
and what its node order is made of) and `result.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PEER_ENV, versions, write_json  # noqa: E402


def _status_mib(field: str) -> float:
    """A memory line of /proc/self/status (Linux), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_mib() -> float:
    """This process's resident memory now."""
    return _status_mib("VmRSS")


def reset_peak_rss() -> float:
    """This process's resident high-water mark (MiB) since the last reset, then reset it to the current RSS
    (writing 5 to /proc/self/clear_refs, Linux >= 4.0)."""
    peak = _status_mib("VmHWM")
    Path("/proc/self/clear_refs").write_text("5")
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--transcoders", required=True, help="circuit-tracer transcoder folder (config.yaml)")
    parser.add_argument("--ids", required=True, help="JSON list of token ids (BOS first)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--max-feature-nodes", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--backend", default="nnsight", choices=["nnsight", "transformerlens"])
    parser.add_argument("--repeats", type=int, default=1, help="timed calls (the median is reported)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import os

    os.environ.update(PEER_ENV)
    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.utils.caching import load_transcoders_from_cache

    folder = Path(args.transcoders)
    transcoders, _ = load_transcoders_from_cache(
        folder.name, cache_dir=folder.parent, device=torch.device("cpu"), dtype=torch.float32
    )
    model = ReplacementModel.from_pretrained_and_transcoders(
        args.model_dir, transcoders, backend=args.backend, device=torch.device("cpu"), dtype=torch.float32
    )
    ids = json.loads(Path(args.ids).read_text())
    kwargs = dict(max_n_logits=10, desired_logit_prob=0.95, batch_size=args.batch_size)
    attribute(ids[:8], model, max_feature_nodes=min(args.max_feature_nodes, 64), **kwargs)  # warm-up
    loaded = rss_mib()
    reset_peak_rss()
    start = time.perf_counter()
    graph = attribute(ids, model, max_feature_nodes=args.max_feature_nodes, **kwargs)
    times = [time.perf_counter() - start]
    peak = reset_peak_rss()  # of the first timed call
    for _ in range(args.repeats - 1):
        start = time.perf_counter()
        attribute(ids, model, max_feature_nodes=args.max_feature_nodes, **kwargs)
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "adjacency": graph.adjacency_matrix,
            "active_features": graph.active_features,
            "selected_features": graph.selected_features,
            "activation_values": graph.activation_values,
            "logit_tokens": [int(t.vocab_idx) for t in graph.logit_targets],
            "logit_probabilities": graph.logit_probabilities,
            "input_tokens": graph.input_tokens.tolist(),
            "n_layers": graph.cfg.n_layers,
        },
        out / "graph.pt",
    )
    write_json(
        out,
        seconds=seconds,
        all_seconds=times,
        rss_before_mib=loaded,
        peak_rss_mib=peak,
        backend=args.backend,
        threads=torch.get_num_threads(),
        versions={**versions("circuit-tracer"), **versions("nnsight")},
        n_active=int(graph.active_features.shape[0]),
        n_selected=int(graph.selected_features.shape[0]),
    )


if __name__ == "__main__":
    main()
