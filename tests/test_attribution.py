"""Attribution and lenses against their exact counterparts: the model's logits, the interventions they approximate,
and a white-box model on which first-order estimates are exact by construction."""

import json
import string

import numpy as np
import pytest
import torch
import zarr
from torch import nn

import modelrecon as mr
from modelrecon.attribution.compare import compare, kendall_tau_b, spearman
from modelrecon.attribution.dla import direct_logit_attribution
from modelrecon.attribution.edges import edge_attribution
from modelrecon.attribution.gradients import grad_x_act, integrated_gradients
from modelrecon.attribution.lens import logit_lens
from modelrecon.attribution.patching import attribution_patching
from modelrecon.attribution.probes import train_probes
from modelrecon.counterfactual import Pair, path_patch, sweep
from modelrecon.errors import BadInputError

from conftest import PROMPTS, assert_one_line_error, cli, embedded_routes
from tiny import tiny_model

PAIRS = [Pair("The cat sat", "The dog ran", "x", "q"), Pair("Cold winter", "Warm summer", "t", "m")]


def test_logit_lens_last_row_is_the_models_logits(family_model):
    m = family_model
    lens = logit_lens(m, PROMPTS[0], k=3, target="o")
    logits = mr.run(m, PROMPTS[0]).logits[0]
    probs = torch.softmax(logits.float(), -1)
    top = torch.topk(probs, 3)
    assert torch.equal(lens.top_ids[-1], top.indices)
    torch.testing.assert_close(lens.top_probs[-1], top.values, rtol=0, atol=1e-6)
    o = m.tokenizer.convert_tokens_to_ids("o")
    torch.testing.assert_close(lens.target_probs[-1], probs[:, o], rtol=0, atol=1e-6)
    assert lens.top_ids.shape == (m.n_layers + 1, len(lens.tokens), 3)


@pytest.mark.parametrize("neurons", [False, True])
def test_dla_terms_sum_to_the_logit_difference(family_model, neurons):
    m = family_model
    result = direct_logit_attribution(m, PROMPTS[2], "x", "q", neurons=neurons)
    logits = mr.run(m, PROMPTS[2]).logits[0][-1]
    x, q = m.tokenizer.convert_tokens_to_ids(["x", "q"])
    cap = getattr(m.hf.config, "final_logit_softcapping", None)
    if not cap:  # with soft-capping the decomposition explains the logits before the cap
        assert result.logit == pytest.approx(float(logits[x] - logits[q]), abs=1e-4)
    assert result.total == pytest.approx(result.logit, abs=1e-4)
    heads = [t for t in result.terms if t.head is not None]
    if m.adapter.family in ("llama", "gpt2", "gpt_neox", "phi3"):
        assert len(heads) == m.n_layers * m.n_heads


def test_dla_of_a_head_equals_removing_its_direct_path():
    """Zeroing one head's direct contribution, with the final norm's scale frozen, moves the logit difference by
    exactly its term: checked by editing the final residual by hand."""
    m = tiny_model("llama")
    result = direct_logit_attribution(m, PROMPTS[0], "x", "q")
    term = next(t for t in result.terms if t.layer == 1 and t.head == 2)
    acts = mr.run(m, PROMPTS[0], record=["layers.1.attn.heads", "layers.2.resid_post"]).acts
    w_o = m.layer_module(1, "self_attn.o_proj").weight[:, 2 * m.d_head : 3 * m.d_head]
    contribution = acts["layers.1.attn.heads"][0][-1, 2] @ w_o.T
    final = acts["layers.2.resid_post"][0][-1].double()
    scale = 1 / torch.sqrt((final**2).mean() + m.hf.config.rms_norm_eps)
    x, q = m.tokenizer.convert_tokens_to_ids(["x", "q"])
    direction = (m.hf.lm_head.weight[x] - m.hf.lm_head.weight[q]).double()
    expected = float((contribution.double() * scale * m.hf.model.norm.weight.double()) @ direction)
    assert term.value == pytest.approx(expected, abs=1e-6)


