"""A few checks on the real embedded default model, SmolLM2-135M-Instruct (installed by the Makefile)."""

import pytest
import torch

import modelrecon as mr
from modelrecon.counterfactual import Pair, read_pairs, sweep, tokenize_pairs
from modelrecon.models import loading
from modelrecon.models.embedded import EMBEDDED
from modelrecon.models.model import single_token

from conftest import cli

pytestmark = pytest.mark.real_model


def test_smollm2_logits_bit_identical_with_every_site_recorded(smollm2):
    result = mr.run(smollm2, "The capital of France is", record=["*"])
    plain = smollm2.hf(input_ids=result.tokens[0][None]).logits[0]
    assert torch.equal(result.logits[0], plain)
    assert len(result.acts) == 2 + 12 * 30 + 1  # embed, final, logits and 12 kinds per layer


def _relative_error_per_token(x, y):
    return float(((x - y).norm(dim=-1) / y.norm(dim=-1)).max())


@pytest.mark.parametrize("side", ["left", "right"])
def test_smollm2_batched_padding_equals_one_by_one(smollm2, side):
    # SmolLM2's residual stream grows to norms in the thousands, so compare per token, relative to its norm:
    # different batch shapes round differently in fp32 (measured worst: 4e-6).
    prompts = ["The capital of France is", "When Mary and John went to the store, John gave a drink to"]
    batched = mr.run(smollm2, prompts, record=["layers.*.resid_post"], padding_side=side)
    for i, prompt in enumerate(prompts):
        alone = mr.run(smollm2, prompt, record=["layers.*.resid_post"])
        assert _relative_error_per_token(batched.logits[i], alone.logits[0]) < 1e-5
        for layer in range(smollm2.n_layers):
            site = f"layers.{layer}.resid_post"
            assert _relative_error_per_token(batched.acts[site][i], alone.acts[site][0]) < 1e-5, site


def test_smollm2_cache_entry_is_a_plain_hf_folder(smollm2):
    folder = loading.cache_root() / "models" / smollm2.source["gguf_sha256"][:32]
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert smollm2.source["gguf_sha256"] == loading.sha256_of(EMBEDDED["smollm2-135m"].gguf_parts())


def test_cli_run_says_paris(capsys, smollm2):
    code, out, _ = cli(capsys, "run", "The capital of France is")
    assert code == 0
    first_row = next(line for line in out.splitlines() if line.startswith("│ 1 "))
    assert "' Paris'" in first_row


def test_smollm2_gets_every_shipped_capitals_pair_right(smollm2):
    pairs = read_pairs("capitals")
    assert len(pairs) >= 30
    tokens = tokenize_pairs(smollm2, pairs)  # raises on unequal lengths or multi-token answers
    assert len({t.length for t in tokens}) == 1  # one length: position sweeps can average over all of them
    clean = mr.run(smollm2, [p.clean for p in pairs], padding_side="left", last_only=True).logits
    corrupt = mr.run(smollm2, [p.counterfactual for p in pairs], padding_side="left", last_only=True).logits
    for t, c, k in zip(tokens, clean, corrupt, strict=True):
        assert int(c[-1].argmax()) == t.answer  # the clean answer is the top prediction
        assert k[-1, t.wrong] > k[-1, t.answer]  # the counterfactual flips the preference


