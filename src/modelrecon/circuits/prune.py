"""Pruning an attribution graph to the nodes and edges that matter for the logits, and the two graph scores
(replacement, completeness), with circuit-tracer's definitions (its `circuit_tracer/graph.py`: `normalize_matrix`,
`compute_influence`, `compute_edge_influence`, `find_threshold`, `prune_graph`, `compute_graph_scores`).

Everything works on the graph's edge lists (sparse); no nodes x nodes matrix is ever built.

Definitions (docs/graph-format.md has the formulas):

- `B` = |A| row-normalised: `B[t, s] = |A[t, s]| / sum_s' |A[t, s']|` (a target's incoming weights sum to 1; a node
  without inputs has an all-zero row).
- `w` = the logit nodes' probabilities, normalised to sum 1, on the logit nodes (0 elsewhere). circuit-tracer uses the
  raw probabilities; every threshold and score below is a ratio, so the scale changes nothing but the influence values.
- node influence `I = w (B + B^2 + B^3 + ...)`: the share of the logits' (normalised, absolute) input that reaches them
  from a node over paths of every length. Computed as `x_{k+1} = x_k B` until `x` is exactly 0 (a DAG).
"""

from __future__ import annotations

import torch

from modelrecon.circuits.graph import Graph

_PRUNABLE = ("feature", "error", "head", "mlp")
_NEEDS_INPUT = ("feature", "head", "mlp")  # dropped when no kept edge reaches them


def logit_weights(graph: Graph) -> torch.Tensor:
    """`w`: the logit nodes' probabilities normalised to sum 1 (uniform where they are missing or all 0)."""
    w = torch.zeros(graph.n_nodes, dtype=torch.float64)
    logits = graph.logit_nodes()
    if not logits:
        return w
    probs = torch.tensor([graph.nodes[i].activation or 0.0 for i in logits], dtype=torch.float64).clamp_min(0)
    if not torch.isfinite(probs).all() or probs.sum() <= 0:
        probs = torch.ones(len(logits), dtype=torch.float64)
    w[logits] = probs / probs.sum()
    return w


