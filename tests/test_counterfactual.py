"""Experiments over prompt pairs, patching sweeps and their statistics, against independent hand-written oracles."""

import json

import numpy as np
import pytest
import torch

import modelrecon as mr
from modelrecon.counterfactual import (
    Pair,
    Patch,
    Resample,
    Scale,
    Zero,
    experiment,
    path_patch,
    read_pairs,
    sweep,
    tokenize_pairs,
)
from modelrecon.counterfactual.stats import bootstrap, holm, paired_sign_flip_p
from modelrecon.errors import BadInputError

from conftest import assert_one_line_error, cli, embedded_routes
from tiny import tiny_model

# Same length in characters (the tiny models' tokens), answers are single characters.
PAIRS = [
    Pair("The cat sat", "The dog ran", "x", "q"),
    Pair("A red apple", "A big melon", "e", "z"),
    Pair("Birds fly!!", "Fish swim!!", "s", "k"),
    Pair("Cold winter", "Warm summer", "t", "m"),
    Pair("Seven tides", "Three tide!", "w", "a"),
    Pair("Open doors.", "Shut doors.", "o", "u"),
]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _logit_diff(model, logits, pair):
    answer, wrong = model.tokenizer.convert_tokens_to_ids([pair.answer, pair.wrong])
    return float(logits[-1, answer] - logits[-1, wrong])


def _loop_effects(model, pair, kind, direction):
    """The slow oracle: one forward pass per cell, each with a hand-written edit function."""
    site_kind = {"resid_pre": "resid_pre", "resid_post": "resid_post", "attn": "attn.out", "heads": "attn.heads",
                 "k": "attn.k"}[kind]  # fmt: skip
    base, source = (pair.counterfactual, pair.clean) if direction == "denoise" else (pair.clean, pair.counterfactual)
    m_clean = _logit_diff(model, mr.run(model, pair.clean).logits[0], pair)
    m_corrupt = _logit_diff(model, mr.run(model, pair.counterfactual).logits[0], pair)
    sites = [f"layers.{layer}.{site_kind}" for layer in range(model.n_layers)]
    source_acts = mr.run(model, source, record=sites).acts
    n_cols = {"heads": model.n_heads, "k": model.n_kv_heads}.get(kind, len(model.encode(pair.clean)))
    effects = torch.zeros(model.n_layers, n_cols)
    for layer, site in enumerate(sites):
        for col in range(n_cols):

            def edit(v, ctx, col=col, site=site):
                v = v.clone()
                if kind in ("heads", "k"):
                    v[0, :, col] = source_acts[site][0][:, col]
                else:
                    v[0, col] = source_acts[site][0][col]
                return v

            value = _logit_diff(model, mr.run(model, base, edit={site: edit}).logits[0], pair)
            effects[layer, col] = (value - m_corrupt) / (m_clean - m_corrupt)
    return effects


@pytest.mark.parametrize(
    ("kind", "direction"),
    [
        ("resid_pre", "denoise"),
        ("resid_post", "noise"),
        ("attn", "denoise"),
        ("heads", "denoise"),
        ("heads", "noise"),
        ("k", "denoise"),
    ],
)
def test_sweep_equals_the_one_cell_loop(model, kind, direction):
    pair = PAIRS[0]
    result = sweep(model, [pair], kind, direction=direction, batch_size=7)  # 7: cells split unevenly over batches
    expected = _loop_effects(model, pair, kind, direction)
    assert result.effect.shape == expected.shape
    torch.testing.assert_close(result.effect.float(), expected, rtol=0, atol=1e-5)
    # Denoising the whole last-layer residual (every position) restores the clean run: the last position's cell is 1.
    if kind == "resid_post" and direction == "denoise":
        assert abs(float(result.effect[-1, -1]) - 1.0) < 1e-5


