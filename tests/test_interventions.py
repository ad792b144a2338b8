"""Interventions as data: JSON round trip, and each one equal to an independent hand-written edit."""

import pytest
import torch

import modelrecon as mr
from modelrecon.counterfactual import (
    AddDirection,
    MeanAblate,
    Patch,
    ProjectOut,
    Resample,
    Scale,
    SetValue,
    Zero,
    from_json,
    generate_with,
    resolve_positions,
    run_with,
    to_json,
)
from modelrecon.errors import BadInputError, UnknownSiteError

from conftest import PROMPTS
from tiny import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_json_round_trip_is_exact():
    interventions = [
        Zero("layers.1.mlp.out", positions="last"),
        SetValue("layers.0.mlp.neurons", positions=[0, -1], units=[3, 4], value=[1.5, -2.0]),
        MeanAblate("layers.2.resid_post", positions={"start": 1, "stop": 3}, mean=[0.5] * 4, units=[0, 1, 2, 3]),
        Scale("layers.1.attn.heads", heads=[2], factor=0.0),
        AddDirection("layers.1.resid_post", positions={"match": "o"}, direction=[0.1] * 32, coeff=4.0),
        ProjectOut("layers.2.resid_pre", direction=[1.0] + [0.0] * 31),
        Patch("layers.0.resid_pre", source="counterfactual"),
        Resample("layers.1.attn.out", positions="last", pool=["a b", "c d"], seed=3),
        Zero("layers.1.attn.pattern", heads=[0, 2], positions="last", units=[0]),
    ]
    assert from_json(to_json(interventions)) == interventions
    with pytest.raises(BadInputError, match="unknown intervention op"):
        from_json('[{"op": "explode", "site": "embed"}]')
    with pytest.raises(BadInputError, match="has no field"):
        from_json('[{"op": "zero", "site": "embed", "factor": 2}]')


def test_positions():
    texts = ["H", "e", "l", "l", "o"]
    assert resolve_positions(None, texts) == [0, 1, 2, 3, 4]
    assert resolve_positions("last", texts) == [4]
    assert resolve_positions([0, -1], texts) == [0, 4]
    assert resolve_positions({"start": 1, "stop": -1}, texts) == [1, 2, 3]
    assert resolve_positions({"match": "l"}, texts) == [2, 3]
    # In generation (2 prompt tokens here) open-ended specs reach the generated tokens, closed ones do not.
    assert resolve_positions(None, texts, n_prompt=2) == [0, 1, 2, 3, 4]
    assert resolve_positions({"start": 1}, texts, n_prompt=2) == [1, 2, 3, 4]
    assert resolve_positions({"start": 0, "stop": 2}, texts, n_prompt=2) == [0, 1]
    assert resolve_positions("last", texts, n_prompt=2) == [1]
    assert resolve_positions(-1, texts, n_prompt=2) == [1]
    with pytest.raises(BadInputError, match="position 5 is outside a prompt of 5 tokens"):
        resolve_positions(5, texts)
    with pytest.raises(BadInputError, match="no token 'z'"):
        resolve_positions({"match": "z"}, texts)


def _hand(model, prompts, site, fn, padding_side="right"):
    """The independent oracle: a hand-written edit function through the hook mechanism."""
    return mr.run(model, prompts, edit={site: fn}, padding_side=padding_side).logits


@pytest.mark.parametrize("side", ["left", "right"])
def test_zero_ablation_of_last_position_equals_hand_written(model, side):
    batch_lengths = [len(model.encode(p)) for p in PROMPTS]

    def hand(v, ctx):
        v = v.clone()
        for i, n in enumerate(batch_lengths):
            v[i, ctx.batch.starts[i] + n - 1] = 0.0
        return v

    expected = _hand(model, PROMPTS, "layers.1.mlp.out", hand, side)
    got = run_with(model, PROMPTS, [Zero("layers.1.mlp.out", positions="last")], padding_side=side).logits
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(got[0], mr.run(model, PROMPTS).logits[0])


