"""Dictionary files: modelrecon's own folder, SAELens and circuit-tracer round trips, malformed input, atomic writes."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelrecon.dictionaries import formats
from modelrecon.dictionaries.formats import (
    export_circuit_tracer,
    export_saelens,
    import_circuit_tracer,
    import_saelens,
    load_dictionaries,
    load_dictionary,
    save_dictionaries,
    save_dictionary,
)
from modelrecon.dictionaries.model import ACTIVATIONS, KINDS, Dictionary, DictionaryConfig
from modelrecon.errors import BadInputError

D, WIDTH = 12, 32


def make(kind: str, activation: str, layer: int = 0, n_layers: int = 1, seed: int = 0) -> Dictionary:
    """A small random dictionary: `initialise` (normalisation scales not 1), then noise on everything."""
    suffix_in, suffix_out = ("resid_post", "resid_post") if kind == "sae" else ("mlp.in", "mlp.out")
    layers = range(layer, layer + (n_layers if kind == "clt" else 1))
    config = DictionaryConfig(
        kind=kind, d_in=D, d_out=D, width=WIDTH, activation=activation,
        k=5 if activation in ("topk", "batchtopk") else None,
        input_sites=tuple(f"layers.{i}.{suffix_in}" for i in layers),
        output_sites=tuple(f"layers.{i}.{suffix_out}" for i in layers),
        provenance={"model": "tiny", "seed": seed, "tokens": 1000, "corpus": {"name": "sample"}},
    )  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    dictionary = Dictionary(config)
    n = config.n_layers
    x = 3 * torch.randn(128, n, D, generator=generator) + 1
    y = x if kind == "sae" else 2 * torch.randn(128, n, D, generator=generator)
    dictionary.initialise(x, y, seed)
    with torch.no_grad():
        for parameter in dictionary.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
        dictionary.threshold.copy_(0.3 * torch.rand(dictionary.threshold.shape, generator=generator))
    return dictionary.eval()


def inputs(dictionary: Dictionary, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    n = dictionary.config.n_layers
    shape = (40, n, D) if n > 1 else (40, D)
    return 3 * torch.randn(shape, generator=generator) + 1


def assert_same_outputs(original: Dictionary, loaded: Dictionary, atol: float = 1e-6) -> None:
    """encode / decode / forward of the loaded dictionary equal the original's (on raw activations)."""
    x = inputs(original)
    with torch.no_grad():
        f_ref, f = original.encode(x), loaded.encode(x)
        torch.testing.assert_close(f, f_ref, atol=atol, rtol=0)
        torch.testing.assert_close(loaded.decode(f_ref, x), original.decode(f_ref, x), atol=atol, rtol=1e-6)
        (y_ref, _), (y, _) = original(x), loaded(x)
        torch.testing.assert_close(y, y_ref, atol=atol, rtol=1e-6)


COMBINATIONS = [(kind, act) for kind in KINDS for act in ACTIVATIONS]
SAELENS_OK = [(k, a) for k, a in COMBINATIONS if k != "clt" and (k == "sae" or a != "topk")]
CIRCUIT_TRACER_OK = [(k, a) for k, a in COMBINATIONS if k != "sae" and a != "topk"]


# --- modelrecon's own folder -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,activation", COMBINATIONS)
def test_own_round_trip(tmp_path, kind, activation):
    original = make(kind, activation, n_layers=3)
    save_dictionary(original, tmp_path / "d")
    loaded = load_dictionary(tmp_path / "d")
    assert loaded.config == original.config
    assert float(loaded.input_scale.min()) == float(loaded.output_scale.max()) == 1.0
    assert_same_outputs(original.fold_normalisation(), loaded, atol=0)  # the folded weights, bit for bit
    assert_same_outputs(original, loaded, atol=1e-5)  # and the dictionary with its scales, up to rounding


def test_own_config_has_provenance_and_format(tmp_path):
    original = make("transcoder", "jumprelu")
    save_dictionary(original, tmp_path / "d")
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["format"] == "modelrecon-dictionary" and config["format_version"] == 1
    assert config["provenance"]["corpus"] == {"name": "sample"} and config["dtype"] == "float32"
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["config.json", "dictionary.safetensors"]
    assert "input_scale" not in load_file(tmp_path / "d" / "dictionary.safetensors")


def test_own_float64_round_trip(tmp_path):
    original = make("sae", "topk").double()
    save_dictionary(original, tmp_path / "d")
    loaded = load_dictionary(tmp_path / "d")
    assert loaded.W_enc.dtype == torch.float64
    x = inputs(original).double()
    torch.testing.assert_close(loaded(x)[0], original.fold_normalisation()(x)[0], atol=0, rtol=0)