def test_mlp_sweep_and_full_patches_hit_both_ends(model):
    pair = PAIRS[1]
    result = sweep(model, [pair], "mlp")
    assert result.effect.shape == (model.n_layers, len(model.encode(pair.clean)))
    # resid_pre of layer 0 at every position at once is the whole input: effect 1 (denoise) / 0 (noise) exactly.
    for direction, expected in (("denoise", 1.0), ("noise", 0.0)):
        patched = mr.counterfactual.run_with(
            model,
            pair.counterfactual if direction == "denoise" else pair.clean,
            [Patch("layers.0.resid_pre", source="s")],
            sources={"s": pair.clean if direction == "denoise" else pair.counterfactual},
        )
        m_clean = _logit_diff(model, mr.run(model, pair.clean).logits[0], pair)
        m_cf = _logit_diff(model, mr.run(model, pair.counterfactual).logits[0], pair)
        effect = (_logit_diff(model, patched.logits[0], pair) - m_cf) / (m_clean - m_cf)
        assert effect == pytest.approx(expected, abs=1e-6)


def test_sweep_over_pairs_is_deterministic_with_intervals(model):
    first = sweep(model, PAIRS, "resid_pre", seed=3)
    again = sweep(model, PAIRS, "resid_pre", seed=3)
    other = sweep(model, PAIRS, "resid_pre", seed=4)
    assert np.array_equal(first.ci_low, again.ci_low) and np.array_equal(first.ci_high, again.ci_high)
    assert not np.array_equal(first.ci_low, other.ci_low)
    mean = first.effect.flatten().numpy()
    assert np.all(first.ci_low <= mean + 1e-12) and np.all(mean <= first.ci_high + 1e-12)
    assert np.any(first.ci_high - first.ci_low > 0)
    # The mean grid is the mean of the per-pair sweeps.
    singles = np.stack([sweep(model, [p], "resid_pre").effect.numpy() for p in PAIRS])
    np.testing.assert_allclose(first.effect.numpy(), singles.mean(axis=0), rtol=0, atol=1e-6)


def test_sweep_json_fields(model):
    data = json.loads(sweep(model, PAIRS[:2], "heads").to_json())
    assert {"metric", "clean", "corrupt", "results"} <= set(data)
    row = data["results"][model.n_heads + 2]
    assert row["site"] == "layers.1.attn.heads" and row["head"] == 2 and row["position"] is None
    assert {"value", "effect", "ci_low", "ci_high"} <= set(row)
    assert len(data["results"]) == model.n_layers * model.n_heads


def test_position_sweep_rejects_pairs_of_different_lengths(model):
    pairs = [PAIRS[0], Pair("Hi there", "Yo there", "x", "q")]
    with pytest.raises(BadInputError, match="a position sweep needs pairs of one token length"):
        sweep(model, pairs, "resid_pre")
    assert sweep(model, pairs, "heads").effect.shape == (model.n_layers, model.n_heads)


def _sender_delta(model, pair, layer, head):
    """What a sender adds to the residual stream in the clean run minus the counterfactual run (independently)."""
    if head is None:
        site = f"layers.{layer}.mlp.out"
        clean, cf = (mr.run(model, p, record=[site]).acts[site][0] for p in (pair.clean, pair.counterfactual))
        return clean - cf
    site = f"layers.{layer}.attn.heads"
    clean, cf = (mr.run(model, p, record=[site]).acts[site][0][:, head] for p in (pair.clean, pair.counterfactual))
    w_o = model.layer_module(layer, "self_attn.o_proj").weight[:, head * model.d_head : (head + 1) * model.d_head]
    return (clean - cf) @ w_o.T


@pytest.mark.parametrize(("layer", "head"), [(0, 1), (1, 3), (1, None)])
def test_path_patching_to_the_logits_is_the_direct_effect(model, layer, head):
    pair = PAIRS[2]
    result = path_patch(model, [pair], "logits", senders="heads" if head is not None else "mlp")
    k = next(i for i, c in enumerate(result.cells) if c.layer == layer and c.head == head)
    # Oracle: the counterfactual's last residual plus the sender's difference, through the final norm and unembedding.
    last = f"layers.{model.n_layers - 1}.resid_post"
    resid = mr.run(model, pair.counterfactual, record=[last]).acts[last][0]
    with torch.no_grad():
        logits = model.hf.lm_head(model.hf.model.norm(resid + _sender_delta(model, pair, layer, head)))
    assert result.values[0, k] == pytest.approx(_logit_diff(model, logits, pair), abs=1e-5)


