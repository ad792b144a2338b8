"""Training dictionaries: every architecture learns, the sources are seeded and resumable, the CLI trains and
evaluates."""

import json

import pytest
import torch

from modelrecon.corpus import read_texts, token_stream
from modelrecon.dictionaries import Dictionary, DictionaryConfig, TrainOptions, load_dictionaries, train
from modelrecon.dictionaries.sources import StreamSource
from modelrecon.dictionaries.train import dictionary_loss, site_pairs
from modelrecon.errors import BadInputError

from conftest import assert_one_line_error, cli
from tiny import tiny_model

ARCHITECTURES = [
    ("sae", "topk", "layers.1.resid_post"),
    ("sae", "batchtopk", "layers.1.resid_post"),
    ("sae", "jumprelu", "layers.1.resid_post"),
    ("sae", "relu", "layers.1.resid_post"),
    ("transcoder", "topk", "layers.1.mlp"),
    ("skip-transcoder", "topk", "layers.1.mlp"),
    ("clt", "topk", "layers.*.mlp"),
]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _source(model, pairs, batch_size=128, seed=0, reuse=1):
    def windows():
        return token_stream(read_texts("sample"), model.tokenizer, 64)

    return StreamSource(model, windows, [p[0] for p in pairs], [p[1] for p in pairs], batch_size, seed=seed,
                        buffer_bytes=2**20, reuse=reuse)  # fmt: skip


def _configs(model, kind, activation, pairs):
    groups = [pairs] if kind == "clt" else [[p] for p in pairs]
    d_in, d_out = model.site_shape(pairs[0][0])[-1], model.site_shape(pairs[0][1])[-1]
    return [DictionaryConfig(kind, d_in, d_out, 64, activation, 4, tuple(p[0] for p in g), tuple(p[1] for p in g))
            for g in groups]  # fmt: skip


@pytest.mark.parametrize("kind,activation,site", ARCHITECTURES)
def test_every_architecture_trains_below_its_initial_loss(model, kind, activation, site):
    pairs = site_pairs(model, kind, site)
    configs = _configs(model, kind, activation, pairs)
    options = TrainOptions(tokens=128 * 60, batch_size=128, lr=3e-3, l1=1e-3, l0=1e-3, seed=0)
    held_out = next(_source(model, pairs, batch_size=512, seed=7))
    initial = Dictionary(configs[0])
    initial.initialise(*next(_source(model, pairs)), seed=0)  # what training starts from (same seed, same batch)
    trained = train(_source(model, pairs), configs, options, progress=False)[0]
    dead = torch.zeros(configs[0].n_layers, 64, dtype=torch.bool)
    before = dictionary_loss(initial, *held_out, options, dead)[1]
    after = dictionary_loss(trained, *held_out, options, dead)[1]
    assert after["fvu"] < 0.8 * before["fvu"], (before, after)
    if activation == "topk":
        assert 3 <= after["l0"] <= 4  # at most k (fewer where under k pre-activations are positive)
    if activation == "batchtopk":  # the inference threshold keeps about k active on average
        with torch.no_grad():
            l0 = (trained.encode(held_out[0]) > 0).sum(-1).float().mean()
        assert 1 <= float(l0) <= 12


def _run(model, steps, checkpoint, stop_after=None):
    """Train a transcoder; with `stop_after`, the source dies after that many batches (a kill)."""
    pairs = site_pairs(model, "transcoder", "layers.1.mlp")
    source = _source(model, pairs)
    if stop_after is not None:
        inner, count = source, [0]

        class Dying:
            def __next__(self):
                count[0] += 1
                if count[0] > stop_after:
                    raise KeyboardInterrupt
                return next(inner)

            def state(self):
                return inner.state()

            def restore(self, *args):
                inner.restore(*args)

        source = Dying()
    options = TrainOptions(tokens=128 * steps, batch_size=128, lr=3e-3, seed=0, checkpoint_every=3)
    return train(source, _configs(model, "transcoder", "topk", pairs), options, checkpoint=checkpoint, progress=False)


