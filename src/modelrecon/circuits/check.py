"""Reading a graph and checking it by intervention: its strongest paths, and whether ablating the features it
ranks highest moves the target more than ablating as many random active features."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modelrecon.circuits.graph import Graph
from modelrecon.circuits.prune import node_influence
from modelrecon.circuits.replacement import CleanRun, ReplacementModel


def strongest_paths(graph: Graph, n: int = 3, max_length: int = 12) -> list[list[tuple[int, float]]]:
    """Paths from a token embedding to the top logit: start at each of the logit's `n` strongest positive inputs and
    follow, at every node, its strongest positive input until an embedding. Each path is [(node, weight into the
    next node)], input first."""
    logit = max(graph.logit_nodes(), key=lambda i: graph.nodes[i].activation or 0.0)
    paths = []
    for source, weight in [(s, w) for s, w in graph.inputs_of(logit, top=4 * n) if w > 0][:n]:
        path = [(source, weight)]
        while graph.nodes[path[0][0]].kind != "embedding" and len(path) < max_length:
            inputs = [(s, w) for s, w in graph.inputs_of(path[0][0], top=8) if w > 0]
            if not inputs:
                break
            path.insert(0, inputs[0])
        paths.append(path)
    return paths


@dataclass
class CausalCheck:
    """The graph's top nodes ablated (features zeroed, or components patched to the baseline) against random sets of
    as many nodes of the same kind; `measure` names what moved."""

    target: str
    what: str  # "features" | "components"
    count: int
    measure: str
    top_change: float  # the measure's change when the graph's top nodes are ablated (total effects)
    random_changes: list[float]  # the same for random sets of the same size

    @property
    def random_mean(self) -> float:
        return sum(self.random_changes) / len(self.random_changes)

    def to_dict(self) -> dict:
        return {"target": self.target, "what": self.what, "count": self.count, "measure": self.measure,
                "top_change": self.top_change, "random_changes": self.random_changes,
                "random_mean": self.random_mean}  # fmt: skip

    def summary(self) -> str:
        return (f"causal check: ablating the graph's top {self.count} {self.what} changes the {self.measure} by "
                f"{self.top_change:+.3f}; {self.count} random {self.what}: {self.random_mean:+.3f} "
                f"(mean of {len(self.random_changes)} draws)")  # fmt: skip


def causal_check(rm: ReplacementModel, clean: CleanRun, graph: Graph, n_features: int = 10, draws: int = 5,
                 seed: int = 0) -> CausalCheck:  # fmt: skip
    """Zero the graph's `n_features` most influential features in the model (attention and norms live, later
    features recomputed: total effects) and measure the top logit's change; then as many random active features."""
    influence = node_influence(graph)
    features = [i for i, node in enumerate(graph.nodes) if node.kind == "feature"]
    top = sorted(features, key=lambda i: -float(influence[i]))[:n_features]
    logit = max(graph.logit_nodes(), key=lambda i: graph.nodes[i].activation or 0.0)
    token = graph.nodes[logit].feature

    def change(chosen: list[tuple[int, int, int]]) -> float:
        values = [f.clone()[None] for f in clean.features]
        for layer, p, f in chosen:
            values[layer][0, p, f] = 0.0
        return float(rm.forward(clean, features=values, live=True)[0, token] - clean.logits[token])

    top_change = change([(graph.nodes[i].layer, graph.nodes[i].position, graph.nodes[i].feature) for i in top])
    active = [(layer, p, f) for layer, acts in enumerate(clean.features) for p, f in (acts > 0).nonzero().tolist()
              if p > 0]  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    randoms = []
    for _ in range(draws):
        pick = torch.randperm(len(active), generator=generator)[: len(top)].tolist()
        randoms.append(change([active[i] for i in pick]))
    token_text = graph.nodes[logit].token
    return CausalCheck(token_text, "features", len(top), f"{token_text!r} logit", top_change, randoms)
