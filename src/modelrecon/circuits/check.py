"""Reading a graph and checking it by intervention: its strongest paths, and whether ablating the nodes it ranks
highest moves the target as the graph predicts, and more than ablating as many random nodes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modelrecon.circuits.graph import Graph
from modelrecon.circuits.prune import node_influence
from modelrecon.circuits.replacement import CleanRun, ReplacementModel

_PATH_KINDS = ("feature", "head", "mlp", "embedding")  # error nodes explain nothing: paths go around them


def strongest_paths(graph: Graph, n: int = 3, max_length: int = 12) -> list[list[tuple[int, float]]]:
    """Paths from a token embedding to the top logit through features (or heads and MLPs): start at each of the
    logit's `n` strongest positive inputs among them and follow, at every node, its strongest positive such input
    until an embedding. Each path is [(node, weight into the next node)], input first."""
    logit = max(graph.logit_nodes(), key=lambda i: graph.nodes[i].activation or 0.0)

    def inputs(node: int, top: int) -> list[tuple[int, float]]:
        return [(s, w) for s, w in graph.inputs_of(node, top=graph.n_nodes) if w > 0
                and graph.nodes[s].kind in _PATH_KINDS][:top]  # fmt: skip

    paths = []
    for source, weight in inputs(logit, n):
        path = [(source, weight)]
        while graph.nodes[path[0][0]].kind != "embedding" and len(path) < max_length:
            before = inputs(path[0][0], 1)
            if not before:
                break
            path.insert(0, before[0])
        paths.append(path)
    return paths


def predicted_change(graph: Graph, logit: int, removed: list[int]) -> float:
    """The change of the `logit` node's input that the graph predicts, to first order, when the `removed` nodes lose
    their whole value: each removed node's contribution through every path that avoids the other removed ones (a
    removed node downstream is held at its removed value, so nothing reaches the output through it).

    Feature graphs: edges are direct effects of a source's whole activation on a target's pre-activation, and an
    active feature passes a pre-activation change through with slope 1, so a node's contribution is `c[s] = sum_t
    w[s, t] c[t] / act[t]` (from the top layer down; `c[logit] / act = 1`). Component graphs: an EAP-IG edge already
    estimates the metric change through its target, so `c[s]` sums `s`'s edges to nodes not removed."""
    n = graph.n_nodes
    sources, targets, weights = graph.sources, graph.targets, graph.weights.double()
    blocked = torch.zeros(n, dtype=torch.bool)
    blocked[removed] = True
    contribution = torch.zeros(n, dtype=torch.float64)
    if graph.metadata.get("level") == "component":
        keep = ~blocked[targets]
        contribution.index_add_(0, sources[keep], weights[keep])
        return -float(contribution[removed].sum())
    per_unit = torch.zeros(n, dtype=torch.float64)  # a node's contribution per unit of its pre-activation
    per_unit[logit] = 1.0
    layer = torch.tensor([-1 if node.layer is None else node.layer for node in graph.nodes])
    is_feature = torch.tensor([node.kind == "feature" for node in graph.nodes])
    activation = torch.tensor([node.activation or 0.0 for node in graph.nodes], dtype=torch.float64)
    for current in sorted(set(layer[is_feature].tolist()), reverse=True):
        edges = is_feature[sources] & (layer[sources] == current)
        contribution.index_add_(0, sources[edges], weights[edges] * per_unit[targets[edges]])
        here = is_feature & (layer == current) & (activation != 0) & ~blocked
        per_unit[here] = contribution[here] / activation[here]
    rest = ~is_feature[sources]  # embeddings and errors (only removed features are asked for, but keep it general)
    contribution[~is_feature] = 0.0
    contribution.index_add_(0, sources[rest], (weights * per_unit[targets])[rest])
    return -float(contribution[removed].sum())


AGREEMENT_FACTOR = 1.5  # "agrees": the measured change is within this factor of the prediction, sign included


@dataclass
class CausalCheck:
    """The graph's top nodes ablated (features zeroed, or components patched to the baseline) against random sets of
    as many nodes of the same kind: each measured in the model and predicted from the graph (`predicted_change`).

    The graph *agrees* when the measured change is within `factor` of the prediction with the same sign (or both
    are negligible); otherwise `accounted` says what share of the measured change the graph predicts."""

    target: str
    what: str  # "features" | "components"
    count: int
    measure: str
    top_change: float  # the measure's change when the graph's top nodes are ablated (total effects)
    random_changes: list[float]  # the same for random sets of the same size
    top_predicted: float  # what the graph's edges predict for the top set (first order)
    random_predicted: list[float]
    factor: float = AGREEMENT_FACTOR

    @property
    def random_mean(self) -> float:
        return sum(self.random_changes) / len(self.random_changes)

    @property
    def negligible(self) -> bool:
        """Both the measured and the predicted change are under 0.05 (in the measure's units: logits)."""
        return max(abs(self.top_change), abs(self.top_predicted)) < 0.05

    @property
    def accounted(self) -> float:
        """The share of the measured change the graph predicts (predicted / measured; negative: the wrong sign)."""
        return self.top_predicted / self.top_change if self.top_change != 0 else float("inf")

    @property
    def agrees(self) -> bool:
        if self.negligible:
            return True
        return 1 / self.factor <= self.accounted <= self.factor

    def to_dict(self) -> dict:
        return {"target": self.target, "what": self.what, "count": self.count, "measure": self.measure,
                "top_change": self.top_change, "top_predicted": self.top_predicted,
                "random_changes": self.random_changes, "random_predicted": self.random_predicted,
                "random_mean": self.random_mean, "factor": self.factor, "accounted": self.accounted,
                "agrees": self.agrees}  # fmt: skip

    def verdict(self) -> str:
        if self.negligible:
            return "both negligible: agrees"
        if self.agrees:
            return f"agrees with the graph, within a factor of {self.factor:g}"
        if self.accounted < 0:
            return "DISAGREES with the graph: the opposite sign"
        if self.accounted > 1:
            return (f"DISAGREES with the graph: it predicts {self.accounted:.1f}x the change "
                    f"(tolerance: a factor of {self.factor:g})")  # fmt: skip
        return (f"DISAGREES with the graph: it accounts for {self.accounted:.0%} of the change "
                f"(tolerance: a factor of {self.factor:g})")  # fmt: skip

    def summary(self) -> str:
        mean_predicted = sum(self.random_predicted) / len(self.random_predicted)
        return (f"causal check: ablating the graph's top {self.count} {self.what} changes the {self.measure} by "
                f"{self.top_change:+.3f} (the graph predicts {self.top_predicted:+.3f}: {self.verdict()}); "
                f"{self.count} random {self.what}: {self.random_mean:+.3f} (predicted {mean_predicted:+.3f}, mean of "
                f"{len(self.random_changes)} draws)")  # fmt: skip


def causal_check(rm: ReplacementModel, clean: CleanRun, graph: Graph, n_features: int = 10, draws: int = 5,
                 seed: int = 0) -> CausalCheck:  # fmt: skip
    """Zero the graph's `n_features` most influential features in the model (attention and norms live, later
    features recomputed: total effects) and measure the top logit target's input (its logit minus the mean logit, or
    minus the wrong token's); then as many random features of the graph. Each set is also predicted from the graph."""
    influence = node_influence(graph)
    features = [i for i, node in enumerate(graph.nodes) if node.kind == "feature"]
    top = sorted(features, key=lambda i: -float(influence[i]))[:n_features]
    logit = max(graph.logit_nodes(), key=lambda i: graph.nodes[i].activation or 0.0)
    token = graph.nodes[logit].feature
    against = graph.metadata.get("logit_difference_against")
    wrong = against["token_id"] if isinstance(against, dict) else None

    def measure(logits: torch.Tensor) -> float:
        return float(logits[token] - (logits.mean() if wrong is None else logits[wrong]))

    def change(chosen: list[int]) -> float:
        values = [f.clone()[None] for f in clean.features]
        for i in chosen:
            node = graph.nodes[i]
            values[node.layer][0, node.position, node.feature] = 0.0
        return measure(rm.forward(clean, features=values, live=True)[0]) - measure(clean.logits)

    generator = torch.Generator().manual_seed(seed)
    picks = [[features[j] for j in torch.randperm(len(features), generator=generator)[: len(top)].tolist()]
             for _ in range(draws)]  # fmt: skip
    token_text = graph.nodes[logit].token
    name = f"{token_text!r} logit - " + ("mean logit" if wrong is None else "wrong logit")
    return CausalCheck(token_text, "features", len(top), name, change(top), [change(p) for p in picks],
                       predicted_change(graph, logit, top),
                       [predicted_change(graph, logit, p) for p in picks])  # fmt: skip