def test_set_round_trip(tmp_path):
    originals = [make("transcoder", "relu", layer=i, seed=i) for i in range(3)] + [make("sae", "topk", layer=5)]
    save_dictionaries(originals, tmp_path / "set")
    loaded = load_dictionaries(tmp_path / "set")
    assert [d.config for d in loaded] == [d.config for d in originals]
    for original, back in zip(originals, loaded, strict=True):
        assert_same_outputs(original.fold_normalisation(), back, atol=0)
    with pytest.raises(BadInputError, match="load_dictionaries"):
        load_dictionary(tmp_path / "set")
    save_dictionary(originals[0], tmp_path / "one")
    assert [d.config for d in load_dictionaries(tmp_path / "one")] == [originals[0].config]


def test_save_replaces_own_folder_but_not_others(tmp_path):
    save_dictionary(make("sae", "relu"), tmp_path / "d")
    save_dictionary(make("sae", "jumprelu"), tmp_path / "d")
    assert load_dictionary(tmp_path / "d").config.activation == "jumprelu"
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(BadInputError, match="does not hold"):
        save_dictionary(make("sae", "relu"), other)
    assert (other / "notes.txt").read_text() == "keep me"


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(formats, "save_file", fail)
    for write, target in (
        (lambda p: save_dictionary(make("sae", "relu"), p), tmp_path / "own"),
        (lambda p: save_dictionaries([make("sae", "relu")], p), tmp_path / "set"),
        (lambda p: export_saelens(make("sae", "relu"), p), tmp_path / "saelens"),
        (lambda p: export_circuit_tracer([make("transcoder", "relu")], p), tmp_path / "ct"),
    ):
        with pytest.raises(BadInputError, match="cannot write"):
            write(target)
        assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left either


def test_failed_overwrite_keeps_old_folder(tmp_path, monkeypatch):
    save_dictionary(make("sae", "relu"), tmp_path / "d")
    monkeypatch.setattr(formats, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(BadInputError):
        save_dictionary(make("sae", "jumprelu"), tmp_path / "d")
    assert load_dictionary(tmp_path / "d").config.activation == "relu"
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_sae_with_different_scales_is_refused(tmp_path):
    sae = make("sae", "relu")
    with torch.no_grad():
        sae.output_scale.mul_(2)
    with pytest.raises(BadInputError, match="scales"):
        save_dictionary(sae, tmp_path / "d")


@pytest.fixture
def saved(tmp_path):
    save_dictionary(make("transcoder", "jumprelu"), tmp_path / "d")
    return tmp_path / "d"


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda f: (f / "dictionary.safetensors").unlink(), "missing"),
        (lambda f: (f / "config.json").unlink(), "no config.json"),
        (lambda f: (f / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda f: (f / "config.json").write_text("[1, 2]"), "JSON object"),
        (lambda f: edit_config(f, kind="crosscoder"), "unknown dictionary kind"),
        (lambda f: edit_config(f, activation="gelu"), "unknown activation"),
        (lambda f: edit_config(f, width="32"), "positive integer"),
        (lambda f: edit_config(f, format_version=99), "upgrade modelrecon"),
        (lambda f: edit_config(f, format="something-else"), "not a modelrecon dictionary"),
        (lambda f: edit_config(f, dtype="int8"), "dtype"),
        (lambda f: edit_config(f, surprise=1), "unknown fields"),
        (lambda f: edit_config(f, width=16), "sha256|shape"),
        (lambda f: (f / "dictionary.safetensors").write_bytes(b"garbage"), "sha256"),
    ],
)
def test_malformed_own_folder(saved, damage, message):
    damage(saved)
    with pytest.raises(BadInputError, match=message):
        load_dictionary(saved)