def test_path_patching_to_a_receiver_query(model):
    pair, (layer, head), (r_layer, r_head) = PAIRS[3], (0, 2), (2, 1)
    result = path_patch(model, [pair], [f"layers.{r_layer}.attn.q:{r_head}"])
    assert result.shape == (r_layer, model.n_heads) and len(result.cells) == r_layer * model.n_heads
    k = next(i for i, c in enumerate(result.cells) if c.layer == layer and c.head == head)
    # Oracle: the receiver's query computed from the counterfactual's resid_pre plus the sender's difference.
    site = f"layers.{r_layer}.resid_pre"
    resid = mr.run(model, pair.counterfactual, record=[site]).acts[site][0] + _sender_delta(model, pair, layer, head)
    attn_layer = model.layers[r_layer]
    with torch.no_grad():
        query = attn_layer.self_attn.q_proj(attn_layer.input_layernorm(resid)).reshape(len(resid), -1, model.d_head)

    def patch_query(v, ctx):
        v = v.clone()
        v[0, :, r_head] = query[:, r_head]
        return v

    expected = mr.run(model, pair.counterfactual, edit={f"layers.{r_layer}.attn.q": patch_query}).logits[0]
    assert result.values[0, k] == pytest.approx(_logit_diff(model, expected, pair), abs=1e-5)
    with pytest.raises(BadInputError, match="bad receiver 'layers.2.mlp.out:1'"):
        path_patch(model, [pair], ["layers.2.mlp.out:1"])
    with pytest.raises(BadInputError, match="head 9 is out of range"):
        path_patch(model, [pair], ["layers.2.attn.v:9"])


def test_experiment_sanity_checks_and_exact_components(model):
    last = f"layers.{model.n_layers - 1}.resid_post"
    components = {
        "noop": [Scale("layers.1.mlp.out", factor=1.0)],
        "all_input": [Patch("layers.0.resid_pre", source="counterfactual")],
        "all_last_layer": [Patch(last, source="counterfactual")],
        "zero_mlp0": [Zero("layers.0.mlp.out")],
    }
    result = experiment(model, PAIRS, components, seed=0)
    assert result.sanity["noop_exact"] and result.sanity["noop_max_abs_logit_diff"] == 0.0
    assert result.sanity["full_patch_exact"] and result.sanity["notes"] == []
    # Independent oracle: each prompt run alone, with a hand-written edit.
    for j, pair in enumerate(PAIRS):
        clean_alone = _logit_diff(model, mr.run(model, pair.clean).logits[0], pair)
        assert result.clean[j] == pytest.approx(clean_alone, abs=1e-5)
        zeroed = mr.run(model, pair.clean, edit={"layers.0.mlp.out": lambda v, ctx: torch.zeros_like(v)})
        assert result.component("zero_mlp0").values[j] == pytest.approx(
            _logit_diff(model, zeroed.logits[0], pair), abs=1e-5
        )
    noop = result.component("noop")
    assert noop.effects == [1.0] * len(PAIRS) and noop.p_value == 1.0
    for name in ("all_input", "all_last_layer"):
        assert result.component(name).effects == [0.0] * len(PAIRS)
        assert result.component(name).ci_low == result.component(name).ci_high == 0.0
    p = [c.p_value for c in result.components]
    assert [c.p_adjusted for c in result.components] == holm(p)


def test_experiment_is_deterministic_given_the_seed(model):
    components = {"resample": [Resample("layers.1.attn.out")], "zero": [Zero("layers.2.mlp.out", positions="last")]}
    first = experiment(model, PAIRS, components, seed=7)
    assert first.to_json() == experiment(model, PAIRS, components, seed=7).to_json()
    other = experiment(model, PAIRS, components, seed=8)
    assert other.component("resample").values != first.component("resample").values  # another draw of items


def test_experiment_patches_from_the_clean_run_when_based_on_the_counterfactual(model):
    result = experiment(model, PAIRS, {"restore": [Patch("layers.0.resid_pre", source="clean")]}, base="counterfactual")
    assert result.component("restore").effects == [1.0] * len(PAIRS)