def test_steering_and_projection_equal_hand_written(model):
    direction = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))
    steer = run_with(model, PROMPTS[0], [AddDirection("layers.1.resid_post", direction=direction.tolist(), coeff=3.0)])
    expected = _hand(model, PROMPTS[0], "layers.1.resid_post", lambda v, ctx: v + 3.0 * direction)
    assert torch.equal(steer.logits[0], expected[0])

    unit = direction / direction.norm()
    projected = run_with(
        model,
        PROMPTS[0],
        [ProjectOut("layers.1.resid_post", direction=direction.tolist())],
        record=["layers.1.resid_post"],
    )
    torch.testing.assert_close(
        projected.acts["layers.1.resid_post"][0] @ unit, torch.zeros(len(projected.tokens[0])), rtol=0, atol=1e-5
    )
    expected = _hand(model, PROMPTS[0], "layers.1.resid_post", lambda v, ctx: v - (v @ unit)[..., None] * unit)
    torch.testing.assert_close(projected.logits[0], expected[0], rtol=0, atol=1e-6)


def test_head_and_unit_selection_equal_hand_written(model):
    got = run_with(
        model,
        PROMPTS[2],
        [
            Scale("layers.2.attn.heads", heads=[1, 3], factor=0.5),
            SetValue("layers.0.mlp.neurons", units=[7], value=2.0, positions=[1]),
        ],
    )

    def heads(v, ctx):
        v = v.clone()
        v[:, :, [1, 3]] *= 0.5
        return v

    def neuron(v, ctx):
        v = v.clone()
        v[:, 1, 7] = 2.0
        return v

    expected = mr.run(model, PROMPTS[2], edit={"layers.2.attn.heads": heads, "layers.0.mlp.neurons": neuron}).logits
    assert torch.equal(got.logits[0], expected[0])


def test_patching_all_of_resid_pre_0_reproduces_the_counterfactual(model):
    clean, counterfactual = "The cat sat", "The dog ran"
    assert len(model.encode(clean)) == len(model.encode(counterfactual))
    cf = mr.run(model, counterfactual, record=["layers.0.resid_pre", "layers.1.mlp.out"])
    patched = run_with(model, clean, [Patch("layers.0.resid_pre")], sources={"counterfactual": cf.acts})
    assert torch.equal(patched.logits[0], cf.logits[0])
    # Patching one component only at one position moves the logits there and not before it.
    one = run_with(model, clean, [Patch("layers.1.mlp.out", positions=[5])], sources={"counterfactual": cf.acts})
    plain = mr.run(model, clean)
    assert torch.equal(one.logits[0][:5], plain.logits[0][:5]) and not torch.equal(
        one.logits[0][5:], plain.logits[0][5:]
    )


def test_interventions_compose_in_order(model):
    got = run_with(
        model,
        PROMPTS[0],
        [Zero("layers.1.mlp.out"), SetValue("layers.1.mlp.out", units=[0], value=1.0)],
        record=["layers.1.mlp.out"],
    )
    values = got.acts["layers.1.mlp.out"][0]
    assert torch.equal(values[:, 0], torch.ones(len(values))) and values[:, 1:].abs().max() == 0