def test_wrong_shape_in_safetensors(saved):
    weights = saved / "dictionary.safetensors"
    tensors = load_file(weights)
    tensors["b_enc"] = torch.zeros(1, WIDTH + 1)
    save_file(tensors, weights)
    edit_config(saved, weights_sha256=None)  # an edited file without a checksum: the shape check catches it
    with pytest.raises(BadInputError, match="shape"):
        load_dictionary(saved)
    (saved / "dictionary.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(BadInputError, match="safetensors|lacks"):
        load_dictionary(saved)


def test_load_hints_at_other_formats(tmp_path):
    export_saelens(make("sae", "relu"), tmp_path / "s")
    with pytest.raises(BadInputError, match="import_saelens"):
        load_dictionary(tmp_path / "s")
    export_circuit_tracer([make("transcoder", "relu")], tmp_path / "c")
    with pytest.raises(BadInputError, match="import_circuit_tracer"):
        load_dictionary(tmp_path / "c")


def test_one_loader_reads_every_folder_layout(tmp_path):
    from modelrecon.dictionaries.defaults import transcoders_by_name
    from modelrecon.dictionaries.hub import open_dictionaries

    single, per_layer = make("sae", "relu"), [make("transcoder", "jumprelu", layer=i, seed=i) for i in range(2)]
    save_dictionary(single, tmp_path / "own")
    save_dictionaries(per_layer, tmp_path / "own-set")
    export_saelens(single, tmp_path / "saelens")
    export_circuit_tracer(per_layer, tmp_path / "circuit-tracer")
    for name, originals in [("own", [single]), ("own-set", per_layer), ("saelens", [single]),
                            ("circuit-tracer", per_layer)]:  # fmt: skip
        loaded = load_dictionaries(tmp_path / name)
        assert [d.config for d in loaded] == [d.config for d in originals], name
        for original, back in zip(originals, loaded, strict=True):
            assert_same_outputs(original.fold_normalisation(), back)
        # what `--dict` (eval-dict) and `--transcoders` (trace, explain) read: the same dictionaries
        for reader in (open_dictionaries, lambda folder: transcoders_by_name(None, str(folder))):
            assert [d.config for d in reader(tmp_path / name)] == [d.config for d in loaded], name


# --- SAELens -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,activation", SAELENS_OK)
def test_saelens_round_trip(tmp_path, kind, activation):
    original = make(kind, activation, layer=3)
    export_saelens(original, tmp_path / "s")
    loaded = import_saelens(tmp_path / "s")
    assert loaded.config == original.config
    assert_same_outputs(original.fold_normalisation(), loaded)
    # own -> SAELens -> own -> SAELens: the same files
    save_dictionary(loaded, tmp_path / "own")
    export_saelens(load_dictionary(tmp_path / "own"), tmp_path / "s2")
    assert json.loads((tmp_path / "s2" / "cfg.json").read_text()) == json.loads(
        (tmp_path / "s" / "cfg.json").read_text()
    )
    first, second = (
        load_file(tmp_path / "s" / "sae_weights.safetensors"),
        load_file(tmp_path / "s2" / "sae_weights.safetensors"),
    )
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_saelens_layout(tmp_path):
    export_saelens(make("skip-transcoder", "jumprelu", layer=3), tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu_skip_transcoder" and cfg["apply_b_dec_to_input"] is False
    assert (cfg["d_in"], cfg["d_sae"], cfg["d_out"]) == (D, WIDTH, D)
    assert cfg["metadata"]["hook_name"] == "blocks.3.mlp.hook_in"
    assert cfg["metadata"]["hook_name_out"] == "blocks.3.hook_mlp_out"
    shapes = {k: list(v.shape) for k, v in load_file(tmp_path / "s" / "sae_weights.safetensors").items()}
    assert shapes == {"W_enc": [D, WIDTH], "b_enc": [WIDTH], "W_dec": [WIDTH, D], "b_dec": [D], "threshold": [WIDTH],
                      "W_skip": [D, D]}  # fmt: skip
    export_saelens(make("sae", "topk"), tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["k"], cfg["apply_b_dec_to_input"]) == ("topk", 5, True)
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post"


def test_saelens_without_modelrecon_metadata(tmp_path):
    """A folder SAELens wrote itself: sites from the TransformerLens hook names, or from `site`."""
    original = make("transcoder", "jumprelu", layer=4)
    export_saelens(original, tmp_path / "s")
    cfg_path = tmp_path / "s" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["metadata"]["modelrecon"]
    cfg_path.write_text(json.dumps(cfg))
    loaded = import_saelens(tmp_path / "s")
    assert loaded.config.input_sites == ("layers.4.mlp.in",) and loaded.config.output_sites == ("layers.4.mlp.out",)
    assert loaded.config.provenance["imported_from"] == "saelens"
    assert_same_outputs(original.fold_normalisation(), loaded)
    cfg["metadata"]["hook_name"] = "model.layers.4.mlp"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(BadInputError, match="pass site="):
        import_saelens(tmp_path / "s")
    loaded = import_saelens(tmp_path / "s", site=("layers.4.mlp.in", "layers.4.mlp.out"))
    assert loaded.config.input_sites == ("layers.4.mlp.in",)


def test_saelens_sae_without_b_dec_on_input(tmp_path):
    original = make("sae", "relu")
    export_saelens(original, tmp_path / "s")
    cfg_path, weights = tmp_path / "s" / "cfg.json", tmp_path / "s" / "sae_weights.safetensors"
    cfg = json.loads(cfg_path.read_text())
    cfg["apply_b_dec_to_input"] = False
    cfg_path.write_text(json.dumps(cfg))
    tensors = load_file(weights)
    tensors["b_enc"] = tensors["b_enc"] - tensors["b_dec"] @ tensors["W_enc"]  # the same SAE, written that way
    save_file(tensors, weights)
    assert_same_outputs(original.fold_normalisation(), import_saelens(tmp_path / "s"), atol=1e-5)


@pytest.mark.parametrize("kind,activation", [(k, a) for k, a in COMBINATIONS if (k, a) not in SAELENS_OK])
def test_saelens_unsupported(tmp_path, kind, activation):
    with pytest.raises(BadInputError, match="SAELens has no"):
        export_saelens(make(kind, activation, n_layers=2), tmp_path / "s")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "change,message",
    [
        ({"architecture": "gated"}, "not supported"),
        ({"normalize_activations": "layer_norm"}, "normalize_activations"),
        ({"d_sae": 16}, "shape"),
        ({"d_in": "12"}, "positive integer"),
        ({"dtype": "int8"}, "dtype"),
        ({"rescale_acts_by_decoder_norm": True}, "fold_W_dec_norm"),
    ],
)
def test_malformed_saelens(tmp_path, change, message):
    export_saelens(make("sae", "relu"), tmp_path / "s")
    cfg_path = tmp_path / "s" / "cfg.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **change}))
    with pytest.raises(BadInputError, match=message):
        import_saelens(tmp_path / "s")


def test_saelens_missing_or_extra_tensor(tmp_path):
    export_saelens(make("sae", "jumprelu"), tmp_path / "s")
    weights = tmp_path / "s" / "sae_weights.safetensors"
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if k != "threshold"}, weights)
    with pytest.raises(BadInputError, match="lacks the tensor 'threshold'"):
        import_saelens(tmp_path / "s")
    save_file({**tensors, "log_threshold": tensors["threshold"].clone()}, weights)
    with pytest.raises(BadInputError, match="unexpected tensors"):
        import_saelens(tmp_path / "s")
    weights.unlink()
    with pytest.raises(BadInputError, match="missing"):
        import_saelens(tmp_path / "s")


