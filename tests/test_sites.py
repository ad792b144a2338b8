"""Sites agree with independent computations, on a tiny random model of every adapter family."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import modelrecon as mr
from modelrecon.errors import UnknownSiteError

from conftest import PROMPTS
from tiny import tiny_model


def test_logits_bit_identical_with_every_site_recorded(family_model):
    m = family_model
    result = mr.run(m, PROMPTS[0], record=["*"])
    plain = m.hf(input_ids=result.tokens[0][None]).logits[0]
    assert torch.equal(result.logits[0], plain)
    assert set(result.acts) == set(m.site_names())


def test_every_site_has_its_listed_shape(family_model):
    m = family_model
    result = mr.run(m, PROMPTS[0], record=["*"])
    n = len(result.tokens[0])
    for info in m.sites():
        expected = tuple(n if d in ("pos", "q", "k") else d for d in info.shape[1:])
        assert tuple(result.acts[info.name][0].shape) == expected, info.name


def test_resid_post_equals_hf_hidden_states(family_model):
    m = family_model
    result = mr.run(m, PROMPTS[2], record=["layers.*.resid_post", "embed", "final"])
    hidden = m.hf(input_ids=result.tokens[0][None], output_hidden_states=True).hidden_states
    # transformers' hidden_states[i+1] is layer i's output, except the last, which it returns after the final norm.
    for i in range(m.n_layers - 1):
        assert torch.equal(result.acts[f"layers.{i}.resid_post"][0], hidden[i + 1][0])
    assert torch.equal(result.acts["final"][0], hidden[-1][0])


def test_residual_stream_adds_up(family_model):
    m = family_model
    acts = mr.run(m, PROMPTS[2], record=["layers.*"]).acts
    for i in range(m.n_layers):
        a = {k: acts[f"layers.{i}.{k}"][0] for k in ("resid_pre", "attn.out", "mlp.out", "resid_post")}
        torch.testing.assert_close(a["resid_pre"] + a["attn.out"] + a["mlp.out"], a["resid_post"], rtol=0, atol=1e-5)
        if m.has_resid_mid:
            torch.testing.assert_close(
                a["resid_pre"] + a["attn.out"], acts[f"layers.{i}.resid_mid"][0], rtol=0, atol=1e-5
            )
        if i > 0:
            assert torch.equal(acts[f"layers.{i - 1}.resid_post"][0], a["resid_pre"])


def _output_weight_per_head(o_proj, n_heads, d_head):
    """[head, d_head, d_model] from nn.Linear ([out, in]) or GPT-2's Conv1D ([in, out])."""
    w = o_proj.weight.T if isinstance(o_proj, torch.nn.Linear) else o_proj.weight
    return w.reshape(n_heads, d_head, -1)


def test_heads_projected_through_output_matrix_sum_to_attn_out(family_model):
    m = family_model
    acts = mr.run(m, PROMPTS[0], record=["layers.*.attn.heads", "layers.*.attn.out"]).acts
    for i in range(m.n_layers):
        o_proj = m.layer_module(i, m.adapter.o_proj)
        w_o = _output_weight_per_head(o_proj, m.n_heads, m.d_head)
        heads = acts[f"layers.{i}.attn.heads"][0]  # [pos, head, d_head]
        per_head = torch.einsum("phd,hdm->phm", heads.double(), w_o.double())
        total = per_head.sum(1) + (o_proj.bias.double() if o_proj.bias is not None else 0)
        after = m.layer_module(i, m.adapter.attn_out)
        if after is not m.layer_module(i, m.adapter.attn):  # Gemma 2/3 normalise; Phi-3/NeoX apply (eval) dropout
            total = after(total.float()).double()
        torch.testing.assert_close(total.float(), acts[f"layers.{i}.attn.out"][0], rtol=0, atol=1e-4)


def test_values_weighted_by_the_pattern_give_the_head_outputs(family_model):
    """attn.v and attn.pattern, read independently, multiply to attn.heads (each head reads its key-value group)."""
    m = family_model
    acts = mr.run(m, PROMPTS[0], record=["layers.*.attn.v", "layers.*.attn.pattern", "layers.*.attn.heads"]).acts
    group = m.n_heads // m.n_kv_heads
    for i in range(m.n_layers):
        v = acts[f"layers.{i}.attn.v"][0]  # [pos, kv_head, d_head]
        pattern = acts[f"layers.{i}.attn.pattern"][0]  # [head, q, k]
        expected = torch.einsum("hqk,khd->qhd", pattern, v.repeat_interleave(group, dim=1))
        torch.testing.assert_close(acts[f"layers.{i}.attn.heads"][0], expected, rtol=0, atol=1e-5)


