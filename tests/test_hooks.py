"""The hook mechanism: batching, edits checked against exact interventions, gradients, clean-up."""

import pytest
import torch
from transformers.modeling_utils import AttentionInterface

import modelrecon as mr
from modelrecon.errors import BadInputError

from conftest import PROMPTS
from tiny import tiny_model


@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_equals_one_by_one(family_model, side):
    m = family_model
    batched = mr.run(m, PROMPTS, record=["*"], padding_side=side)
    for i, prompt in enumerate(PROMPTS):
        alone = mr.run(m, prompt, record=["*"])
        assert torch.equal(batched.tokens[i], alone.tokens[0])
        torch.testing.assert_close(batched.logits[i], alone.logits[0], rtol=1e-5, atol=1e-5)
        for site in m.site_names():
            torch.testing.assert_close(batched.acts[site][i], alone.acts[site][0], rtol=1e-5, atol=1e-5, msg=site)


def _forward_without_mlp(m, ids, skip_layer):
    """Hand-written Llama forward composed from the model's own submodules, leaving out one MLP."""
    inner = m.hf.model
    x = inner.embed_tokens(ids)
    position_ids = torch.arange(ids.shape[1])[None]
    rotary = inner.rotary_emb(x, position_ids)
    for i, layer in enumerate(inner.layers):
        x = x + layer.self_attn(layer.input_layernorm(x), position_embeddings=rotary, attention_mask=None)[0]
        if i != skip_layer:
            x = x + layer.mlp(layer.post_attention_layernorm(x))
    return m.hf.lm_head(inner.norm(x))[0]


def test_zeroing_mlp_out_equals_forward_without_that_mlp():
    m = tiny_model("llama")
    ids = m.tokenize(PROMPTS[2]).input_ids
    with torch.no_grad():
        assert torch.equal(_forward_without_mlp(m, ids, skip_layer=-1), m.hf(input_ids=ids).logits[0])  # oracle ok
        for layer in range(m.n_layers):
            edited = mr.run(m, PROMPTS[2], edit={f"layers.{layer}.mlp.out": lambda v, ctx: torch.zeros_like(v)})
            expected = _forward_without_mlp(m, ids, skip_layer=layer)
            assert torch.equal(edited.logits[0], expected)
            assert not torch.equal(edited.logits[0], m.hf(input_ids=ids).logits[0])


def test_zeroing_a_head_equals_zeroing_its_output_weights(family_model):
    m = family_model
    layer, head = 1, 2
    edited = mr.run(
        m, PROMPTS[0], edit={f"layers.{layer}.attn.heads": lambda v, ctx: v.index_fill(2, torch.tensor([head]), 0.0)}
    )
    o_proj = m.layer_module(layer, m.adapter.o_proj)
    cols = slice(head * m.d_head, (head + 1) * m.d_head)
    saved = o_proj.weight.detach().clone()
    try:
        with torch.no_grad():  # Linear stores [out, in]; GPT-2's Conv1D stores [in, out]
            (o_proj.weight[:, cols] if isinstance(o_proj, torch.nn.Linear) else o_proj.weight[cols]).zero_()
            expected = m.hf(input_ids=edited.tokens[0][None]).logits[0]
    finally:
        with torch.no_grad():
            o_proj.weight.copy_(saved)
    torch.testing.assert_close(edited.logits[0], expected, rtol=0, atol=1e-5)


