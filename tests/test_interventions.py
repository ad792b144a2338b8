"""Interventions as data: JSON round trip, and each one equal to an independent hand-written edit."""

import pytest
import torch

import modelrecon as mr
from modelrecon.counterfactual import (
    AddDirection,
    MeanAblate,
    Patch,
    ProjectOut,
    Scale,
    SetValue,
    Zero,
    from_json,
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
    with pytest.raises(BadInputError, match="needs the 'counterfactual' run"):
        run_with(model, "hi", [Patch("layers.1.mlp.out")])
    with pytest.raises(BadInputError, match="heads= applies to attn.heads"):
        run_with(model, "hi", [Zero("layers.1.mlp.out", heads=[0])])
    with pytest.raises(BadInputError, match="direction for 'layers.1.resid_post' has 3 values"):
        run_with(model, "hi", [AddDirection("layers.1.resid_post", direction=[1.0, 2.0, 3.0])])
    with pytest.raises(BadInputError, match="not supported yet"):
        run_with(model, "hi", [Zero("layers.1.attn.pattern")])