def test_statistics():
    # Five equal positive differences: only all-plus and all-minus signs are as extreme, p = 2 / 2^5.
    assert paired_sign_flip_p(np.ones(5)) == 2 / 32
    assert paired_sign_flip_p(np.zeros(5)) == 1.0
    assert paired_sign_flip_p(np.ones(13)) == 2 / 2**13  # exact while 2^n <= n_perm (10,000)
    assert paired_sign_flip_p(np.ones(14)) == pytest.approx(1 / 10001, abs=3 / 10001)  # sampled, +1 correction
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    constant = bootstrap(np.full((10, 1), 0.25))[0]
    assert (constant.mean, constant.ci_low, constant.ci_high, constant.spread) == (0.25, 0.25, 0.25, 0.0)
    values = np.arange(20.0)[:, None]
    est = bootstrap(values, seed=1)[0]
    assert est.ci_low < est.mean == 9.5 < est.ci_high and est == bootstrap(values, seed=1)[0]
    with_nan = bootstrap(np.array([[1.0], [np.nan], [3.0]]))[0]
    assert with_nan.mean == 2.0 and with_nan.n == 2


def test_pairs_file_errors(tmp_path, model):
    good = tmp_path / "pairs.jsonl"
    good.write_text(json.dumps(vars(PAIRS[0])) + "\n\n" + json.dumps(vars(PAIRS[1])) + "\n")
    assert read_pairs(good) == PAIRS[:2]
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps(vars(PAIRS[0])) + "\n" + json.dumps({"clean": "a", "answer": "b"}) + "\n")
    with pytest.raises(BadInputError, match=r"missing.jsonl:2: missing field\(s\) counterfactual, wrong"):
        read_pairs(missing)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(BadInputError, match="broken.jsonl:1 is not valid JSON"):
        read_pairs(broken)
    with pytest.raises(BadInputError, match="does not exist"):
        read_pairs(tmp_path / "nope.jsonl")
    with pytest.raises(BadInputError, match="pair 0: clean and counterfactual tokenise to 11 and 5 tokens"):
        tokenize_pairs(model, [Pair("The cat sat", "A dog", "x", "q")])
    with pytest.raises(BadInputError, match="pair 0: answer 'xy' is 2 tokens"):
        tokenize_pairs(model, [Pair("The cat sat", "The dog ran", "xy", "q")])


def _embedded_experiment(page) -> dict:
    (experiment,) = embedded_routes(page.read_text()).values()
    return experiment


def test_cli_patch_writes_json_and_html(capsys, tmp_path, tiny_llama_folder):
    out, page = tmp_path / "sweep.json", tmp_path / "sweep.html"
    pair = PAIRS[0]
    args = ["patch", "--model", tiny_llama_folder, "--sweep", "resid_pre", "--json", out, "--html", page]
    code, stdout, _ = cli(capsys, *args, "--clean", pair.clean, "--corrupt", pair.counterfactual,
                          "--answer", pair.answer, "--wrong", pair.wrong)  # fmt: skip
    assert code == 0 and "wrote" in stdout
    data = json.loads(out.read_text())
    loaded = mr.load(str(tiny_llama_folder))
    expected = sweep(loaded, [pair], "resid_pre")
    assert data["clean"] == pytest.approx(expected.clean) and data["corrupt"] == pytest.approx(expected.corrupt)
    cell = next(r for r in data["results"] if r["site"] == "layers.1.resid_pre" and r["position"] == 4)
    assert cell["effect"] == pytest.approx(float(expected.effect[1, 4]), abs=1e-6)
    embedded = _embedded_experiment(page)
    assert embedded["kind"] == "sweep" and embedded["data"]["results"] == data["results"]  # the viewer's page

    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(vars(p)) + "\n" for p in PAIRS))
    code, _, _ = cli(capsys, "patch", "--model", tiny_llama_folder, "--pairs", pairs_file, "--sweep", "heads",
                     "--direction", "noise", "--json", out)  # fmt: skip
    data = json.loads(out.read_text())
    assert code == 0 and data["n_pairs"] == len(PAIRS) and data["direction"] == "noise"


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--sweep", "resid"], ["unknown --sweep 'resid'", "resid_pre"]),
        (["--sweep", "heads", "--direction", "sideways"], ["unknown --direction"]),
        (["--sweep", "heads", "--clean", "The cat sat", "--corrupt", "The dog ran", "--answer", "x"], ["--wrong"]),
        (["--sweep", "heads", "--pairs", "PAIRS_FILE"], ["pairs.jsonl:1: missing field(s) wrong"]),
        (
            ["--sweep", "heads", "--clean", "The cat sat", "--corrupt", "The dog ran", "--answer", "xy", "--wrong=q"],
            ["answer 'xy' is 2 tokens", "single-token"],
        ),
        (["--sweep", "heads", "--pairs", "capitals", "--metric", "accuracy"], ["unknown metric 'accuracy'"]),
    ],
)
def test_cli_patch_bad_input_is_one_line(capsys, tmp_path, tiny_llama_folder, extra, fragments):
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text(json.dumps({"clean": "a", "counterfactual": "b", "answer": "c"}) + "\n")
    out = tmp_path / "out.json"
    extra = [str(pairs_file) if x == "PAIRS_FILE" else x for x in extra]
    code, _, err = cli(capsys, "patch", "--model", tiny_llama_folder, "--json", out, *extra)
    assert_one_line_error(code, err, *fragments)
    assert list(tmp_path.iterdir()) == [pairs_file]  # nothing half-written