def test_bad_interventions(model):
    with pytest.raises(UnknownSiteError, match="did you mean"):
        run_with(model, "hi", [Zero("layers.1.mlp.outt")])
    with pytest.raises(BadInputError, match="position 9 is outside a prompt of 2 tokens"):
        run_with(model, "hi", [Zero("layers.1.mlp.out", positions=9)])
    with pytest.raises(BadInputError, match="patch from the 'counterfactual' run: pass sources"):
        run_with(model, "hi", [Patch("layers.1.mlp.out")])
    with pytest.raises(BadInputError, match="position 3 is beyond the counterfactual prompt's 2 tokens"):
        run_with(model, "hill", [Patch("layers.1.mlp.out", positions=3)], sources={"counterfactual": "hi"})
    with pytest.raises(BadInputError, match="needs pool="):
        run_with(model, "hi", [Resample("layers.1.mlp.out")])
    with pytest.raises(BadInputError, match="heads= applies to attn.q, attn.k, attn.v, attn.pattern, attn.heads sites"):
        run_with(model, "hi", [Zero("layers.1.mlp.out", heads=[0])])
    with pytest.raises(BadInputError, match="direction for 'layers.1.resid_post' has 3 values"):
        run_with(model, "hi", [AddDirection("layers.1.resid_post", direction=[1.0, 2.0, 3.0])])
    with pytest.raises(BadInputError, match="max_new_tokens must be at least 1"):
        generate_with(model, "hi", max_new_tokens=0)


def test_pattern_interventions_equal_hand_written_with_left_padding(model):
    prompts = PROMPTS[:2]
    lengths = [len(model.encode(p)) for p in prompts]
    assert lengths[0] != lengths[1]

    def hand(v, ctx):  # [batch, head, q, k]
        v = v.clone()
        for i, n in enumerate(lengths):
            start = ctx.batch.starts[i]
            v[i, 1, start + n - 1, start + 0] = 0.0
            v[i, 3, start + 1, start : start + n] *= 2.0
        return v

    expected = _hand(model, prompts, "layers.1.attn.pattern", hand, "left")
    got = run_with(
        model,
        prompts,
        [
            Zero("layers.1.attn.pattern", heads=[1], positions="last", units=[0]),
            Scale("layers.1.attn.pattern", heads=[3], positions=[1], factor=2.0),
        ],
        padding_side="left",
    ).logits
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(got[0], mr.run(model, prompts[0]).logits[0])


def test_patching_patterns_from_a_counterfactual(model):
    clean, counterfactual = "The cat sat", "The dog ran"
    cf = mr.run(model, counterfactual, record=["layers.1.attn.pattern"])

    def hand(v, ctx):
        v = v.clone()
        v[0, 2] = cf.acts["layers.1.attn.pattern"][0][2]
        return v

    patch = Patch("layers.1.attn.pattern", heads=[2])
    got = run_with(model, clean, [patch], sources={"counterfactual": counterfactual})
    assert torch.equal(got.logits[0], _hand(model, clean, "layers.1.attn.pattern", hand)[0])


def test_resample_ablation_takes_a_seeded_draw_from_its_pool(model):
    pool = ["The cow ate", "A red cart!", "Big sky now"]
    site = "layers.1.mlp.out"
    per_source = [
        run_with(model, "The cat sat", [Patch(site, source="other")], sources={"other": p}).logits[0] for p in pool
    ]
    drawn = []
    for seed in range(6):
        got = run_with(model, "The cat sat", [Resample(site, pool=pool, seed=seed)]).logits[0]
        # The pool runs as one batch, so equal up to batched-matmul rounding.
        matches = [j for j, logits in enumerate(per_source) if torch.allclose(got, logits, rtol=0, atol=1e-5)]
        assert len(matches) == 1
        drawn.append(matches[0])
        again = run_with(model, "The cat sat", [Resample(site, pool=pool, seed=seed)]).logits[0]
        assert torch.equal(got, again)
    assert len(set(drawn)) > 1  # different seeds reach different pool prompts


def test_gradients_flow_through_interventions(model):
    def grad_of(logits):
        return logits[0][-1, 5]

    ivs = [Scale("layers.1.mlp.out", factor=0.5), AddDirection("layers.0.resid_post", direction=[0.3] * 32)]
    got = run_with(model, PROMPTS[0], ivs, grad=["layers.0.resid_pre"], grad_of=grad_of)
    expected = mr.run(
        model,
        PROMPTS[0],
        edit={"layers.1.mlp.out": lambda v, ctx: v * 0.5, "layers.0.resid_post": lambda v, ctx: v + 0.3},
        grad=["layers.0.resid_pre"],
        grad_of=grad_of,
    )
    assert torch.equal(got.grads["layers.0.resid_pre"][0], expected.grads["layers.0.resid_pre"][0])
    plain = mr.run(model, PROMPTS[0], grad=["layers.0.resid_pre"], grad_of=grad_of)
    assert not torch.allclose(got.grads["layers.0.resid_pre"][0], plain.grads["layers.0.resid_pre"][0])