def normalised_weights(n: int, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per edge, `B[target, source]`: |weight| over the sum of |weights| into the same target (duplicates add up)."""
    magnitude = weights.detach().to(torch.float64).abs()
    row_sum = torch.zeros(n, dtype=torch.float64).index_add_(0, targets, magnitude)
    return magnitude / row_sum[targets].clamp_min(1e-10)


def _influence(n: int, sources: torch.Tensor, targets: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`w (B + B^2 + ...)` by repeated sparse vector x matrix products (`x B`: scatter x[target] * B along edges)."""
    influence = torch.zeros(n, dtype=torch.float64)
    x = w
    for _ in range(n + 1):
        x = torch.zeros(n, dtype=torch.float64).index_add_(0, sources, x[targets] * b)
        if not x.any():
            return influence
        influence += x
    raise ValueError(
        "the graph has a cycle: node influence does not converge (edges must go from earlier to later nodes)"
    )


def influence(n: int, sources: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
              logit_weights: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Node influence `w (B + B^2 + ...)` straight from edge lists (also for a graph still being built)."""
    return _influence(n, sources, targets, normalised_weights(n, targets, weights), logit_weights)


def _graph_arrays(graph: Graph) -> tuple[torch.Tensor, torch.Tensor]:
    return graph.sources.to(torch.int64), graph.targets.to(torch.int64)


def node_influence(graph: Graph) -> torch.Tensor:
    """Each node's influence on the logits, `w (B + B^2 + ...)` (module docstring), float64 `[n_nodes]`.

    Logit nodes get 0 (they have no outgoing edges); the influences of the nodes with no inputs of their own (token
    embeddings, error nodes) sum to 1 when every path ends there."""
    sources, targets = _graph_arrays(graph)
    return influence(graph.n_nodes, sources, targets, graph.weights, logit_weights(graph))


def edge_influence(graph: Graph, node_influence: torch.Tensor) -> torch.Tensor:
    """Per edge, `B[t, s] * (I[t] + w[t])`: its normalised |weight| times its target's influence plus the target's
    logit weight (circuit-tracer's `compute_edge_influence`), float64 `[n_edges]`."""
    sources, targets = _graph_arrays(graph)
    b = normalised_weights(graph.n_nodes, targets, graph.weights)
    through = node_influence.to(torch.float64) + logit_weights(graph)
    return b * through[targets]


def _threshold(scores: torch.Tensor, fraction: float) -> float:
    """The smallest score kept when keeping the highest scores until they hold `fraction` of the total
    (circuit-tracer's `find_threshold`); +inf when there is nothing to hold."""
    if scores.numel() == 0 or not scores.sum() > 0:
        return float("inf")
    ordered = scores.sort(descending=True).values
    cumulative = ordered.cumsum(0) / ordered.sum()
    index = int(torch.searchsorted(cumulative, torch.tensor([fraction], dtype=cumulative.dtype)).item())
    return float(ordered[min(index, len(ordered) - 1)])


def cumulative_influence(influence: torch.Tensor) -> torch.Tensor:
    """Per node, the share of the total influence held by the nodes at least as influential as it (sorted descending,
    cumulative sum / total): circuit-tracer's `cumulative_scores`, the `influence` field of the graph JSON."""
    total = influence.sum()
    if not total > 0:
        return torch.zeros_like(influence)
    ordered, order = influence.sort(descending=True, stable=True)
    out = torch.zeros_like(influence)
    out[order] = ordered.cumsum(0) / total
    return out


def prune_graph(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Graph:
    """The graph restricted to the nodes and edges that carry most of the influence on the logits.

    1. Nodes: `I = node_influence(graph)`; the node cut-off is the smallest influence among the most influential
       nodes (all kinds, as circuit-tracer) that together hold `node_threshold` of the total. Feature and error nodes
       (heads and MLPs in a component graph) below it are dropped; token embeddings and logits are always kept.
    2. Edges: among the edges between kept nodes, `B` and `I` are recomputed on that subgraph and each edge scored
       `B[t, s] * (I[t] + w[t])`; the highest-scoring edges holding `edge_threshold` of the total are kept (edges
       scoring 0 never are).
    3. Orphans, repeated until nothing changes: a feature, error, head or MLP node with no kept outgoing edge, or a
       feature, head or MLP node with no kept incoming edge, is dropped with its edges. In a DAG this leaves every
       kept node with a path to a logit.

    Returns a new Graph (nodes in their original order, edges re-indexed); its metadata is the input's plus
    `pruning` (thresholds, node and edge counts before/after, both graphs' scores) and `cumulative_influence`
    (node id -> cumulative influence share in the unpruned graph, as circuit-tracer writes into its JSON)."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1, got {value}")
    n = graph.n_nodes
    sources, targets = _graph_arrays(graph)
    w = logit_weights(graph)
    influence = node_influence(graph)

    prunable = torch.tensor([node.kind in _PRUNABLE for node in graph.nodes], dtype=torch.bool)
    is_feature = torch.tensor([node.kind in _NEEDS_INPUT for node in graph.nodes], dtype=torch.bool)
    keep = ~prunable | (influence >= _threshold(influence, node_threshold))

    between = keep[sources] & keep[targets]
    sub_s, sub_t = sources[between], targets[between]
    b = normalised_weights(n, sub_t, graph.weights[between])
    sub_influence = _influence(n, sub_s, sub_t, b, w)
    scores = b * (sub_influence + w)[sub_t]
    edge_kept = torch.zeros(len(sources), dtype=torch.bool)
    edge_kept[between] = (scores >= _threshold(scores, edge_threshold)) & (scores > 0)

    while True:
        edge_kept &= keep[sources] & keep[targets]
        has_out = torch.zeros(n, dtype=torch.bool)
        has_out[sources[edge_kept]] = True
        has_in = torch.zeros(n, dtype=torch.bool)
        has_in[targets[edge_kept]] = True
        new_keep = keep & ~(prunable & ~has_out) & ~(is_feature & ~has_in)
        if torch.equal(new_keep, keep):
            break
        keep = new_keep

    kept = keep.nonzero().flatten()
    new_index = torch.full((n,), -1, dtype=torch.int64)
    new_index[kept] = torch.arange(len(kept))
    cumulative = cumulative_influence(influence)
    pruned = Graph(
        prompt=graph.prompt,
        tokens=list(graph.tokens),
        token_ids=list(graph.token_ids),
        model=graph.model,
        nodes=[graph.nodes[i] for i in kept.tolist()],
        sources=new_index[sources[edge_kept]],
        targets=new_index[targets[edge_kept]],
        weights=graph.weights[edge_kept].clone(),
        metadata=dict(graph.metadata),
    )
    pruned.metadata["pruning"] = {
        "node_threshold": node_threshold,
        "edge_threshold": edge_threshold,
        "nodes_before": n,
        "nodes_after": pruned.n_nodes,
        "edges_before": len(sources),
        "edges_after": int(edge_kept.sum()),
        "scores_before": {"replacement": replacement_score(graph), "completeness": completeness_score(graph)},
        "scores_after": {"replacement": replacement_score(pruned), "completeness": completeness_score(pruned)},
    }
    pruned.metadata["cumulative_influence"] = {graph.nodes[i].id: float(cumulative[i]) for i in kept.tolist()}
    return pruned


def replacement_score(graph: Graph) -> float:
    """The fraction of end-to-end influence on the logits that starts at token embeddings rather than error nodes:
    `sum_{embeddings} I / (sum_{embeddings} I + sum_{errors} I)` (circuit-tracer's `compute_graph_scores`).

    1 when every path into the logits starts at a token (errors have no influence); 0 when all influence comes from
    error nodes. NaN when neither has any influence (e.g. a graph without edges)."""
    influence = node_influence(graph)
    kinds = [node.kind for node in graph.nodes]
    tokens = sum(float(influence[i]) for i, k in enumerate(kinds) if k == "embedding")
    errors = sum(float(influence[i]) for i, k in enumerate(kinds) if k == "error")
    return tokens / (tokens + errors) if tokens + errors > 0 else float("nan")


def completeness_score(graph: Graph) -> float:
    """The share of every node's normalised input that does not come from error nodes, averaged over nodes weighted by
    how much they matter for the output (circuit-tracer's `compute_graph_scores`):

    `sum_t (1 - sum_{s error} B[t, s]) (I[t] + w[t]) / sum_t (I[t] + w[t])`.

    As in circuit-tracer, a node without inputs (token embeddings, error nodes themselves) counts as fully explained
    (its row of B is 0). 1 when no node reads an error node; NaN for a graph with no logit weight."""
    sources, targets = _graph_arrays(graph)
    b = normalised_weights(graph.n_nodes, targets, graph.weights)
    w = logit_weights(graph)
    influence = _influence(graph.n_nodes, sources, targets, b, w)
    is_error = torch.tensor([node.kind == "error" for node in graph.nodes], dtype=torch.bool)
    from_errors = torch.zeros(graph.n_nodes, dtype=torch.float64)
    if len(sources):
        from_errors.index_add_(0, targets, b * is_error[sources].to(torch.float64))
    output = influence + w
    total = float(output.sum())
    return float(((1 - from_errors) * output).sum()) / total if total > 0 else float("nan")