def _projection_rows(m, layer, part, head):
    """The projection module and the output features that make head `head` of q (0), k (1) or v (2)."""
    layout, d = m.adapter.qkv_layout, m.d_head
    if layout == "separate":
        return m.layer_module(layer, m.adapter.qkv[part]), slice(head * d, (head + 1) * d)
    if layout == "concat":
        offset = [0, m.n_heads * d, (m.n_heads + m.n_kv_heads) * d][part]
        return m.layer_module(layer, m.adapter.qkv[0]), slice(offset + head * d, offset + (head + 1) * d)
    start = head * 3 * d + part * d  # GPT-NeoX: per head, q | k | v
    return m.layer_module(layer, m.adapter.qkv[0]), slice(start, start + d)


@pytest.mark.parametrize("part", [0, 1, 2])
def test_zeroing_a_query_key_or_value_head_equals_zeroing_its_projection_rows(family_model, part):
    m = family_model
    kind = "attn." + "qkv"[part]
    site, head = f"layers.1.{kind}", 1

    def zero_head(v, ctx):
        v = v.clone()
        v[:, :, head] = 0.0
        return v

    edited = mr.run(m, PROMPTS[2], edit={site: zero_head}).logits[0]
    module, rows = _projection_rows(m, 1, part, head)
    weight = module.weight
    saved = weight.detach().clone(), None if module.bias is None else module.bias.detach().clone()
    try:
        with torch.no_grad():
            if type(module).__name__ == "Conv1D":  # GPT-2 stores [in, out]
                weight[:, rows] = 0.0
            else:
                weight[rows] = 0.0
            if module.bias is not None:
                module.bias[rows] = 0.0
        expected = mr.run(m, PROMPTS[2]).logits[0]
    finally:
        with torch.no_grad():
            weight.copy_(saved[0])
            if saved[1] is not None:
                module.bias.copy_(saved[1])
    torch.testing.assert_close(edited, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(edited, mr.run(m, PROMPTS[2]).logits[0])


def test_attention_pattern_rows_sum_to_one_and_equal_eager_weights(family_model):
    m = family_model
    batch = m.tokenize(PROMPTS, padding_side="left")
    result = mr.run(m, batch, record=["layers.*.attn.pattern"])
    eager = AutoModelForCausalLM.from_config(m.hf.config, attn_implementation="eager").eval()
    eager.load_state_dict(m.hf.state_dict())
    attentions = eager(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        output_attentions=True,
    ).attentions
    for i in range(m.n_layers):
        for b in range(batch.size):
            pattern = result.acts[f"layers.{i}.attn.pattern"][b]
            real = batch.real(b)
            torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:2]), rtol=0, atol=1e-5)
            torch.testing.assert_close(pattern, attentions[i][b, :, real, real], rtol=0, atol=1e-5)


def test_sliding_window_shows_in_pattern():
    m = tiny_model("mistral")  # sliding window 5
    pattern = mr.run(m, PROMPTS[2], record=["layers.0.attn.pattern"]).acts["layers.0.attn.pattern"][0]
    q = torch.arange(pattern.shape[-1])
    outside = (q[:, None] - q[None, :] >= 5) | (q[None, :] > q[:, None])
    assert pattern[:, outside].abs().max() == 0
    assert pattern[:, ~outside].min() > 0


def test_sites_listing_and_globs(family_model):
    m = family_model
    assert m.resolve_sites("layers.*.resid_post") == [f"layers.{i}.resid_post" for i in range(m.n_layers)]
    assert m.resolve_sites(["logits", "embed"]) == ["embed", "logits"]  # model order
    assert ("layers.0.resid_mid" in m.site_names()) == m.has_resid_mid


def test_unknown_site_suggests_nearest_names(family_model):
    with pytest.raises(UnknownSiteError, match="did you mean layers.1.resid_post"):
        family_model.resolve_sites("layers.1.resid_psot")
    with pytest.raises(UnknownSiteError, match="unknown site 'layers.99.mlp.out'"):
        mr.run(family_model, "hi", record=["layers.99.mlp.out"])