def test_custom_metric_callable(model):
    def answer_logit(logits, item):
        return logits[item.answer]

    result = experiment(model, PAIRS[:3], {"zero": [Zero("layers.0.mlp.out")]}, metric=answer_logit)
    assert result.metric == "answer_logit"
    for j, pair in enumerate(PAIRS[:3]):
        answer = model.tokenizer.convert_tokens_to_ids(pair.answer)
        expected = float(mr.run(model, pair.clean).logits[0][-1, answer])
        assert result.clean[j] == pytest.approx(expected, abs=1e-5)


def test_cli_experiment(capsys, tmp_path, tiny_llama_folder):
    pairs_file, components, out = tmp_path / "pairs.jsonl", tmp_path / "components.json", tmp_path / "result.json"
    pairs_file.write_text("".join(json.dumps(vars(p)) + "\n" for p in PAIRS))
    components.write_text(json.dumps({"input": [{"op": "patch", "site": "layers.0.resid_pre"}], "noop": []}))
    args = ["experiment", "--model", tiny_llama_folder, "--pairs", pairs_file, "--components", components]
    code, stdout, _ = cli(capsys, *args, "--json", out)
    assert code == 0 and "no-op exact True, full patch exact True" in stdout
    data = json.loads(out.read_text())
    effects = {c["name"]: c["effects"] for c in data["components"]}
    assert effects == {"input": [0.0] * len(PAIRS), "noop": [1.0] * len(PAIRS)}
    components.write_text(json.dumps({"bad": [{"op": "zap", "site": "embed"}]}))
    code, _, err = cli(capsys, *args, "--json", tmp_path / "other.json")
    assert_one_line_error(code, err, "unknown intervention op")
    assert not (tmp_path / "other.json").exists()


@pytest.mark.parametrize("senders", ["heads", "mlp"])
def test_cli_path_patching(capsys, tmp_path, tiny_llama_folder, senders):
    out, page = tmp_path / "path.json", tmp_path / "path.html"
    pair = PAIRS[2]
    code, stdout, _ = cli(capsys, "patch", "--model", tiny_llama_folder, "--sweep", senders, "--path-to", "logits",
                          "--clean", pair.clean, "--corrupt", pair.counterfactual, "--answer", pair.answer,
                          "--wrong", pair.wrong, "--json", out, "--html", page)  # fmt: skip
    assert code == 0
    data = json.loads(out.read_text())
    expected = path_patch(mr.load(str(tiny_llama_folder)), [pair], "logits", senders=senders)
    assert data["receivers"] == ["logits"] and len(data["results"]) == len(expected.cells)
    assert [r["effect"] for r in data["results"]] == pytest.approx(expected.effect.flatten().tolist(), abs=1e-6)
    assert _embedded_experiment(page)["data"]["receivers"] == ["logits"]
    code, _, err = cli(capsys, "patch", "--model", tiny_llama_folder, "--sweep", "resid_pre", "--path-to", "logits",
                       "--pairs", "capitals", "--json", out)  # fmt: skip
    assert_one_line_error(code, err, "--path-to needs --sweep heads or --sweep mlp")