def test_kill_and_resume_gives_the_uninterrupted_weights(model, tmp_path):
    (straight,) = _run(model, 10, tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        _run(model, 10, tmp_path / "b", stop_after=7)  # checkpoints at steps 3 and 6, killed during step 8
    assert json.loads((tmp_path / "b" / "state.json").read_text())["step"] == 6
    (resumed,) = _run(model, 10, tmp_path / "b")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    (other_seed,) = train(_source(model, site_pairs(model, "transcoder", "layers.1.mlp"), seed=1),
                          _configs(model, "transcoder", "topk", site_pairs(model, "transcoder", "layers.1.mlp")),
                          TrainOptions(tokens=1280, batch_size=128, lr=3e-3, seed=1), progress=False)  # fmt: skip
    assert not torch.equal(other_seed.W_enc, straight.W_enc)


def test_cli_trains_and_evaluates(capsys, tmp_path, tiny_llama_folder):
    out = tmp_path / "tc"
    code, stdout, _ = cli(capsys, "train", "--model", tiny_llama_folder, "--kind", "transcoder", "--site",
                          "layers.*.mlp", "--width", "32", "--k", "4", "--tokens", "8192", "--batch-size", "256",
                          "--lr", "0.003", "--context-length", "64", "--out", out)  # fmt: skip
    assert code == 0 and "wrote 3 dictionaries" in stdout
    dictionaries = load_dictionaries(out)
    assert [d.config.input_sites for d in dictionaries] == [(f"layers.{i}.mlp.in",) for i in range(3)]
    assert dictionaries[0].config.provenance["tokens"] == 8192
    assert not (tmp_path / ".tc.checkpoint").exists()  # removed once the result is written
    report = tmp_path / "eval.json"
    code, stdout, _ = cli(capsys, "eval-dict", "--model", tiny_llama_folder, "--dict", out, "--tokens", "1024",
                          "--context-length", "64", "--json", report, "--no-progress")  # fmt: skip
    assert code == 0
    rows = json.loads(report.read_text())["rows"]
    assert [r["label"] for r in rows] == [f"{i}:0 layers.{i}.mlp.out" for i in range(3)] + ["all"]
    assert all(0 < r["l0"] <= 4 and r["ce_spliced"] > 0 for r in rows[:3])  # learning itself is tested above
    code, _, err = cli(capsys, "train", "--model", tiny_llama_folder, "--kind", "transcoder", "--site",
                       "layers.0.resid_post", "--out", tmp_path / "bad")  # fmt: skip
    assert_one_line_error(code, err, "reads an MLP")
    assert not (tmp_path / "bad").exists()


def test_bf16_autocast_trains_fp32_weights_to_about_the_same_loss(model):
    pairs = site_pairs(model, "transcoder", "layers.1.mlp")
    runs = {}
    for bf16 in (False, True):
        options = TrainOptions(tokens=128 * 40, batch_size=128, lr=3e-3, seed=0, bf16=bf16)
        (trained,) = train(_source(model, pairs), _configs(model, "transcoder", "topk", pairs), options, progress=False)
        x, y = next(_source(model, pairs, batch_size=512, seed=5))
        with torch.no_grad():
            runs[bf16] = (trained, dictionary_loss(trained, x, y, options, torch.zeros(1, 64, dtype=torch.bool))[1])
    assert runs[True][0].W_enc.dtype == torch.float32  # autocast leaves the master weights in fp32
    assert not torch.equal(runs[True][0].W_enc, runs[False][0].W_enc)  # the matmuls did run in bf16
    assert runs[True][1]["fvu"] < 1.15 * runs[False][1]["fvu"]


@pytest.mark.parametrize("kind,layers", [("transcoder", 1), ("skip-transcoder", 1), ("clt", 3), ("sae", 1)])
def test_topk_training_decode_gathers_what_the_dense_decode_multiplies(kind, layers):
    """Training decodes TopK latents by gathering the k active decoder rows; outputs and every parameter's gradient
    must equal the dense product with the scattered latents (float64, random weights and scales)."""
    inputs = tuple(f"layers.{i}.mlp.in" for i in range(layers))
    outputs = inputs if kind == "sae" else tuple(f"layers.{i}.mlp.out" for i in range(layers))
    d = Dictionary(DictionaryConfig(kind, 8, 8, 32, "topk", 4, inputs, outputs), dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in d.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))
        d.input_scale.fill_(1.3)
        d.output_scale.copy_(torch.linspace(0.5, 0.9, layers))
    x = torch.randn(6, layers, 8, generator=generator, dtype=torch.float64)
    params = [p for p in d.parameters()]
    pre = d.pre_activations(x)
    top = d.top_latents(pre)
    gathered = d.decode_top(top.indices, top.values, x)
    dense = d.decode(d.activate(pre), x)
    assert torch.allclose(gathered, dense, atol=1e-12)
    grads = [torch.autograd.grad(y.pow(3).sum(), params, retain_graph=True, allow_unused=True)
             for y in (gathered, dense)]  # fmt: skip
    for name, a, b in zip([n for n, _ in d.named_parameters()], *grads, strict=True):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-9)), name
    # AuxK's revived latents: the latents' sum alone (no bias, no skip path) in normalised units
    f = d.activate(pre)
    expected = d.decode(f, torch.zeros_like(x)) - d.decode(torch.zeros_like(f), torch.zeros_like(x))
    assert torch.allclose(d.latent_sum(top.indices, top.values), expected * d.output_scale[:, None], atol=1e-12)
    assert torch.allclose(d.latent_product(f), expected * d.output_scale[:, None], atol=1e-12)