def test_gradient_x_activation_and_integrated_gradients(tmp_path):
    m = tiny_model("qwen2")
    gxa = grad_x_act(m, PROMPTS[0], "layers.1.resid_post", "x", "q")
    x, q = m.tokenizer.convert_tokens_to_ids(["x", "q"])
    full = mr.run(m, PROMPTS[0], record=["layers.1.resid_post"], grad=["layers.1.resid_post"],
                  grad_of=lambda logits: logits[0][-1, x] - logits[0][-1, q])  # fmt: skip
    assert torch.equal(gxa.per_unit, full.acts["layers.1.resid_post"][0] * full.grads["layers.1.resid_post"][0])
    # Completeness improves with steps from a counterfactual baseline of the same length.
    errors = [
        integrated_gradients(m, "The cat sat", "embed", "x", "q", baseline="The dog ran", steps=s).completeness[
            "relative_error"
        ]
        for s in (2, 64)
    ]
    assert errors[1] < errors[0] and errors[1] < 1e-3
    zero = integrated_gradients(m, "The cat sat", "layers.1.mlp.out", "x", "q", steps=64, batch_size=5)
    assert zero.completeness["relative_error"] < 1e-2 and zero.per_unit.shape == (11, m.d_model)
    cube = mr.capture(m, PROMPTS, tmp_path / "mean.zarr", sites=["layers.1.mlp.out"], dtype="float32", progress=False)
    from_cube = integrated_gradients(m, "The cat sat", "layers.1.mlp.out", "x", "q", baseline=cube, steps=32)
    mean = torch.as_tensor(np.asarray(cube.get("mlp.out", layers=[1]))[:, 0].mean(0), dtype=torch.float32)
    by_hand = integrated_gradients(m, "The cat sat", "layers.1.mlp.out", "x", "q", baseline=mean, steps=32)
    torch.testing.assert_close(from_cube.per_unit, by_hand.per_unit, rtol=0, atol=1e-6)
    assert from_cube.completeness["relative_error"] < 1e-2
    with pytest.raises(BadInputError, match="the cube has no 'layers.0.mlp.out'"):
        integrated_gradients(m, "The cat sat", "layers.0.mlp.out", "x", baseline=cube)
    with pytest.raises(BadInputError, match="'logits' is what the attribution explains"):
        integrated_gradients(m, "The cat sat", "logits", "x")
    with pytest.raises(BadInputError, match="baseline prompt 'Hi' has 2 tokens"):
        integrated_gradients(m, "The cat sat", "embed", "x", baseline="Hi")


@pytest.fixture(scope="module")
def linear_model():
    """A real GPT-2 whose logits are linear in every residual-stream site by construction: no norms (identity),
    a linear MLP activation, and zero query/key weights so every attention pattern is uniform whatever the input."""
    m = tiny_model("gpt2", activation_function="linear")
    t = m.hf.transformer
    with torch.no_grad():
        for block in t.h:
            block.ln_1, block.ln_2 = nn.Identity(), nn.Identity()
            block.attn.c_attn.weight[:, : 2 * m.d_model] = 0.0
            block.attn.c_attn.bias[: 2 * m.d_model] = 0.0
        t.ln_f = nn.Identity()
    return m


@pytest.mark.parametrize("kind", ["resid_pre", "resid_post", "attn", "mlp", "heads"])
def test_attribution_patching_is_exact_on_a_linear_model(linear_model, kind):
    estimate = attribution_patching(linear_model, PAIRS, kind)
    exact = sweep(linear_model, PAIRS, kind)
    np.testing.assert_allclose(estimate.effects, exact.effects, rtol=0, atol=1e-4)
    report = compare(estimate, exact)
    assert report.disagreements == []
    # Cells no patch moves are exactly 0 in the sweep and within float noise of 0 (1e-8) in the estimate: ties whose
    # order is noise (it differs between CPUs). The ranking must hold on every cell that moves.
    est, ex = np.asarray(estimate.effects).ravel(), np.asarray(exact.effects).ravel()
    moved = np.abs(ex) > 1e-6
    assert moved.sum() > 10 and spearman(est[moved], ex[moved]) > 0.999
    assert attribution_patching(tiny_model("gpt2"), PAIRS[:1], kind).method == "atp"