def test_editing_resid_mid_equals_adding_to_attn_out(family_model):
    m = family_model
    if not m.has_resid_mid:
        pytest.skip("parallel residual: no resid_mid")
    v = torch.randn(m.d_model, generator=torch.Generator().manual_seed(0))
    via_mid = mr.run(m, PROMPTS[0], edit={"layers.1.resid_mid": lambda x, ctx: x + v}, record=["layers.1.resid_post"])
    via_attn = mr.run(m, PROMPTS[0], edit={"layers.1.attn.out": lambda x, ctx: x + v}, record=["layers.1.resid_post"])
    plain = mr.run(m, PROMPTS[0])
    assert not torch.allclose(via_mid.logits[0], plain.logits[0], atol=1e-3)
    torch.testing.assert_close(via_mid.logits[0], via_attn.logits[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(
        via_mid.acts["layers.1.resid_post"][0], via_attn.acts["layers.1.resid_post"][0], rtol=0, atol=1e-4
    )


def test_editing_resid_pre_equals_editing_previous_resid_post(family_model):
    m = family_model
    v = torch.randn(m.d_model, generator=torch.Generator().manual_seed(1))
    a = mr.run(m, PROMPTS[0], edit={"layers.1.resid_pre": lambda x, ctx: x + v})
    b = mr.run(m, PROMPTS[0], edit={"layers.0.resid_post": lambda x, ctx: x + v})
    assert torch.equal(a.logits[0], b.logits[0])


def test_identity_pattern_edit_keeps_logits_and_one_hot_pattern_copies_values():
    m = tiny_model("llama")
    plain = mr.run(m, PROMPTS[2])
    same = mr.run(m, PROMPTS[2], edit={"layers.1.attn.pattern": lambda p, ctx: p})
    torch.testing.assert_close(same.logits[0], plain.logits[0], rtol=0, atol=1e-5)

    def attend_to_first(p, ctx):
        p = p.clone()
        p[:, 3] = 0.0
        p[:, 3, :, 0] = 1.0
        return p

    result = mr.run(
        m,
        PROMPTS[2],
        edit={"layers.1.attn.pattern": attend_to_first},
        record=["layers.1.resid_pre", "layers.1.attn.heads"],
    )
    attn = m.layers[1].self_attn
    x = m.layers[1].input_layernorm(result.acts["layers.1.resid_pre"][0])
    kv_head = 3 // (m.n_heads // m.n_kv_heads)
    value_of_first = attn.v_proj(x).view(len(x), m.n_kv_heads, m.d_head)[0, kv_head]
    heads = result.acts["layers.1.attn.heads"][0]
    torch.testing.assert_close(heads[:, 3], value_of_first.expand_as(heads[:, 3]), rtol=0, atol=1e-6)


def test_a_batch_one_edit_serves_every_row_like_its_expanded_copy():
    """A pattern shared by every row (the frozen replacement model's) is used unexpanded: the same outputs as the
    pattern copied per row, for grouped-query heads too."""
    m = tiny_model("llama")
    assert m.n_kv_heads < m.n_heads
    prompts = ["hello world", "jello worms"]  # same length: the rows share one causal pattern shape
    first = mr.run(m, prompts[:1], record=["layers.1.attn.pattern"]).acts["layers.1.attn.pattern"][0]
    shared = mr.run(m, prompts, edit={"layers.1.attn.pattern": lambda p, ctx: first[None]})
    copied = mr.run(m, prompts, edit={"layers.1.attn.pattern": lambda p, ctx: first[None].expand_as(p).clone()})
    torch.testing.assert_close(shared.logits, copied.logits, rtol=0, atol=1e-5)
    assert not torch.allclose(shared.logits[1], mr.run(m, prompts[1:]).logits[0], atol=1e-3)  # the edit took


@pytest.mark.parametrize("site", ["layers.1.resid_post", "layers.1.attn.heads", "layers.1.attn.q", "layers.1.attn.v"])
def test_gradients_at_sites(family_model, site):
    m = family_model
    target = 5
    result = mr.run(m, PROMPTS[0], grad=["logits", site], grad_of=lambda logits: logits[0][-1, target])
    one_hot = torch.zeros_like(result.grads["logits"][0])
    one_hot[-1, target] = 1.0
    assert torch.equal(result.grads["logits"][0], one_hot)
    # Directional derivative by central differences through an exact edit of the same site. Reshaped sites (heads,
    # q/k/v) once lost their gradient silently: the hook sat on a view the module did not use.
    g = result.grads[site][0]
    assert g.abs().sum() > 0
    direction = torch.randn(g.shape, generator=torch.Generator().manual_seed(0))
    eps = 1e-2

    def shifted(sign):
        out = mr.run(m, PROMPTS[0], edit={site: lambda x, ctx: x + sign * eps * direction})
        return out.logits[0][-1, target].double()

    numeric = (shifted(1) - shifted(-1)) / (2 * eps)
    assert float((g * direction).sum()) == pytest.approx(float(numeric), rel=2e-2, abs=1e-3)


def test_pattern_gradients_flow():
    m = tiny_model("qwen2")
    result = mr.run(m, PROMPTS[0], grad=["layers.2.attn.pattern"], grad_of=lambda logits: logits[0][-1].logsumexp(-1))
    g = result.grads["layers.2.attn.pattern"][0]
    assert g.shape == (m.n_heads, len(result.tokens[0]), len(result.tokens[0]))
    assert g.abs().sum() > 0


def _hook_count(m):
    return sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in m.hf.modules())


def test_hooks_removed_also_when_forward_raises():
    m = tiny_model("gemma2")  # eager attention by default: the interface gets a temporary 'eager' entry
    mapping_before = dict(AttentionInterface._global_mapping)
    hooks_before = _hook_count(m)

    def boom(v, ctx):
        raise RuntimeError("edit failed")

    with pytest.raises(RuntimeError, match="edit failed"):
        mr.run(m, "hello", record=["*"], edit={"layers.2.mlp.out": boom})
    assert _hook_count(m) == hooks_before
    assert AttentionInterface._global_mapping == mapping_before
    with pytest.raises(BadInputError, match="must return a tensor of shape"):
        mr.run(m, "hello", edit={"layers.0.attn.out": lambda v, ctx: v[:, :1]})
    with pytest.raises(BadInputError, match="must return a tensor of shape"):  # batch 1 broadcasts; nothing else
        mr.run(m, ["hello", "world"], edit={"layers.0.attn.pattern": lambda v, ctx: v[:, :1]})
    assert _hook_count(m) == hooks_before


def test_positions_dtype_and_device_options():
    m = tiny_model("llama")
    full = mr.run(m, PROMPTS, record=["layers.1.resid_post", "layers.1.attn.pattern"])
    last = mr.run(
        m,
        PROMPTS,
        record=["layers.1.resid_post", "layers.1.attn.pattern"],
        positions=[0, -1],
        dtype=torch.float16,
        device="cpu",
    )
    for i in range(len(PROMPTS)):
        resid = last.acts["layers.1.resid_post"][i]
        assert resid.dtype == torch.float16 and resid.shape == (2, m.d_model)
        expected = full.acts["layers.1.resid_post"][i][[0, -1]]
        assert torch.equal(resid, expected.half())
        assert torch.equal(
            last.acts["layers.1.attn.pattern"][i], full.acts["layers.1.attn.pattern"][i][:, [0, -1]].half()
        )
    with pytest.raises(BadInputError, match="position 5 is outside a prompt of 2 tokens"):
        mr.run(m, PROMPTS, record=["logits"], positions=5)


def test_hooked_context_runs_the_plain_forward_and_edits_with_padding_info():
    m = tiny_model("phi3")
    batch = m.tokenize(PROMPTS, padding_side="left")
    seen = []

    def note(v, ctx):
        seen.append((ctx.site, ctx.layer, list(ctx.batch.lengths)))

    with mr.hooked(m, batch, record=["final"], edit={"layers.2.mlp.in": note}) as trace:
        logits = m.forward(batch)
    assert seen == [("layers.2.mlp.in", 2, [len(t) for t in map(m.encode, PROMPTS)])]
    assert len(trace.acts["final"]) == 3
    unembed = m.hf.get_output_embeddings()
    for i in range(batch.size):  # phi3 has no final softcap: logits are the unembedded final residual
        torch.testing.assert_close(logits[i, batch.real(i)], unembed(trace.acts["final"][i]), rtol=1e-5, atol=1e-5)