def test_reuse_serves_each_streamed_token_that_many_times_from_fewer_forward_passes(model):
    pairs = site_pairs(model, "transcoder", "layers.1.mlp")

    class Tagged(StreamSource):  # each new token's first input feature replaced by its serial number
        made = 0

        def _activations(self):
            x, y = super()._activations()
            x[:, 0, 0] = torch.arange(self.made, self.made + len(x), dtype=x.dtype)
            self.made += len(x)
            return x, y

    counts, made = {}, {}
    for reuse in (1, 2):
        source = _source(model, pairs, reuse=reuse)
        source.__class__ = Tagged
        served = torch.cat([next(source)[0][:, 0, 0] for _ in range(40)])
        _, counts[reuse] = served.unique(return_counts=True)
        made[reuse] = source.made
    assert counts[1].max() == 1
    assert counts[2].max() == 2 and (counts[2] == 2).float().mean() > 0.5  # most served twice so far, none more
    assert made[2] < 0.7 * made[1]  # the model ran on about half the tokens
    with pytest.raises(BadInputError, match="reuse must be at least 1"):
        _source(model, pairs, reuse=0)


def test_default_recipe_trains_in_fp32_where_bf16_is_emulated_and_caches_the_builds_apart(monkeypatch):
    from modelrecon.dictionaries import defaults

    class Named:  # the recipe and its cache key read only the model's name and weights' hash
        name = "smollm2-135m"

        def weights_sha256(self):
            return "0" * 64

    chosen = {}
    for fast in (True, False):
        monkeypatch.setattr(defaults, "bf16_is_fast", lambda fast=fast: fast)
        chosen[fast] = (defaults._recipe(Named())["options"], defaults.default_transcoders_folder(Named()))
    assert chosen[True][0].bf16 and not chosen[False][0].bf16
    assert chosen[True][1] != chosen[False][1]


class _Batches:
    """Fixed batches `(x, y)` `[batch, layer, d]` from memory, optionally one layer's (a source for `train`)."""

    def __init__(self, batches, layer=None):
        self.batches, self.layer, self.at = batches, layer, 0

    def __next__(self):
        x, y = self.batches[self.at % len(self.batches)]
        self.at += 1
        return (x, y) if self.layer is None else (x[:, self.layer : self.layer + 1], y[:, self.layer : self.layer + 1])

    def state(self):
        return {"at": self.at}, {}

    def restore(self, meta, tensors):
        self.at = meta["at"]


@pytest.mark.parametrize("kind,activation", [("skip-transcoder", "topk"), ("transcoder", "batchtopk"),
                                             ("sae", "jumprelu"), ("sae", "relu")])  # fmt: skip
def test_stacked_training_equals_training_each_layer_alone(kind, activation):
    """Several layers' dictionaries train as one stack (batched products over layers); each layer ends exactly where
    training it alone ends (same seed, fp32), AuxK's dead latents included (each layer its own count)."""
    layers, d, width = 3, 16, 32
    generator = torch.Generator().manual_seed(0)
    mix = torch.randn(layers, d, d, generator=generator)
    batches = []
    for _ in range(5):
        x = torch.randn(64, layers, d, generator=generator) * torch.tensor([1.0, 3.0, 0.5])[:, None]
        batches.append((x, x if kind == "sae" else torch.relu(torch.einsum("bld,lde->ble", x, mix))))
    sites = [f"layers.{i}.{'resid_post' if kind == 'sae' else 'mlp.in'}" for i in range(layers)]
    outputs = sites if kind == "sae" else [s.replace(".in", ".out") for s in sites]
    pairs = zip(sites, outputs, strict=True)
    configs = [DictionaryConfig(kind, d, d, width, activation, 4, (i,), (o,)) for i, o in pairs]
    options = TrainOptions(tokens=64 * 30, batch_size=64, lr=3e-3, seed=3, dead_after_tokens=64 * 3, aux_k=6)
    together = train(_Batches(batches), configs, options, progress=False)
    for layer, config in enumerate(configs):
        alone = train(_Batches(batches, layer), [config], options, progress=False)[0]
        assert together[layer].config == config
        for name, value in alone.state_dict().items():
            torch.testing.assert_close(together[layer].state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_stacked_dictionary_round_trips_and_decodes_like_its_layers():
    configs = [DictionaryConfig("skip-transcoder", 8, 8, 16, "topk", 3, (f"layers.{i}.mlp.in",),
                                (f"layers.{i}.mlp.out",)) for i in range(3)]  # fmt: skip
    dictionaries = [Dictionary(c) for c in configs]
    for i, d in enumerate(dictionaries):
        d.initialise(torch.randn(32, 1, 8), torch.randn(32, 1, 8), seed=i)
        with torch.no_grad():
            d.W_skip.normal_()
    stack = Dictionary.stack(dictionaries)
    x = torch.randn(5, 3, 8)
    expected = torch.stack([d(x[:, i])[0] for i, d in enumerate(dictionaries)], 1)
    torch.testing.assert_close(stack(x)[0], expected)
    top = stack.top_latents(stack.pre_activations(x))
    torch.testing.assert_close(stack.decode_top(top.indices, top.values, x), expected)
    for back, original in zip(stack.unstack(), dictionaries, strict=True):
        assert back.config == original.config
        for name, value in original.state_dict().items():
            assert torch.equal(back.state_dict()[name], value), name
    with pytest.raises(BadInputError, match="unstack"):
        stack.config.to_dict()