# --- circuit-tracer ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,activation", CIRCUIT_TRACER_OK)
def test_circuit_tracer_round_trip(tmp_path, kind, activation):
    if kind == "clt":
        originals = [make(kind, activation, n_layers=3)]
    else:
        originals = [make(kind, activation, layer=i, seed=i) for i in range(3)]
    export_circuit_tracer(originals[0] if kind == "clt" else originals, tmp_path / "c")
    loaded = import_circuit_tracer(tmp_path / "c")
    assert [d.config for d in loaded] == [d.config for d in originals]
    for original, back in zip(originals, loaded, strict=True):
        assert_same_outputs(original.fold_normalisation(), back)
    # circuit-tracer -> own -> circuit-tracer: the same tensors
    save_dictionaries(loaded, tmp_path / "own")
    again = load_dictionaries(tmp_path / "own")
    export_circuit_tracer(again[0] if kind == "clt" else again, tmp_path / "c2")
    for path in (tmp_path / "c").glob("*.safetensors"):
        first, second = load_file(path), load_file(tmp_path / "c2" / path.name)
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_circuit_tracer_layout(tmp_path):
    import yaml

    export_circuit_tracer([make("skip-transcoder", "jumprelu", layer=i) for i in range(2)], tmp_path / "set")
    names = sorted(p.name for p in (tmp_path / "set").iterdir())
    assert names == ["config.yaml", "layer_0.safetensors", "layer_1.safetensors"]
    config = yaml.safe_load((tmp_path / "set" / "config.yaml").read_text())
    assert config["model_kind"] == "transcoder_set" and config["model_name"] == "tiny"
    assert (config["feature_input_hook"], config["feature_output_hook"]) == ("mlp.hook_in", "mlp.hook_out")
    shapes = {k: list(v.shape) for k, v in load_file(tmp_path / "set" / "layer_1.safetensors").items()}
    assert shapes == {"W_enc": [WIDTH, D], "W_dec": [WIDTH, D], "b_enc": [WIDTH], "b_dec": [D],
                      "activation_function.threshold": [WIDTH], "W_skip": [D, D]}  # fmt: skip
    export_circuit_tracer(make("clt", "jumprelu", n_layers=3), tmp_path / "clt")
    assert yaml.safe_load((tmp_path / "clt" / "config.yaml").read_text())["model_kind"] == "cross_layer_transcoder"
    enc, dec = load_file(tmp_path / "clt" / "W_enc_1.safetensors"), load_file(tmp_path / "clt" / "W_dec_1.safetensors")
    assert {k: list(v.shape) for k, v in enc.items()} == {"W_enc_1": [WIDTH, D], "b_enc_1": [WIDTH], "b_dec_1": [D],
                                                          "threshold_1": [WIDTH]}  # fmt: skip
    assert {k: list(v.shape) for k, v in dec.items()} == {"W_dec_1": [WIDTH, 2, D]}


