"""Circuit tracing: the replacement model reproduces the model, and every graph edge is the direct effect an
intervention measures."""

import pytest
import torch

from modelrecon.circuits.attribute import attribute
from modelrecon.circuits.replacement import ReplacementModel
from modelrecon.dictionaries import Dictionary, DictionaryConfig
from modelrecon.errors import BadInputError

from conftest import assert_one_line_error, cli
from tiny import FAMILIES, tiny_model

PROMPT = "The cat sat on the mat"


def _transcoders(model, kind="skip-transcoder", seed=0, activation="topk", width=40):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for layer in range(model.n_layers):
        sites = (f"layers.{layer}.mlp.in",), (f"layers.{layer}.mlp.out",)
        k = 5 if activation == "topk" else None
        d = Dictionary(DictionaryConfig(kind, model.d_model, model.d_model, width, activation, k, *sites))
        with torch.no_grad():
            for p in d.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
        out.append(d)
    return out


def _clt(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sites = (
        tuple(f"layers.{i}.mlp.in" for i in range(model.n_layers)),
        tuple(f"layers.{i}.mlp.out" for i in range(model.n_layers)),
    )
    d = Dictionary(DictionaryConfig("clt", model.d_model, model.d_model, 40, "topk", 5, *sites))
    with torch.no_grad():
        for p in d.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return [d]


@pytest.fixture(scope="module", params=["per-layer", "clt"])
def setup(request):
    model = tiny_model("llama")
    rm = ReplacementModel(model, _transcoders(model) if request.param == "per-layer" else _clt(model))
    return model, rm, rm.clean(model.encode(PROMPT))


def test_replacement_model_reproduces_the_logits(setup):
    model, rm, clean = setup
    assert (rm.forward(clean, rows=2) - clean.logits).abs().max() < 1e-4  # frozen: patterns, norms, errors
    assert (rm.forward(clean, live=True) - clean.logits).abs().max() < 1e-4  # nothing frozen but the errors


def _pre_activation(rm, clean, node, features=None):
    with torch.no_grad(), rm.linearised(clean, 1, features) as leaves:
        logits = rm.target_logits(rm.model.batch_from_ids([clean.ids]))[0]
        if node.kind == "logit":
            return float(logits[node.feature] - logits.mean())
        return float(leaves["mlp_in"][node.layer][0, node.position] @ rm.encoder_vector(node.layer, node.feature))


def test_edges_are_the_effects_of_doubling_a_feature_with_everything_downstream_frozen(setup):
    model, rm, clean = setup
    graph = attribute(model, PROMPT, rm.dictionaries, max_feature_nodes=60, progress=False)
    assert len({n.id for n in graph.nodes}) == graph.n_nodes  # ids never collide
    checked = 0
    for target in [*graph.logit_nodes()[:1], *[i for i, n in enumerate(graph.nodes) if n.kind == "feature"][-3:]]:
        node = graph.nodes[target]
        base = _pre_activation(rm, clean, node)
        for source, weight in graph.inputs_of(target, top=4):
            src = graph.nodes[source]
            if src.kind != "feature":
                continue
            features = [f.clone()[None] for f in clean.features]
            features[src.layer][0, src.position, src.feature] *= 2
            assert _pre_activation(rm, clean, node, features) - base == pytest.approx(weight, abs=1e-3, rel=1e-4)
            checked += 1
    assert checked >= 3
    # Every edge runs forward in the model: from an earlier layer (or position) to a later one.
    for s, t in zip(graph.sources.tolist(), graph.targets.tolist(), strict=True):
        a, b = graph.nodes[s], graph.nodes[t]
        assert a.position <= b.position
        if a.kind == "feature" and b.kind == "feature":
            assert a.layer < b.layer


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama"])
def test_every_family_of_the_replacement_model_gets_exact_edges(family):
    """Sliding windows (mistral), q/k/v biases (qwen2), q/k norms and a head size of its own (qwen3), norms that
    scale by 1 + weight (gemma), norms on each sublayer's output and logit soft-capping (gemma2, gemma3), fused q/k/v
    (phi3, gpt2, gpt_neox), layer norms with biases and Conv1D weights (gpt2), the parallel residual (gpt_neox): the
    replacement model must reproduce each model's logits and the attribution pass match its own forward pass."""
    model = tiny_model(family, seed=1)
    rm = ReplacementModel(model, _transcoders(model, seed=1))
    clean = rm.clean(model.encode(PROMPT))
    assert (rm.forward(clean, rows=2) - clean.logits).abs().max() < 1e-4
    assert (rm.forward(clean, live=True) - clean.logits).abs().max() < 1e-4
    graph = attribute(model, PROMPT, rm, max_feature_nodes=1000, progress=False)
    assert graph.metadata["edge_check_error"] < 1e-5
    logit = graph.logit_nodes()[0]
    base = _pre_activation(rm, clean, graph.nodes[logit])
    sources = [(s, w) for s, w in graph.inputs_of(logit, top=graph.n_nodes) if graph.nodes[s].kind == "feature"]
    for source, weight in sources[:3]:
        node = graph.nodes[source]
        features = [f.clone()[None] for f in clean.features]
        features[node.layer][0, node.position, node.feature] *= 2
        assert _pre_activation(rm, clean, graph.nodes[logit], features) - base == pytest.approx(weight, abs=1e-4)


def test_the_edge_check_catches_one_wrong_edge(setup):
    from modelrecon.circuits.attribute import NodeIndex
    from modelrecon.circuits.jacobian import Jacobian, Target, check_edges

    model, rm, clean = setup
    token = int(clean.logits.argmax())
    index = NodeIndex.build(clean, [token])
    targets = [Target("logit", token=token)] + [Target("feature", layer=k[1], position=k[2], feature=k[3])
                                                for k in index.keys if k[0] == "feature" and k[1] == 1][:5]  # fmt: skip
    nodes = [index.logit(token)] + [index.keys.index(("feature", 1, t.position, t.feature)) for t in targets[1:]]
    rows, sources, weights = Jacobian(rm, clean).effects(targets, index)
    edges = (torch.tensor(nodes)[rows], sources, weights)
    assert check_edges(rm, clean, index, edges, targets, nodes) < 1e-5
    strongest = int(weights.abs().argmax())
    wrong = weights.clone()
    wrong[strongest] *= 1.1
    assert check_edges(rm, clean, index, (edges[0], sources, wrong), targets, nodes) > 1e-3


def test_logit_targets_and_budget(setup):
    model, rm, clean = setup
    graph = attribute(model, PROMPT, rm.dictionaries, max_feature_nodes=10, progress=False)
    probabilities = [n.activation for n in graph.nodes if n.kind == "logit"]
    assert sum(probabilities) >= 0.95 or len(probabilities) == 10
    assert sum(n.kind == "feature" for n in graph.nodes) == 10
    one = attribute(model, PROMPT, rm.dictionaries, target="x", max_feature_nodes=5, progress=False)
    assert [n.token for n in one.nodes if n.kind == "logit"] == ["x"]
    diff = attribute(model, PROMPT, rm.dictionaries, target="x", wrong="q", max_feature_nodes=5, progress=False)
    logit = diff.logit_nodes()[0]
    source, weight = next((s, w) for s, w in diff.inputs_of(logit, top=diff.n_nodes) if diff.nodes[s].kind == "feature")
    node = diff.nodes[source]
    features = [f.clone()[None] for f in clean.features]
    features[node.layer][0, node.position, node.feature] *= 2
    x, q = model.encode("x")[-1], model.encode("q")[-1]
    changed = rm.forward(clean, features=features)[0]
    assert float((changed[x] - changed[q]) - (clean.logits[x] - clean.logits[q])) == pytest.approx(weight, abs=1e-3)
    with pytest.raises(BadInputError, match="one per layer"):
        ReplacementModel(model, _transcoders(model)[:1])


def test_trace_command_writes_a_pruned_graph_and_checks_it(capsys, tmp_path, tiny_llama_folder):
    from modelrecon import load
    from modelrecon.circuits.graph_file import load_graph
    from modelrecon.dictionaries import save_dictionaries

    model = load(str(tiny_llama_folder))
    save_dictionaries(_transcoders(model), tmp_path / "tc")
    code, stdout, _ = cli(capsys, "trace", PROMPT, "--model", tiny_llama_folder, "--transcoders", tmp_path / "tc",
                          "--out", tmp_path / "graph", "--max-features", "40")  # fmt: skip
    assert code == 0 and "path 1:" in stdout and "causal check" in stdout and "edges checked" in stdout
    graph = load_graph(tmp_path / "graph" / "graph.json")
    assert graph.metadata["causal_check"]["count"] == 10
    assert 0 < sum(n.kind == "feature" for n in graph.nodes) <= 40 and graph.logit_nodes()
    # dashboards need a cube of this model's MLP inputs: any other cube fails at once, before anything is written
    from modelrecon.cube.capture import capture

    capture(model, [PROMPT], tmp_path / "resid.zarr", sites=["layers.*.resid_post"], progress=False)
    code, _, err = cli(capsys, "trace", PROMPT, "--model", tiny_llama_folder, "--transcoders", tmp_path / "tc",
                       "--cube", tmp_path / "resid.zarr", "--out", tmp_path / "no-graph")  # fmt: skip
    assert_one_line_error(code, err, "has no mlp.in activations")
    assert not (tmp_path / "no-graph").exists()


def test_feature_interventions_direct_and_total(setup):
    from modelrecon.circuits.replacement import FeatureChange, generate_with_features, intervene

    model, rm, clean = setup
    graph = attribute(model, PROMPT, rm.dictionaries, max_feature_nodes=60, progress=False)
    logit = graph.logit_nodes()[0]
    token = graph.nodes[logit].feature
    source, weight = next(
        (s, w) for s, w in graph.inputs_of(logit, top=graph.n_nodes) if graph.nodes[s].kind == "feature"
    )
    node = graph.nodes[source]
    ablate = [FeatureChange(node.layer, node.position, node.feature, value=0.0)]
    direct = intervene(rm, clean, ablate, direct=True)
    before = clean.logits[token] - clean.logits.mean()
    assert float(direct[token] - direct.mean() - before) == pytest.approx(-weight, abs=1e-3)  # the edge, exactly
    doubled = intervene(rm, clean, [FeatureChange(node.layer, node.position, node.feature, scale=2.0)], direct=True)
    assert float(doubled[token] - doubled.mean() - before) == pytest.approx(weight, abs=1e-3)
    total = intervene(rm, clean, ablate)  # downstream features respond: not the edge in general
    assert torch.isfinite(total).all() and not torch.allclose(total, clean.logits)
    assert torch.allclose(intervene(rm, clean, []), clean.logits, atol=1e-4)
    text = generate_with_features(rm, clean.ids, ablate, max_new_tokens=3)
    assert len(text) == 3
    with pytest.raises(BadInputError, match="exactly one"):
        intervene(rm, clean, [FeatureChange(0, 1, 0)])


def test_graph_paths_predict_what_removing_a_feature_does_when_features_respond():
    """The causal check's prediction (`predicted_change`) composes the graph's edges along every path. In the world
    where the graph is exact (attention and norms frozen, every later feature recomputed by its encoder), removing a
    small fraction of one feature moves the target by that fraction of the prediction. ReLU transcoders keep every
    active feature in its linear region for a small change."""
    from modelrecon.circuits.check import predicted_change

    model = tiny_model("llama")
    transcoders = _transcoders(model, seed=3, activation="relu", width=24)
    rm = ReplacementModel(model, transcoders)
    graph = attribute(model, PROMPT, rm, max_logits=1, max_feature_nodes=10**6, progress=False)  # every feature
    clean = rm.clean(graph.token_ids)
    logit = graph.logit_nodes()[0]
    token = graph.nodes[logit].feature

    def measure(features=None) -> float:
        logits = rm.forward(clean, features=features, live=False, live_features=True)[0].double()
        return float(logits[token] - logits.mean())

    base = measure()
    assert base == pytest.approx(float(clean.logits[token] - clean.logits.mean()), abs=1e-4)
    features = [i for i, n in enumerate(graph.nodes) if n.kind == "feature"]
    chosen = sorted(features, key=lambda i: -abs(predicted_change(graph, logit, [i])))[:6]
    has_paths = 0
    for i in chosen:
        node, fraction = graph.nodes[i], 1e-3
        values = [f.clone()[None] for f in clean.features]
        values[node.layer][0, node.position, node.feature] *= 1 - fraction
        measured = (measure(values) - base) / fraction
        predicted = predicted_change(graph, logit, [i])
        assert measured == pytest.approx(predicted, rel=2e-2, abs=2e-3), node
        has_paths += abs(predicted - (-graph.edge(node.id, graph.nodes[logit].id))) > 1e-3  # not only direct
    assert has_paths  # some of them act through later features too


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gpt_neox"])
def test_long_prompt_mode_recomputes_the_patterns_and_gets_the_same_edges(family):
    """Past a memory budget the attribution pass keeps no [layers, heads, pos, pos] patterns: it recomputes blocks
    of rows from the frozen queries and keys (sliding windows and soft-capping included). Same edges."""
    from modelrecon.circuits.attribute import NodeIndex
    from modelrecon.circuits.jacobian import Jacobian, Target

    model = tiny_model(family, seed=2)
    rm = ReplacementModel(model, _transcoders(model, seed=2))
    clean = rm.clean(model.encode(PROMPT * 2))
    frozen = clean.patterns[1]
    assert frozen.nbytes() < frozen.pattern().numel() * 4  # what is kept grows with pos, not pos^2
    token = int(clean.logits.argmax())
    index = NodeIndex.build(clean, [token])
    targets = [Target("logit", token=token)] + [Target("feature", layer=k[1], position=k[2], feature=k[3])
                                                for k in index.keys if k[0] == "feature" and k[1] == 2][:8]  # fmt: skip
    kept = Jacobian(rm, clean).effects(targets, index)
    recomputed = Jacobian(rm, clean, pattern_bytes=0).effects(targets, index)
    assert all(rm_layer.pattern is None for rm_layer in Jacobian(rm, clean, pattern_bytes=0).layers)
    assert torch.equal(kept[0], recomputed[0]) and torch.equal(kept[1], recomputed[1])
    assert (kept[2] - recomputed[2]).abs().max() < 1e-5 * kept[2].abs().max()


def test_attribution_that_will_not_fit_is_refused_before_it_starts(monkeypatch, capsys, tmp_path, tiny_llama_folder):
    """The estimate is made from the clean run, before any row: on a machine with too little free memory the trace
    stops with one line that names the part that does not fit and the flag that bounds it."""
    import modelrecon.memory as memory
    from modelrecon.circuits.attribute import estimate_memory

    model = tiny_model("llama")
    rm = ReplacementModel(model, _transcoders(model))
    clean = rm.clean(model.encode(PROMPT))
    small, large = estimate_memory(rm, clean, 10, 32), estimate_memory(rm, clean, 1000, 32)
    assert large["edges"] == pytest.approx(100 * small["edges"], rel=0.01) and large["pass"] == small["pass"]
    fits = estimate_memory(rm, clean, 40, 32)  # 10 features and at most 10 logits, with room to spare
    monkeypatch.setattr(memory, "available_bytes", lambda device: sum(fits.values()))
    attribute(model, PROMPT, rm, max_feature_nodes=10, progress=False)  # fits: runs
    with pytest.raises(BadInputError, match="lower --max-features"):
        attribute(model, PROMPT, rm, max_feature_nodes=1000, progress=False)
    with pytest.raises(BadInputError, match="trained on at most 128 positions"):  # past the context: refused too
        attribute(model, "x" * 200, rm, progress=False)
    from modelrecon.dictionaries.formats import save_dictionaries

    save_dictionaries(_transcoders(model), tmp_path / "tc")
    code, _, err = cli(capsys, "trace", PROMPT, "--model", tiny_llama_folder, "--transcoders", tmp_path / "tc",
                       "--out", tmp_path / "g")  # fmt: skip
    assert_one_line_error(code, err, "GiB free", "lower --max-features")
    assert not (tmp_path / "g").exists()
