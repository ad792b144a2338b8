"""One attribution graph of a long prompt on the embedded model: time, peak resident memory, nodes and edges.

    /usr/bin/time -v .venv/bin/python benchmarks/long_prompt.py --tokens 2048 [--transcoders demo] [--budget 1000]

The prompt is the shipped sample corpus's texts run together and cut to `--tokens` tokens.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import modelrecon as mr
from modelrecon.circuits.attribute import attribute
from modelrecon.dictionaries.defaults import transcoders_by_name

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "modelrecon" / "data" / "corpus_sample.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--transcoders", default="demo")
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    model = mr.load(args.model, device=args.device)
    ids: list[int] = []
    for line in SAMPLE.read_text().splitlines():
        ids += model.encode(json.loads(line)["text"])[1:]
        if len(ids) >= args.tokens:
            break
    prompt = model.tokenizer.decode(ids[: args.tokens - 1])
    transcoders = transcoders_by_name(model, args.transcoders)
    start = time.perf_counter()
    graph = attribute(model, prompt, transcoders, max_feature_nodes=args.budget, progress=False)
    print(json.dumps({"tokens": len(graph.token_ids), "seconds": time.perf_counter() - start,
                      "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "nodes": graph.n_nodes, "edges": len(graph.weights),
                      "edge_check_error": graph.metadata["edge_check_error"]}))  # fmt: skip


if __name__ == "__main__":
    main()