def test_atp_star_qk_fix_is_exact_when_only_the_softmax_is_nonlinear():
    """The linear GPT-2, but with real queries and keys in its last layer: patching a query or key there changes
    the metric only through that head's softmax. The QK fix recomputes the pattern exactly, so AtP* is exact;
    plain AtP linearises the softmax and is not."""
    m = tiny_model("gpt2", activation_function="linear")
    t = m.hf.transformer
    with torch.no_grad():
        for i, block in enumerate(t.h):
            block.ln_1, block.ln_2 = nn.Identity(), nn.Identity()
            if i < m.n_layers - 1:
                block.attn.c_attn.weight[:, : 2 * m.d_model] = 0.0
                block.attn.c_attn.bias[: 2 * m.d_model] = 0.0
        t.ln_f = nn.Identity()
    for kind in ("q", "k"):
        exact = sweep(m, PAIRS[:1], kind)
        star = attribution_patching(m, PAIRS[:1], kind, method="atpstar")
        plain = attribution_patching(m, PAIRS[:1], kind, method="atp")
        np.testing.assert_allclose(star.effects, exact.effects, rtol=0, atol=1e-5)
        assert np.abs(plain.effects - exact.effects).max() > 1e-3


def test_edge_attribution_to_the_logits_is_path_patching_on_a_linear_model(linear_model):
    edges = edge_attribution(linear_model, PAIRS[:1])
    exact = path_patch(linear_model, PAIRS[:1], "logits", senders="mlp")
    by_edge = {(e["upstream"], e["downstream"]): e["effect"] for e in edges.edges}
    for cell, effect in zip(exact.cells, exact.effects[0], strict=True):
        assert by_edge[(f"layers.{cell.layer}.mlp", "logits")] == pytest.approx(float(effect), abs=1e-4)
    ig = edge_attribution(linear_model, PAIRS[:1], method="eap-ig", steps=4)
    assert [e["score"] for e in ig.edges] == pytest.approx([e["score"] for e in edges.edges], abs=1e-4)
    assert ("layers.2.mlp", "layers.1.attn") not in by_edge  # edges only run forward


def test_probe_finds_a_planted_label_and_its_control_does_not(tmp_path):
    m = tiny_model("llama")
    rng = np.random.default_rng(0)
    chars = list(string.ascii_letters + string.digits + " .,!?")
    prompts = ["".join(rng.choice(chars, size=40)) for _ in range(40)]
    path = tmp_path / "planted.zarr"
    cube = mr.capture(m, prompts, path, sites=["layers.*.resid_post"], dtype="float32", progress=False)
    labels = rng.integers(0, 2, cube.n_tokens)  # per token occurrence, independent of the token's identity
    direction = rng.normal(size=m.d_model)
    values = zarr.open_group(str(path))["sites/resid_post"]
    values[:, 1, :] = values[:, 1, :] + (2 * labels[:, None] - 1) * direction[None] / np.linalg.norm(direction)
    results = train_probes(mr.open_cube(path), "resid_post", labels)
    planted = results[1]
    assert planted.test_score > 0.95 and planted.control_score < 0.75 and planted.selectivity > 0.25
    assert all(r.test_score < 0.65 for r in (results[0], results[2]))  # the label is only where it was planted
    cosine = np.dot(planted.direction, direction) / np.linalg.norm(planted.direction) / np.linalg.norm(direction)
    assert cosine > 0.5
    with pytest.raises(BadInputError, match="labels for a cube of"):
        train_probes(mr.open_cube(path), "resid_post", labels[:-1])