def test_circuit_tracer_without_modelrecon_entry(tmp_path):
    """A folder circuit-tracer wrote itself (its cache / to_safetensors): kinds and sites from the hooks."""
    import yaml

    originals = [make("transcoder", "jumprelu", layer=i, seed=i) for i in range(2)]
    export_circuit_tracer(originals, tmp_path / "c")
    path = tmp_path / "c" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    del config["modelrecon"]
    path.write_text(yaml.safe_dump(config))
    loaded = import_circuit_tracer(tmp_path / "c")
    assert [d.config.input_sites for d in loaded] == [("layers.0.mlp.in",), ("layers.1.mlp.in",)]
    assert loaded[0].config.provenance["imported_from"] == "circuit-tracer"
    for original, back in zip(originals, loaded, strict=True):
        assert_same_outputs(original.fold_normalisation(), back)


@pytest.mark.parametrize(
    "make_input,message",
    [
        (lambda: [make("sae", "relu")], "not SAEs"),
        (lambda: [make("transcoder", "topk")], "no topk"),
        (lambda: [make("transcoder", "relu", layer=1)], "layer 0"),
        (lambda: [make("transcoder", "relu", layer=0), make("transcoder", "relu", layer=2)], "layer 1"),
        (lambda: [make("transcoder", "relu", 0), make("skip-transcoder", "relu", 1)], "one kind"),
        (lambda: [make("transcoder", "relu", 0), make("transcoder", "jumprelu", 1)], "one activation"),
        (lambda: [make("clt", "relu", n_layers=2), make("clt", "relu", n_layers=2)], "on its own"),
    ],
)
def test_circuit_tracer_unsupported(tmp_path, make_input, message):
    with pytest.raises(BadInputError, match=message):
        export_circuit_tracer(make_input(), tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_circuit_tracer_unknown_site(tmp_path):
    d = make("transcoder", "relu").with_config(input_sites=("layers.0.attn.out",))
    with pytest.raises(BadInputError, match="no hook for site"):
        export_circuit_tracer([d], tmp_path / "c")


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda f: (f / "config.yaml").write_text("model_kind: [unclosed"), "not valid YAML"),
        (lambda f: (f / "config.yaml").write_text("- a list"), "YAML mapping"),
        (lambda f: (f / "config.yaml").unlink(), "missing"),
        (lambda f: (f / "layer_1.safetensors").unlink(), "numbered 0..n-1"),
        (lambda f: (f / "layer_0.safetensors").rename(f / "layer_5.safetensors"), "numbered 0..n-1"),
        (
            lambda f: save_file(
                {
                    "b_enc": torch.zeros(WIDTH),
                    "b_dec": torch.zeros(D),
                    "W_enc": torch.zeros(D, WIDTH),
                    "W_dec": torch.zeros(WIDTH, D),
                },
                f / "layer_2.safetensors",
            ),
            "shape",
        ),  # fmt: skip
        (lambda f: (f / "config.yaml").write_text("model_kind: crosscoder\n"), "not supported"),
        (
            lambda f: (f / "config.yaml").write_text("model_kind: transcoder_set\nfeature_input_hook: hook_z\n"),
            "no modelrecon site",
        ),  # fmt: skip
    ],
)
def test_malformed_circuit_tracer(tmp_path, damage, message):
    export_circuit_tracer([make("transcoder", "relu", layer=i) for i in range(3)], tmp_path / "c")
    damage(tmp_path / "c")
    with pytest.raises(BadInputError, match=message):
        import_circuit_tracer(tmp_path / "c")


def test_malformed_clt(tmp_path):
    export_circuit_tracer(make("clt", "relu", n_layers=3), tmp_path / "c")
    (tmp_path / "c" / "W_dec_2.safetensors").unlink()
    with pytest.raises(BadInputError, match="W_dec"):
        import_circuit_tracer(tmp_path / "c")
    save_file({"W_dec_2": torch.zeros(WIDTH, 2, D)}, tmp_path / "c" / "W_dec_2.safetensors")
    with pytest.raises(BadInputError, match="shape"):
        import_circuit_tracer(tmp_path / "c")
