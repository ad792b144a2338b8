"""Edges between heads, MLPs, embeddings and logits: EAP's receiver gradients and exact edge patching."""

import numpy as np
import pytest

from modelrecon.attribution.edges import (
    all_edges,
    component_of,
    edge_attribution,
    patch_edges,
    receiver_grads,
    receivers,
)
from modelrecon.counterfactual import Pair, Patch, run_with
from modelrecon.counterfactual.metrics import ScoredItem, item_metric
from modelrecon.counterfactual.pairs import tokenize_pairs
from modelrecon.errors import BadInputError
from modelrecon.hooks.run import run

from tiny import tiny_model

PAIR = Pair("The cat sat", "The dog ran", "x", "q")


def _pair_and_metric(model):
    pair = tokenize_pairs(model, [PAIR])[0]
    _, fn = item_metric("logit_diff")
    return pair, ScoredItem(pair.answer, pair.wrong, None), fn


def test_receiver_gradients_split_each_layers_gradient_exactly(family_model):
    """A layer's receivers share its input: their own gradients sum to the gradient that leaves through the layer's
    attention and MLP (d resid_pre - d resid_post), and the logits' is the last residual gradient."""
    m = family_model
    pair, item, fn = _pair_and_metric(m)
    grads = receiver_grads(m, pair.clean, pair.counterfactual, item, fn)
    names = [r.name for r in receivers(m)]
    sites = [f"layers.{i}.resid_{k}" for i in range(m.n_layers) for k in ("pre", "post")]
    full = run(m, m.batch_from_ids([pair.clean]), grad=sites, grad_of=lambda logits: fn(logits[0][-1], item)).grads
    for layer in range(m.n_layers):
        mine = [i for i, n in enumerate(names) if n.startswith(f"layers.{layer}.")]
        expected = full[f"layers.{layer}.resid_pre"][0] - full[f"layers.{layer}.resid_post"][0]
        np.testing.assert_allclose(grads[mine].sum(0), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads[names.index("logits")], full[sites[-1]][0], rtol=1e-5, atol=1e-6)


def test_component_edges_are_the_sums_of_head_edges(family_model):
    heads = edge_attribution(family_model, [PAIR], method="eap")
    components = edge_attribution(family_model, [PAIR], method="eap", level="component").scores()
    summed = {}
    for (up, down), score in heads.scores().items():
        key = (component_of(up), component_of(down))
        summed[key] = summed.get(key, 0.0) + score
    assert summed.keys() == components.keys()
    for key, score in components.items():
        assert score == pytest.approx(summed[key], rel=1e-9, abs=1e-12)
    assert not any(down == "layers.0.attn" for up, down in components if up == "layers.0.attn")


def test_exact_edge_patching_ends_are_the_two_runs_and_eap_is_its_first_order():
    m = tiny_model("llama")
    pair, item, fn = _pair_and_metric(m)
    edges = all_edges(m)
    none, every, *singles = patch_edges(m, pair, [set(), set(edges), *[{e} for e in edges]], item, fn)
    clean = float(fn(run_with(m, PAIR.clean, []).logits[0][-1], item))
    corrupt = float(fn(run_with(m, PAIR.counterfactual, []).logits[0][-1], item))
    assert none == pytest.approx(clean, abs=1e-5) and every == pytest.approx(corrupt, abs=1e-4)
    # Every outgoing edge of a head patched is the head's output patched (activation patching, noising).
    for sender, site, head in (
        ("layers.0.attn.heads:1", "layers.0.attn.heads", 1),
        ("layers.1.mlp", "layers.1.mlp.out", None),
    ):
        outgoing = {e for e in edges if e[0] == sender}
        (value,) = patch_edges(m, pair, [outgoing], item, fn)
        patch = Patch(site, heads=None if head is None else [head])
        node = run_with(m, PAIR.clean, [patch], sources={"counterfactual": [PAIR.counterfactual]})
        assert value == pytest.approx(float(fn(node.logits[0][-1], item)), abs=1e-5)
        assert abs(value - clean) > 1e-4  # the patch did something
    # EAP (noising) is the first-order estimate of m(edge patched) - m(clean): close for a one-letter change.
    near = Pair("The cat sat", "The cat sit", "x", "q")
    near_pair = tokenize_pairs(m, [near])[0]
    exact = patch_edges(m, near_pair, [set()] + [{e} for e in edges], item, fn)
    eap = edge_attribution(m, [near], direction="noise").scores()
    assert np.corrcoef([eap[e] for e in edges], exact[1:] - exact[0])[0, 1] > 0.8
    with pytest.raises(BadInputError, match="separate q/k/v"):
        patch_edges(tiny_model("gpt2"), pair, [set()], item, fn)
    with pytest.raises(BadInputError, match="level must be"):
        edge_attribution(m, [PAIR], level="neurons")
