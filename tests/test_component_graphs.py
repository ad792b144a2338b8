"""Component-level graphs (heads and MLPs, EAP-IG edges) for models without transcoders: they find circuits known by
construction, agree with the head-level edge attribution they are built from, round-trip through the graph file, and
`trace` falls back to them."""

import pytest
import torch

from modelrecon.attribution.edges import edge_attribution, receivers
from modelrecon.circuits.components import blank_baseline, component_check, component_graph
from modelrecon.circuits.graph_file import load_graph, save_graph
from modelrecon.circuits.prune import prune_graph
from modelrecon.counterfactual.pairs import PairTokens
from modelrecon.groundtruth.tasks import TASKS

from conftest import assert_one_line_error, cli
from tiny import tiny_model

PROMPT = "The cat sat on the mat"


def _edges(graph) -> dict[tuple[str, str], float]:
    ids = [n.id for n in graph.nodes]
    return {(ids[s], ids[t]): w for s, t, w in zip(graph.sources.tolist(), graph.targets.tolist(),
                                                      graph.weights.tolist(), strict=True)}  # fmt: skip


def test_component_graph_finds_the_induction_circuit():
    """Induction by construction: the previous token feeds head 0.0, whose output is head 1.0's key, which writes the
    answer. Heads 0.1 and 1.1 are inert. The pruned graph keeps exactly that chain, and patching its two heads to
    the counterfactual removes the whole preference."""
    task = TASKS["induction"]
    model = task.model()
    pair = task.pairs()[0]
    graph = component_graph(model, pair.clean, target=pair.answer, wrong=pair.wrong, counterfactual=pair.counterfactual)
    pruned = prune_graph(graph)
    edges = _edges(pruned)
    assert {n.id for n in pruned.nodes if n.kind in ("head", "mlp")} == {"head:0:0", "head:1:0"}
    logit = pruned.nodes[pruned.logit_nodes()[0]].id
    assert edges[("head:0:0", "head:1:0")] > 1 and edges[("head:1:0", logit)] > 1
    assert any(s.startswith("emb:") and t == "head:0:0" and w > 1 for (s, t), w in edges.items())
    span = graph.metadata["metric_span"]
    assert span > 5
    assert edges[("head:1:0", logit)] == pytest.approx(span, rel=1e-3)  # the only way into the logit
    check = component_check(model, graph, n_components=2)
    assert check.top_change == pytest.approx(-span, abs=1e-3)  # both heads patched: the counterfactual's answer
    assert abs(check.random_mean) < abs(check.top_change)
    # the graph's own prediction (its edges out of the two heads) says the same, and the check says they agree
    assert check.agrees and check.top_predicted == pytest.approx(-span, rel=0.05)


def test_component_graph_sums_the_head_level_edges_it_is_built_from(tmp_path):
    """Every edge into a layer's heads is that layer's q/k/v edges (key/value edges split over the query heads that
    share them); the embedding nodes split the embedding's edges by position; the file round-trips."""
    model = tiny_model("llama")  # 4 query heads over 2 key/value heads
    ids = model.encode(PROMPT)
    graph = component_graph(model, PROMPT, steps=8)
    target = graph.nodes[graph.logit_nodes()[0]].feature
    blank = blank_baseline(model, ids)
    assert len(blank) == len(ids) and len(set(blank[1:])) == 1 and blank != ids

    def metric(logits, item):
        return logits[item.answer] - logits.mean()

    pair = PairTokens(ids, blank, target, target)
    heads = edge_attribution(model, [pair], method="eap-ig", metric=metric, steps=8)
    scores = heads.scores()
    edges = _edges(graph)
    for layer in range(model.n_layers):
        into_heads = sum(w for (s, t), w in edges.items() if t.startswith(f"head:{layer}:"))
        reading = [r.name for r in receivers(model) if r.layer == layer and r.kind in ("q", "k", "v")]
        expected = sum(v for (up, down), v in scores.items() if down in reading)
        assert into_heads == pytest.approx(expected, rel=1e-4, abs=1e-5)
        from_mlp = sum(w for (s, t), w in edges.items() if s == f"mlp:{layer}")
        assert from_mlp == pytest.approx(sum(v for (up, _), v in scores.items() if up == f"layers.{layer}.mlp"),
                                         rel=1e-4, abs=1e-5)  # fmt: skip
    from_embeddings = sum(w for (s, t), w in edges.items() if s.startswith("emb:"))
    assert from_embeddings == pytest.approx(sum(v for (up, _), v in scores.items() if up == "embed"), rel=1e-4)
    assert len({s.split(":")[1] for s, _ in edges if s.startswith("emb:")}) == len(ids)  # one node per position

    loaded = load_graph(save_graph(graph, tmp_path / "graph.json"))
    assert [n.id for n in loaded.nodes] == [n.id for n in graph.nodes]
    assert all(n.position is None for n in loaded.nodes if n.kind in ("head", "mlp"))
    assert torch.allclose(loaded.weights, graph.weights) and torch.equal(loaded.sources, graph.sources)


@pytest.mark.parametrize("family", ["gpt2", "gemma2"])
def test_component_graphs_work_where_edge_patching_does_not(family):
    model = tiny_model(family)
    graph = component_graph(model, PROMPT, steps=4)
    pruned = prune_graph(graph)
    assert any(n.kind in ("head", "mlp") for n in pruned.nodes) and len(pruned.weights) > 0
    assert sum(w for s, t, w in zip(graph.sources.tolist(), graph.targets.tolist(), graph.weights.tolist(),
                                    strict=True) if t == graph.logit_nodes()[0]) != 0  # fmt: skip


def test_trace_falls_back_to_components_without_transcoders(capsys, tmp_path, tiny_llama_folder):
    code, stdout, _ = cli(capsys, "trace", PROMPT, "--model", tiny_llama_folder, "--out", tmp_path / "g")
    assert code == 0 and "tracing heads and MLPs" in stdout and "random components" in stdout
    graph = load_graph(tmp_path / "g" / "graph.json")
    assert graph.metadata["level"] == "component" and graph.metadata["causal_check"]["what"] == "components"
    assert any(n.kind == "head" for n in graph.nodes)
    code, _, err = cli(capsys, "trace", PROMPT, "--model", tiny_llama_folder, "--out", tmp_path / "x",
                       "--level", "features")  # fmt: skip
    assert_one_line_error(code, err, "no default transcoders")
    code, _, err = cli(capsys, "trace", PROMPT, "--model", tiny_llama_folder, "--out", tmp_path / "x",
                       "--level", "components", "--counterfactual", "The cat")  # fmt: skip
    assert_one_line_error(code, err, "same length")
    code, _, err = cli(capsys, "trace", " ", "--model", tiny_llama_folder, "--out", tmp_path / "x",
                       "--level", "components")  # fmt: skip
    assert_one_line_error(code, err, "empty")
