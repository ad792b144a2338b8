"""Graph pruning, influence, scores and graph files on hand-made graphs (no model needed)."""

import json
import math

import numpy as np
import pytest
import torch

from modelrecon.circuits.graph import Graph, Node
from modelrecon.circuits.graph_file import graph_to_json, load_graph, node_json_id, save_graph
from modelrecon.circuits.prune import (
    completeness_score,
    cumulative_influence,
    edge_influence,
    node_influence,
    prune_graph,
    replacement_score,
)
from modelrecon.errors import BadInputError


def make_graph(nodes: list[Node], edges: list[tuple[int, int, float]], **metadata) -> Graph:
    s, t, w = zip(*edges, strict=True) if edges else ((), (), ())
    return Graph(
        prompt="a b",
        tokens=["a", "b"],
        token_ids=[5, 7],
        model="tiny",
        nodes=nodes,
        sources=torch.tensor(s, dtype=torch.int64),
        targets=torch.tensor(t, dtype=torch.int64),
        weights=torch.tensor(w, dtype=torch.float32),
        metadata=dict(metadata),
    )


E0 = Node("embedding", 0, feature=5, token="a")
E1 = Node("embedding", 1, feature=7, token="b")
F0 = Node("feature", 1, 0, 3, 1.5, "b")
F1 = Node("feature", 1, 1, 4, 0.5, "b")
ERR = Node("error", 1, 0, token="b")
LOGIT = Node("logit", 1, feature=9, activation=0.6, token="c")


def small() -> Graph:
    """e0, e1 -> f0 (1, 1); e1 -> f1 (2); f0, f1, err -> logit (1, -1, 2).

    B: logit row (.25, .25, .5); f0 row (.5, .5); f1 row (1). Influence: f0 .25, f1 .25, err .5, e0 .125, e1 .375."""
    nodes = [E0, E1, F0, F1, ERR, LOGIT]
    edges = [(0, 2, 1.0), (1, 2, 1.0), (1, 3, 2.0), (2, 5, 1.0), (3, 5, -1.0), (4, 5, 2.0)]
    return make_graph(nodes, edges)


def test_node_influence_by_hand():
    got = node_influence(small())
    assert got.tolist() == pytest.approx([0.125, 0.375, 0.25, 0.25, 0.5, 0.0])


def test_edge_influence_by_hand():
    graph = small()
    got = edge_influence(graph, node_influence(graph))
    # B[t, s] * (I[t] + w[t]); w = 1 on the logit (one logit, normalised)
    assert got.tolist() == pytest.approx([0.5 * 0.25, 0.5 * 0.25, 1 * 0.25, 0.25, 0.25, 0.5])


def test_scores_by_hand():
    graph = small()
    assert replacement_score(graph) == pytest.approx(0.5)  # tokens .5 vs error .5
    # non-error fraction: logit .5, others 1; weights I + w: 1, .25, .25, .5, .125, .375 (sum 2.5)
    assert completeness_score(graph) == pytest.approx((0.5 * 1 + 1.5) / 2.5)


def test_scores_error_carries_everything_or_nothing():
    all_error = make_graph([E0, ERR, LOGIT], [(1, 2, 3.0)])
    assert replacement_score(all_error) == 0.0
    assert completeness_score(all_error) == pytest.approx(1 / 2)  # logit 0 x 1, error 1 x 1 (no inputs)
    no_error = make_graph([E0, ERR, LOGIT], [(0, 2, 3.0)])
    assert replacement_score(no_error) == 1.0
    assert completeness_score(no_error) == 1.0
    assert math.isnan(replacement_score(make_graph([E0, LOGIT], [])))


def test_chain_graph():
    nodes = [E0] + [Node("feature", 1, layer, 0, 1.0) for layer in range(4)] + [LOGIT]
    edges = [(i, i + 1, 0.5 + i) for i in range(5)]
    graph = make_graph(nodes, edges)
    assert node_influence(graph).tolist() == pytest.approx([1, 1, 1, 1, 1, 0])
    assert replacement_score(graph) == 1.0
    pruned = prune_graph(graph)
    assert [n.id for n in pruned.nodes] == [n.id for n in nodes]  # every node on the only path stays
    assert pruned.sources.tolist() == graph.sources.tolist()


def test_logit_weights_normalised_and_scale_free():
    second = Node("logit", 1, feature=11, activation=0.2, token="d")
    nodes = [E0, E1, F0, LOGIT, second]
    edges = [(0, 2, 1.0), (1, 4, 1.0), (2, 3, 1.0)]
    got = node_influence(make_graph(nodes, edges))
    assert got.tolist() == pytest.approx([0.75, 0.25, 0.75, 0, 0])  # probabilities .6/.2 -> .75/.25