def test_rank_correlations():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(x, x**3) == pytest.approx(1.0) and kendall_tau_b(x, -x) == pytest.approx(-1.0)
    # One swapped pair of five: Spearman 1 - 6*2/(5*24) = 0.9, Kendall (9 - 1) / 10 = 0.8.
    y = np.array([1.0, 2.0, 4.0, 3.0, 5.0])
    assert spearman(x, y) == pytest.approx(0.9) and kendall_tau_b(x, y) == pytest.approx(0.8)
    ties = np.array([0.0, 0.0, 1.0, 2.0, 2.0])
    assert spearman(ties, ties) == pytest.approx(1.0) and kendall_tau_b(ties, ties) == pytest.approx(1.0)


def test_cli_lens_attribute_verify(capsys, tmp_path, tiny_llama_folder):
    code, out, _ = cli(capsys, "lens", "Hello there", "--model", tiny_llama_folder, "--target", "e",
                       "--json", tmp_path / "lens.json", "--html", tmp_path / "lens.html")  # fmt: skip
    assert code == 0 and "layer 2" in out
    assert len(json.loads((tmp_path / "lens.json").read_text())["rows"]) == 4
    (lens_page,) = embedded_routes((tmp_path / "lens.html").read_text()).values()  # the viewer's lens view
    assert lens_page["data"] == json.loads((tmp_path / "lens.json").read_text())

    code, out, _ = cli(capsys, "attribute", "The cat sat", "--model", tiny_llama_folder, "--method", "dla",
                       "--answer", "x", "--wrong", "q", "--json", tmp_path / "dla.json")  # fmt: skip
    data = json.loads((tmp_path / "dla.json").read_text())
    assert code == 0 and data["total"] == pytest.approx(data["logit"], abs=1e-4)
    code, out, _ = cli(capsys, "attribute", "The cat sat", "--model", tiny_llama_folder, "--method", "ig",
                       "--answer", "x", "--baseline", "The dog ran", "--json", tmp_path / "ig.json")  # fmt: skip
    assert code == 0 and "relative error" in out
    pair = ["--clean", "The cat sat", "--corrupt", "The dog ran", "--answer", "x", "--wrong", "q"]
    code, out, _ = cli(capsys, "attribute", "--method", "eap", *pair, "--model", tiny_llama_folder,
                       "--json", tmp_path / "eap.json")  # fmt: skip
    assert code == 0 and json.loads((tmp_path / "eap.json").read_text())["edges"]

    code, out, _ = cli(capsys, "verify", "--sweep", "resid_pre", *pair, "--model", tiny_llama_folder,
                       "--json", tmp_path / "verify.json", "--html", tmp_path / "verify.html")  # fmt: skip
    report = json.loads((tmp_path / "verify.json").read_text())
    assert code == 0 and "Spearman" in out and -1 <= report["spearman"] <= 1
    assert len(report["estimate"]) == len(report["exact"]) == 3 * 11
    (embedded,) = embedded_routes((tmp_path / "verify.html").read_text()).values()  # the viewer's page
    assert embedded["kind"] == "verify" and embedded["data"]["spearman"] == pytest.approx(report["spearman"])


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["attribute", "The cat sat", "--method", "shap", "--answer", "x"], ["unknown --method 'shap'"]),
        (["attribute", "The cat sat", "--method", "ig", "--answer", "x", "--site", "logits"], ["not a differentiable"]),
        (["verify", "--sweep", "resid_pre", "--pairs", "EMPTY"], ["has no pairs"]),
        (["attribute", "--method", "atp", "--pairs", "EMPTY"], ["has no pairs"]),
    ],
)
def test_cli_attribution_bad_input(capsys, tmp_path, tiny_llama_folder, args, fragments):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    code, _, err = cli(capsys, *args, "--model", tiny_llama_folder, "--json", tmp_path / "out.json")
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "out.json").exists()
