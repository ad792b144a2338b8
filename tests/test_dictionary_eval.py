"""`evaluate` and `modelrecon eval-dict`: figures against hand-computed forwards and numpy formulas, perfect and zero
dictionaries, planted dead/dense latents, bad inputs."""

import json
import math

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from modelrecon.cli import dictionaries as dict_cli
from modelrecon.dictionaries import Dictionary, DictionaryConfig
from modelrecon.dictionaries.evaluate import evaluate
from modelrecon.errors import BadInputError
from modelrecon.hooks.run import run

from tiny import VOCAB, tiny_model

BOS = VOCAB["<bos>"]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def windows(seed=0, lengths=(24, 17, 24, 9)):
    """Token windows that start with BOS, of different lengths (the batches get padding)."""
    generator = torch.Generator().manual_seed(seed)
    return [[BOS, *torch.randint(3, len(VOCAB), (n - 1,), generator=generator).tolist()] for n in lengths]


def random_dictionary(kind="transcoder", layers=(0,), activation="topk", k=8, width=64, seed=0, d=32):
    sites_in = (
        tuple(f"layers.{i}.mlp.in" for i in layers) if kind != "sae" else tuple(f"layers.{i}.mlp.out" for i in layers)
    )
    sites_out = tuple(f"layers.{i}.mlp.out" for i in layers)
    config = DictionaryConfig(kind, d, d, width, activation, k, sites_in, sites_out)
    dictionary = Dictionary(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dictionary.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return dictionary


def identity_sae(site, d=32):
    """relu(x) - relu(-x) = x: a perfect SAE of width 2d."""
    dictionary = Dictionary(DictionaryConfig("sae", d, d, 2 * d, "relu", None, (site,), (site,)))
    eye = torch.eye(d)
    with torch.no_grad():
        dictionary.W_enc[0].copy_(torch.cat([eye, -eye], 1))
        dictionary.W_dec[0].copy_(torch.cat([eye, -eye], 0)[:, None])
    return dictionary


def next_token_losses(logits, clean_logits, tokens, start=1):
    """Summed CE and KL(clean || logits) of the predictions made at positions start..len-2 of one prompt."""
    logp = torch.log_softmax(logits[start:-1].double(), -1)
    clean = torch.log_softmax(clean_logits[start:-1].double(), -1)
    target = tokens[start + 1 :]
    ce = -logp.gather(-1, target[:, None]).sum()
    kl = (clean.exp() * (clean - logp)).sum()
    return float(ce), float(kl), len(target)


def test_spliced_transcoder_matches_a_hand_computed_forward(model):
    tc = random_dictionary()
    data = windows()
    report = evaluate(model, [tc], data, batch_size=3)
    (row,) = report.rows

    batch = model.batch_from_ids(data)
    clean = run(model, batch, record=["layers.0.mlp.in", "layers.0.mlp.out"])
    x = clean.acts["layers.0.mlp.in"]

    def replace(fill):
        def edit(value, ctx):
            out = value.clone()
            for i in range(ctx.batch.size):
                real = ctx.batch.real(i)
                out[i, real.start + 1 : real.stop] = fill(x[i][1:])  # position 0 (BOS) keeps its clean value
            return out

        return edit

    spliced = run(model, batch, edit={"layers.0.mlp.out": replace(lambda v: tc(v)[0])})
    ablated = run(model, batch, edit={"layers.0.mlp.out": replace(torch.zeros_like)})
    totals = np.zeros(5)
    for i in range(batch.size):
        tokens = clean.tokens[i]
        ce_clean, _, n = next_token_losses(clean.logits[i], clean.logits[i], tokens)
        ce_spliced, kl, _ = next_token_losses(spliced.logits[i], clean.logits[i], tokens)
        ce_ablated, _, _ = next_token_losses(ablated.logits[i], clean.logits[i], tokens)
        totals += [ce_clean, ce_spliced, ce_ablated, kl, n]
    ce_clean, ce_spliced, ce_ablated, kl = totals[:4] / totals[4]
    assert report.predictions == totals[4] and report.tokens == sum(len(w) - 1 for w in data)
    assert row.ce_clean == pytest.approx(ce_clean, abs=1e-5)
    assert row.ce_spliced == pytest.approx(ce_spliced, abs=1e-5)
    assert row.ce_ablated == pytest.approx(ce_ablated, abs=1e-5)
    assert row.kl == pytest.approx(kl, abs=1e-5)
    assert row.delta_loss == pytest.approx(ce_spliced - ce_clean, abs=1e-5)
    assert row.ce_recovered == pytest.approx((ce_ablated - ce_spliced) / (ce_ablated - ce_clean), abs=1e-4)
    assert abs(row.ce_spliced - row.ce_clean) > 1e-3  # the splice changed something

    # reconstruction figures against numpy formulas on the recorded activations (BOS left out)
    xs = torch.cat([v[1:] for v in x])
    y = torch.cat([v[1:] for v in clean.acts["layers.0.mlp.out"]]).double().numpy()
    pred, f = tc(xs)
    pred, f = pred.double().detach().numpy(), f.detach().numpy()
    fvu = ((y - pred) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    cosine = ((y * pred).sum(1) / np.linalg.norm(y, axis=1) / np.linalg.norm(pred, axis=1)).mean()
    fired = (f != 0).mean(0)
    assert row.fvu == pytest.approx(fvu, rel=1e-5)
    assert row.cosine == pytest.approx(cosine, abs=1e-5)
    assert row.l0 == pytest.approx((f != 0).sum(1).mean()) and row.l0 == 8
    assert row.dead == pytest.approx((fired == 0).mean()) and row.dense == pytest.approx((fired > 0.1).mean())


def test_all_layers_spliced_at_once_match_a_hand_computed_forward(model):
    """A CLT over two layers: the `all` row reads each input in the spliced pass, as a chain of hand-written edits."""
    clt = random_dictionary("clt", layers=(0, 1), activation="relu", k=None, width=16, seed=1)
    data = windows(1, (20, 13))
    report = evaluate(model, [clt], data, skip_first=False)
    assert [r.label for r in report.rows] == ["0:0 layers.0.mlp.out", "0:1 layers.1.mlp.out", "all"]
    assert math.isnan(report.rows[2].fvu) and json.loads(report.to_json())["rows"][2]["fvu"] is None

    batch = model.batch_from_ids(data)
    inputs = {}

    def read(layer):
        def edit(value, ctx):
            inputs[layer] = value

        return edit

    def write(layer):
        def edit(value, ctx):
            later = inputs[1] if layer == 1 else torch.zeros_like(inputs[0])  # layer 1's input is not known yet
            return clt(torch.stack([inputs[0], later], -2))[0][..., layer, :]

        return edit

    edits = {"layers.0.mlp.in": read(0), "layers.0.mlp.out": write(0), "layers.1.mlp.in": read(1)}
    edits["layers.1.mlp.out"] = write(1)
    clean, spliced = run(model, batch), run(model, batch, edit=edits)
    ce, n = 0.0, 0
    for i in range(batch.size):
        c, _, m = next_token_losses(spliced.logits[i], clean.logits[i], clean.tokens[i], start=0)
        ce, n = ce + c, n + m
    assert report.rows[2].ce_spliced == pytest.approx(ce / n, abs=1e-5)
    # each layer alone differs from both at once
    assert abs(report.rows[1].ce_spliced - report.rows[2].ce_spliced) > 1e-4

    # per output layer m: the CLT's prediction from the clean inputs of layers 0..1
    clean = run(model, batch, record=["layers.0.mlp.in", "layers.1.mlp.in", "layers.1.mlp.out"])
    x = torch.stack([torch.cat(clean.acts[f"layers.{i}.mlp.in"]) for i in (0, 1)], -2)
    y = torch.cat(clean.acts["layers.1.mlp.out"]).double().numpy()
    pred = clt(x)[0][:, 1].double().detach().numpy()
    assert report.rows[1].fvu == pytest.approx(((y - pred) ** 2).sum() / ((y - y.mean(0)) ** 2).sum(), rel=1e-5)


def test_perfect_and_zero_dictionaries(model):
    data = windows(2)
    perfect = [identity_sae(f"layers.{i}.mlp.out") for i in range(3)]
    report = evaluate(model, perfect, data)
    assert len(report.rows) == 4
    for row in report.rows:
        assert row.ce_recovered == pytest.approx(1.0, abs=1e-4)
        assert abs(row.kl) < 1e-6 and abs(row.delta_loss) < 1e-5
    for row in report.rows[:3]:
        assert row.fvu < 1e-10 and row.cosine == pytest.approx(1.0, abs=1e-6)
        assert row.l0 == pytest.approx(32, abs=0.5) and row.dead == 0

    zero = Dictionary(
        DictionaryConfig("transcoder", 32, 32, 8, "relu", None, ("layers.1.mlp.in",), ("layers.1.mlp.out",))
    )
    (row,) = evaluate(model, [zero], data).rows
    assert row.ce_recovered == pytest.approx(0.0, abs=1e-6) and row.ce_spliced == pytest.approx(row.ce_ablated)
    assert row.l0 == 0 and row.dead == 1 and row.fvu >= 1.0

    (mean_row,) = evaluate(model, [zero], data, ablation="mean").rows
    assert mean_row.ce_ablated != pytest.approx(row.ce_ablated, abs=1e-6)
    assert mean_row.ce_clean == pytest.approx(row.ce_clean)


def test_planted_dead_and_dense_latents(model):
    """On `embed`: latent 0 always fires, 1 never, 2 on token 'a' (half the tokens), 3 on token 'b' (5%)."""
    embedding = model.hf.get_input_embeddings().weight.detach()
    a, b, c = VOCAB["a"], VOCAB["b"], VOCAB["c"]
    sae = Dictionary(DictionaryConfig("sae", 32, 32, 4, "relu", None, ("embed",), ("embed",)))
    with torch.no_grad():
        sae.b_enc[0, 0], sae.b_enc[0, 1] = 1.0, -1.0
        for latent, token in ((2, a), (3, b)):
            direction = embedding[token] / embedding[token].norm()
            sae.W_enc[0, :, latent] = direction
            sae.b_enc[0, latent] = -0.9 * float(embedding[token].norm())
    data = [[a] * 10 + [b] + [c] * 9 for _ in range(4)]  # 50% 'a', 5% 'b'
    (row,) = evaluate(model, [sae], data, splice="none", skip_first=False).rows
    assert row.dead == 0.25 and row.dense == 0.5
    assert row.l0 == pytest.approx(1 + 0.5 + 0.05)
    assert math.isnan(row.ce_spliced)


def test_bad_inputs_are_one_line_errors(model):
    data = windows()
    cases = [
        (random_dictionary(layers=(5,)), "layers.5.mlp.in"),
        (random_dictionary(d=16), "d_in=16"),
    ]
    for dictionary, fragment in cases:
        with pytest.raises(BadInputError) as info:
            evaluate(model, [dictionary], data)
        message = str(info.value)
        assert fragment in message and "\n" not in message
    with pytest.raises(BadInputError, match="ablation"):
        evaluate(model, [random_dictionary()], data, ablation="half")
    with pytest.raises(BadInputError, match="no tokens"):
        evaluate(model, [random_dictionary()], ["too short"], context_length=64)


def test_texts_are_cut_into_windows(model):
    texts = ["The quick brown fox jumps over the lazy dog. " * 4] * 3
    report = evaluate(model, [random_dictionary()], texts, context_length=32, max_tokens=80, splice="none")
    assert report.windows == 3 and report.tokens == 80 - 3  # three windows of 32, 32, 16; first tokens skipped


def test_eval_dict_cli(model, monkeypatch, tmp_path):
    dictionaries = [random_dictionary(layers=(i,), seed=i) for i in (0, 2)]
    monkeypatch.setattr(dict_cli, "load_model", lambda name, device, dtype: model)
    monkeypatch.setattr(dict_cli, "_load_dictionaries", lambda folders: dictionaries)
    app = typer.Typer()
    app.command("eval-dict")(dict_cli.eval_dict)
    app.command("other")(lambda: None)  # two commands: typer keeps the subcommand name
    out = tmp_path / "eval.json"
    args = ["eval-dict", "--dict", str(tmp_path), "--tokens", "200", "--context-length", "32", "--no-progress"]
    result = CliRunner().invoke(app, [*args, "--json", str(out), "--markdown", str(tmp_path / "eval.md")])
    assert result.exit_code == 0, result.output
    assert "FVU" in result.output and "1:0 layers.2.mlp.out" in result.output
    report = json.loads(out.read_text())
    assert report["tokens"] > 150 and [r["label"] for r in report["rows"]][-1] == "all"
    assert report["rows"][-1]["fvu"] is None and report["rows"][0]["ce_recovered"] is not None
    assert (tmp_path / "eval.md").read_text().startswith("| row | FVU |")

    result = CliRunner().invoke(app, [*args, "--ablation", "half"])
    assert isinstance(result.exception, BadInputError) and "--ablation" in str(result.exception)
