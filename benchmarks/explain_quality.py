"""How good are feature explanations here, and what do they cost: the lexical explainer against the embedded
SmolLM2-135M-Instruct, on the demo transcoders' most influential features of the demo prompt's graph, and on
planted features whose answer is known (a token, the digits, position 0), each score against its control.

    .venv/bin/python benchmarks/explain_quality.py --cube CUBE [--features 50] [--judged 8] --json OUT

CUBE: `modelrecon capture --prompts src/modelrecon/data/corpus_sample.jsonl --sites 'layers.*.mlp.in'
--max-tokens 4096 --context-length 128 --out CUBE`. Prints a table per explainer (mean score and control per
scorer, seconds per feature) and the planted features' explanations.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import modelrecon as mr
from modelrecon.circuits.attribute import attribute
from modelrecon.circuits.prune import node_influence
from modelrecon.circuits.replacement import ReplacementModel
from modelrecon.cube.reader import Cube
from modelrecon.dictionaries.defaults import transcoders_by_name
from modelrecon.explain.examples import examples_from_activations
from modelrecon.explain.explainers import explain_features, explain_one
from modelrecon.explain.llm import LocalChat
from modelrecon.explain.scoring import score_explanation


def summary(document: dict) -> dict:
    rows: dict[str, list] = {}
    for f in document["features"].values():
        for name, s in f.get("scores", {}).items():
            if s.get("score") is not None and s.get("control") is not None:
                rows.setdefault(name, []).append((s["score"], s["control"], s.get("auc")))
    return {name: {"score": float(np.mean([r[0] for r in v])), "control": float(np.mean([r[1] for r in v])),
                   "n": len(v), "auc": (float(np.mean([r[2] for r in v])) if all(r[2] is not None for r in v)
                                        else None)} for name, v in rows.items()}  # fmt: skip


def timed(label: str, times: dict, fn):
    start = time.perf_counter()
    out = fn()
    times[label] = time.perf_counter() - start
    print(f"{label}: {times[label]:.1f} s", flush=True)
    return out


def planted(cube: Cube) -> dict:
    table = cube.token_table()
    texts, positions = list(table["text"]), np.asarray(table["position"])
    strength = 1.0 + np.random.default_rng(0).random(len(texts))
    acts = np.zeros((len(texts), 3), dtype=np.float32)
    acts[:, 0] = [
        s if t.strip().lower() in ("water", "river", "sea") else 0.0 for t, s in zip(texts, strength, strict=True)
    ]
    acts[:, 1] = [s if t.strip().isdigit() else 0.0 for t, s in zip(texts, strength, strict=True)]
    acts[:, 2] = np.where(positions == 0, strength, 0.0)
    return examples_from_activations(cube, {0: ([0, 1, 2], acts)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cube", required=True)
    parser.add_argument("--features", type=int, default=50)
    parser.add_argument("--judged", type=int, default=8, help="features the LLM judge scores (it is slow)")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()

    model = mr.load("smollm2-135m")
    rm = ReplacementModel(model, transcoders_by_name(model, "demo"))
    cube = Cube(args.cube)
    graph = attribute(model, "The capital of France is", rm, progress=False)
    influence = node_influence(graph)
    order = sorted((i for i, n in enumerate(graph.nodes) if n.kind == "feature"), key=lambda i: -float(influence[i]))
    features = list(dict.fromkeys((graph.nodes[i].layer, graph.nodes[i].feature) for i in order))[: args.features]
    llm = LocalChat("smollm2-135m", cache=None)
    times: dict[str, float] = {}
    report: dict = {"features": len(features), "times": times}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        all_scorers = ["detection", "fuzzing", "simulation"]
        lexical = timed("lexical explain + lexical scores", times, lambda: explain_features(
            rm, cube, features, tmp / "lex.json", scorers=all_scorers, progress=False))  # fmt: skip
        timed("causal scores (lexical explanations)", times, lambda: explain_features(
            rm, cube, features, tmp / "lex-causal.json", scorers=["causal"], progress=False))  # fmt: skip
        causal = json.loads((tmp / "lex-causal.json").read_text())
        smol = timed("embedded LLM explain + lexical scores", times, lambda: explain_features(
            rm, cube, features, tmp / "llm.json", explainer=llm, scorers=all_scorers, progress=False))  # fmt: skip
        judged = features[: args.judged]
        judge_lex = timed("LLM judge on lexical explanations", times, lambda: explain_features(
            rm, cube, judged, tmp / "lex-judged.json", judge=llm, scorers=["detection", "fuzzing"],
            progress=False))  # fmt: skip
        judge_llm = timed("LLM judge on LLM explanations", times, lambda: explain_features(
            rm, cube, judged, tmp / "llm-judged.json", explainer=llm, judge=llm, scorers=["detection", "fuzzing"],
            progress=False))  # fmt: skip
    report["lexical"] = summary(lexical) | {"causal": summary(causal).get("causal")}
    report["llm"] = summary(smol)
    report["lexical_llm_judge"] = summary(judge_lex)
    report["llm_llm_judge"] = summary(judge_llm)
    report["examples"] = {k: {"lexical": lexical["features"][k].get("explanation"),
                              "llm": smol["features"].get(k, {}).get("explanation")}
                          for k in list(lexical["features"])[:10]}  # fmt: skip
    # planted features: explanations from both explainers, scored by the lexical judge against each other
    examples = planted(cube)
    planted_report = {}
    for (_, f), ex in examples.items():
        texts = {"lexical": explain_one(ex), "llm": explain_one(ex, llm)}
        control = explain_one(examples[(0, (f + 1) % 3)])
        planted_report[["water/river/sea", "digits", "position 0"][f]] = {
            name: {"explanation": text, **{s: score_explanation(s, text or "", control, ex).to_dict()
                                           for s in ("detection", "fuzzing", "simulation")}}
            for name, text in texts.items()}  # fmt: skip
    report["planted"] = planted_report
    Path(args.json).write_text(json.dumps(report, indent=1))
    for name in ("lexical", "llm", "lexical_llm_judge", "llm_llm_judge"):
        print(name, json.dumps(report[name]))
    print(json.dumps(planted_report, indent=1))


if __name__ == "__main__":
    main()