def test_prune_nodes_by_hand():
    graph = small()
    # influences sorted: err .5, e1 .375, f0 .25, f1 .25, e0 .125, logit 0 -> cumulative .33 .58 .75 .92 1 1
    kept = prune_graph(graph, node_threshold=0.8, edge_threshold=1.0)
    assert [n.id for n in kept.nodes] == [n.id for n in graph.nodes]
    assert kept.metadata["pruning"]["nodes_after"] == 6
    # at 0.5 the cut-off is e1's .375: both features go (embeddings and logits always stay)
    kept = prune_graph(graph, node_threshold=0.5, edge_threshold=1.0)
    assert [n.kind for n in kept.nodes] == ["embedding", "embedding", "error", "logit"]
    assert kept.edge(ERR.id, LOGIT.id) == 2.0
    assert len(kept.weights) == 1
    meta = kept.metadata["pruning"]
    assert (meta["nodes_before"], meta["nodes_after"], meta["edges_before"], meta["edges_after"]) == (6, 4, 6, 1)
    assert meta["scores_after"]["replacement"] == 0.0
    assert kept.metadata["cumulative_influence"][ERR.id] == pytest.approx(0.5 / 1.5)


def test_prune_edges_and_orphans():
    """A weak feature survives the node cut but loses its only outgoing edge: it is dropped with its input edge."""
    weak = Node("feature", 1, 1, 8, 0.1, "b")
    nodes = [E0, E1, F0, weak, LOGIT]
    edges = [(0, 2, 1.0), (1, 3, 1.0), (2, 4, 10.0), (3, 4, 0.1), (1, 4, 1.0)]
    graph = make_graph(nodes, edges)
    pruned = prune_graph(graph, node_threshold=1.0, edge_threshold=0.95)
    assert weak.id not in {n.id for n in pruned.nodes}
    assert {
        (pruned.nodes[s].id, pruned.nodes[t].id)
        for s, t in zip(pruned.sources.tolist(), pruned.targets.tolist(), strict=True)
    } == {
        (E0.id, F0.id),
        (F0.id, LOGIT.id),
        (E1.id, LOGIT.id),
    }
    # the logit's weights keep their values, edges are re-indexed into the new node list
    assert pruned.edge(F0.id, LOGIT.id) == 10.0


def test_prune_drops_feature_without_inputs_and_dead_ends():
    lonely = Node("feature", 1, 0, 1, 1.0)  # writes to the logit but reads nothing
    dead = Node("feature", 1, 1, 2, 1.0)  # reads a token, writes nowhere
    graph = make_graph([E0, E1, lonely, dead, F0, LOGIT],
                       [(2, 5, 1.0), (0, 3, 1.0), (0, 4, 1.0), (4, 5, 1.0)])  # fmt: skip
    pruned = prune_graph(graph, node_threshold=1.0, edge_threshold=1.0)
    assert [n.id for n in pruned.nodes] == [E0.id, E1.id, F0.id, LOGIT.id]


def test_prune_rejects_bad_thresholds():
    with pytest.raises(ValueError):
        prune_graph(small(), node_threshold=1.5)


def test_cycle_is_reported():
    graph = make_graph([E0, F0, F1, LOGIT], [(0, 1, 1.0), (1, 2, 1.0), (2, 1, 1.0), (2, 3, 1.0)])
    with pytest.raises(ValueError, match="cycle"):
        node_influence(graph)


def random_dag(n: int = 200, seed: int = 0) -> Graph:
    gen = np.random.default_rng(seed)
    kinds = ["embedding"] * 10 + ["feature"] * (n - 20) + ["error"] * 5 + ["logit"] * 5
    nodes = []
    for i, kind in enumerate(kinds):
        if kind == "logit":
            nodes.append(Node("logit", 9, feature=i, activation=float(gen.uniform(0.01, 0.3))))
        elif kind == "embedding":
            nodes.append(Node("embedding", i, feature=i))
        else:
            nodes.append(Node(kind, i % 10, layer=i, feature=i if kind == "feature" else None))
    edges = []
    for t in range(n):
        if kinds[t] in ("embedding", "error"):
            continue  # no inputs
        for s in range(t):
            if kinds[s] != "logit" and gen.random() < 0.08:
                edges.append((s, t, float(gen.normal())))
    return make_graph(nodes, edges)