def test_smollm2_demo_sweep_equals_the_one_cell_loop(smollm2):
    pair = Pair("The capital of France is", "The capital of Italy is", " Paris", " Rome")
    result = sweep(smollm2, [pair], "resid_pre")
    answer, wrong = (single_token(smollm2, a) for a in (pair.answer, pair.wrong))

    def ld(logits):
        return float(logits[-1, answer] - logits[-1, wrong])

    m_clean, m_corrupt = ld(mr.run(smollm2, pair.clean).logits[0]), ld(mr.run(smollm2, pair.counterfactual).logits[0])
    sites = [f"layers.{i}.resid_pre" for i in range(smollm2.n_layers)]
    clean_acts = mr.run(smollm2, pair.clean, record=sites).acts
    worst = 0.0
    for layer, site in enumerate(sites):
        for pos in range(len(result.tokens)):

            def edit(v, ctx, site=site, pos=pos):
                v = v.clone()
                v[0, pos] = clean_acts[site][0][pos]
                return v

            value = ld(mr.run(smollm2, pair.counterfactual, edit={site: edit}).logits[0])
            worst = max(worst, abs((value - m_corrupt) / (m_clean - m_corrupt) - float(result.effect[layer, pos])))
    assert worst < 1e-5
    # The known story: the country token carries the answer until mid-depth, then it moves to the last token.
    assert float(result.effect[5, 3]) > 0.9 and float(result.effect[-1, -1]) > 0.9


def test_smollm2_attribution_on_the_demo_prompt(smollm2):
    from modelrecon.attribution.dla import direct_logit_attribution
    from modelrecon.attribution.gradients import integrated_gradients
    from modelrecon.attribution.lens import logit_lens

    prompt = "The capital of France is"
    lens = logit_lens(smollm2, prompt, target=" Paris")
    assert int(lens.target_ranks[-1, -1]) == 0  # the last row is the model's own prediction: " Paris" on top
    dla = direct_logit_attribution(smollm2, prompt, " Paris", " Rome")
    assert dla.total == pytest.approx(dla.logit, abs=1e-4) and dla.logit == pytest.approx(7.3125, abs=1e-3)
    ig = integrated_gradients(smollm2, prompt, "embed", " Paris", " Rome", baseline="The capital of Italy is", steps=16)
    assert ig.completeness["relative_error"] < 0.01  # measured 0.033% (docs/attribution.md)
    assert int(ig.per_position.abs().argmax()) == 3  # all of it on " France", the only token that differs


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_real_replacement_model_and_graph_edges(name, smollm2, gemma3):
    """On the real embedded models (Llama-like SmolLM2; Gemma 3 with its norms on each sublayer's output): the
    replacement model reproduces the logits, and doubling a feature (everything downstream frozen) moves its graph
    targets by the edge weights. Random skip transcoders are enough for both."""
    from modelrecon.circuits.attribute import attribute
    from modelrecon.circuits.replacement import ReplacementModel
    from modelrecon.dictionaries import Dictionary, DictionaryConfig

    model = smollm2 if name == "smollm2-135m" else gemma3
    generator = torch.Generator().manual_seed(0)
    transcoders = []
    for layer in range(model.n_layers):
        sites = (f"layers.{layer}.mlp.in",), (f"layers.{layer}.mlp.out",)
        d = Dictionary(DictionaryConfig("skip-transcoder", model.d_model, model.d_model, 64, "topk", 4, *sites))
        with torch.no_grad():
            for p in d.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
        transcoders.append(d)
    prompt = "The capital of France is"
    rm = ReplacementModel(model, transcoders)
    clean = rm.clean(model.encode(prompt))
    assert (rm.forward(clean) - clean.logits).abs().max() < 1e-4
    assert (rm.forward(clean, live=True) - clean.logits).abs().max() < 1e-4
    graph = attribute(model, prompt, transcoders, max_feature_nodes=24, progress=False)
    assert graph.metadata["edge_check_error"] < 1e-4  # every edge at once against one exact intervention
    logit = graph.logit_nodes()[0]
    node = graph.nodes[logit]

    def target_value(features=None):
        with torch.no_grad(), rm.linearised(clean, 1, features):
            logits = rm.target_logits(model.batch_from_ids([clean.ids]))[0]
        return float(logits[node.feature] - logits.mean())

    base = target_value()
    checked = 0
    for source, weight in graph.inputs_of(logit, top=graph.n_nodes):
        src = graph.nodes[source]
        if src.kind == "feature" and checked < 3:
            features = [f.clone()[None] for f in clean.features]
            features[src.layer][0, src.position, src.feature] *= 2
            assert target_value(features) - base == pytest.approx(weight, abs=1e-3)
            checked += 1
    assert checked >= 2