@pytest.fixture(scope="module")
def steerable():
    """A model whose answer to steering is known by construction.

    Nothing writes to residual dimension 0 (embedding, attention and MLP outputs are zero there), so X's logit is
    exactly 0 without steering. X's unembedding is 10 * e0 and no other token reads e0, so adding a large multiple
    of e0 to the last residual stream makes X the top prediction whatever the rest of the model computes;
    subtracting it makes X the least likely.
    """
    steer_model = tiny_model("llama", seed=1, tie_word_embeddings=False)
    x = steer_model.tokenizer.convert_tokens_to_ids("X")
    hf = steer_model.hf
    with torch.no_grad():
        hf.model.embed_tokens.weight[:, 0] = 0.0
        for layer in hf.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        unembed = hf.get_output_embeddings().weight
        unembed[:, 0] = 0.0
        unembed[x] = 0.0
        unembed[x, 0] = 10.0
        hf.model.norm.weight.abs_()
    return steer_model, x


def test_steering_in_generation_moves_the_text_as_built(steerable):
    steer_model, x = steerable
    site = f"layers.{steer_model.n_layers - 1}.resid_post"
    e0 = [1.0] + [0.0] * (steer_model.d_model - 1)
    plain = generate_with(steer_model, "Hello", max_new_tokens=8)
    assert x not in plain.tokens and len(plain.tokens) == 8

    # Open-ended positions cover every generated token: the text becomes all X.
    steered = generate_with(steer_model, "Hello", [AddDirection(site, direction=e0, coeff=1000.0)], max_new_tokens=8)
    assert steered.tokens == [x] * 8
    # Steering away keeps X out even where it was forced in before.
    away = generate_with(steer_model, "HelloXX", [AddDirection(site, direction=e0, coeff=-1000.0)], max_new_tokens=8)
    assert x not in away.tokens

    # A closed spec ("last": the prompt's last token) steers the first new token only; the last layer's residual
    # reaches no later position, so the rest is the plain continuation of the prompt followed by X.
    once = generate_with(
        steer_model, "Hello", [AddDirection(site, positions="last", direction=e0, coeff=1000.0)], max_new_tokens=8
    )
    rest = generate_with(steer_model, "HelloX", max_new_tokens=7)
    assert once.tokens == [x, *rest.tokens]


def test_mean_ablation_from_a_cube(model, tmp_path):
    cube = mr.capture(model, PROMPTS, tmp_path / "m.zarr", sites=["layers.1.mlp.out"], dtype="float32", progress=False)
    iv = MeanAblate.from_cube(cube, "layers.1.mlp.out", positions="last")
    values = torch.cat(mr.run(model, PROMPTS, record=["layers.1.mlp.out"]).acts["layers.1.mlp.out"])
    torch.testing.assert_close(torch.tensor(iv.mean), values.double().mean(0).float(), rtol=0, atol=1e-5)
    got = run_with(model, PROMPTS[0], [iv], record=["layers.1.mlp.out"]).acts["layers.1.mlp.out"][0]
    torch.testing.assert_close(got[-1], torch.tensor(iv.mean), rtol=0, atol=1e-6)
    assert from_json(to_json([iv])) == [iv]
    some = MeanAblate.from_cube(cube, "layers.1.mlp.out", units=[2, 5])
    assert some.mean == pytest.approx([iv.mean[2], iv.mean[5]])
    with pytest.raises(BadInputError, match="the cube has no 'layers.0.mlp.out'"):
        MeanAblate.from_cube(cube, "layers.0.mlp.out")