def test_node_influence_matches_dense_inverse():
    graph = random_dag()
    n = graph.n_nodes
    a = np.zeros((n, n))
    np.add.at(a, (graph.targets.numpy(), graph.sources.numpy()), graph.weights.numpy().astype(np.float64))
    b = np.abs(a) / np.maximum(np.abs(a).sum(1, keepdims=True), 1e-10)
    w = np.array([node.activation if node.kind == "logit" else 0.0 for node in graph.nodes])
    w /= w.sum()
    dense = w @ (np.linalg.inv(np.eye(n) - b) - np.eye(n))
    np.testing.assert_allclose(node_influence(graph).numpy(), dense, rtol=1e-9, atol=1e-12)
    # scores against the dense definitions
    kinds = np.array([node.kind for node in graph.nodes])
    tokens, errors = dense[kinds == "embedding"].sum(), dense[kinds == "error"].sum()
    assert replacement_score(graph) == pytest.approx(tokens / (tokens + errors))
    out = dense + w
    complete = ((1 - b[:, kinds == "error"].sum(1)) * out).sum() / out.sum()
    assert completeness_score(graph) == pytest.approx(complete)
    pruned = prune_graph(graph)
    assert 10 <= pruned.n_nodes < n
    cumulative = cumulative_influence(node_influence(graph))
    assert float(cumulative.max()) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------------ graph files


def test_json_fields_and_ids():
    graph = small()
    data = graph_to_json(graph, slug="demo")
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    meta = data["metadata"]
    assert {"slug", "scan", "prompt", "prompt_tokens", "node_threshold", "schema_version", "modelrecon"} <= set(meta)
    assert meta["slug"] == "demo" and meta["schema_version"] == 1
    assert data["qParams"] == {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    required = {"node_id", "feature", "layer", "ctx_idx", "feature_type", "activation", "influence", "token_prob",
                "is_target_logit", "clerp", "jsNodeId"}  # fmt: skip
    for node in data["nodes"]:
        assert required <= set(node)
        assert isinstance(node["layer"], str)
    ids = [node["node_id"] for node in data["nodes"]]
    assert ids == ["E_5_0", "E_7_1", "0_3_1", "1_4_1", "0_-1_1", "3_9_1"]  # n_layers 2 -> logits at layer "3"
    assert len(set(ids)) == len(ids)
    logit = data["nodes"][-1]
    assert logit["is_target_logit"] and logit["token_prob"] == pytest.approx(0.6) and logit["feature_type"] == "logit"
    assert data["nodes"][4]["feature_type"] == "mlp reconstruction error" and data["nodes"][4]["feature"] == -1
    assert data["nodes"][2]["feature_type"] == "cross layer transcoder"
    assert {"source": "0_-1_1", "target": "3_9_1", "weight": 2.0} in data["links"]
    json.dumps(data, allow_nan=False)


def test_error_ids_do_not_collide_with_layer0_features():
    error = Node("error", 1, 2)
    feature = Node("feature", 1, 0, 2)
    assert node_json_id(error, 4) != node_json_id(feature, 4)


def test_round_trip(tmp_path):
    graph = prune_graph(random_dag(60, seed=3), node_threshold=0.9)
    graph.metadata["n_layers"] = 200
    path = save_graph(graph, tmp_path / "g.json")
    back = load_graph(path)
    assert back.nodes == graph.nodes
    assert back.sources.tolist() == graph.sources.tolist()
    assert back.targets.tolist() == graph.targets.tolist()
    assert torch.equal(back.weights, graph.weights.to(torch.float32))
    assert (back.prompt, back.tokens, back.token_ids, back.model) == (
        graph.prompt,
        graph.tokens,
        graph.token_ids,
        "tiny",
    )
    assert back.metadata["pruning"] == json.loads(json.dumps(graph.metadata["pruning"]))
    data = json.loads(path.read_text())
    assert data["metadata"]["node_threshold"] == 0.9
    assert data["metadata"]["slug"] == "g"
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def _write(tmp_path, data) -> str:
    path = tmp_path / "bad.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


@pytest.mark.parametrize(
    "breakage",
    [
        lambda d: d.pop("links"),
        lambda d: d["metadata"].pop("prompt"),
        lambda d: d["metadata"]["modelrecon"].pop("model"),
        lambda d: d["nodes"][0].pop("mr_id"),
        lambda d: d["links"][0].update(target="99_99_99"),
        lambda d: d["nodes"][2].update(ctx_idx=-1, mr_id="feat:0:3:-1"),
        lambda d: d["nodes"][2].update(mr_layer=None),
        lambda d: d["nodes"][1].update(feature_type="attention"),
        lambda d: d["nodes"][1].update(node_id="E_5_0"),
        lambda d: d["links"][0].update(weight="big"),
        lambda d: d["metadata"].update(schema_version=7),
        lambda d: d.update(nodes={}),
    ],
)
def test_bad_files_raise(tmp_path, breakage):
    data = graph_to_json(small())
    breakage(data)
    with pytest.raises(BadInputError) as info:
        load_graph(_write(tmp_path, data))
    assert "\n" not in str(info.value)


def test_not_json_raises(tmp_path):
    with pytest.raises(BadInputError, match="not JSON"):
        load_graph(_write(tmp_path, "{nodes: ["))
    with pytest.raises(BadInputError):
        load_graph(tmp_path / "missing.json")
    with pytest.raises(BadInputError):
        load_graph(_write(tmp_path, "[1, 2]"))
