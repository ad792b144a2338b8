"""Published dictionaries by name, offline: folders in exactly the layouts of circuit-tracer's transcoder repos (a
config.yaml with layer files, or with `hf://` paths to GemmaScope's JumpReLU params.npz), SAELens repos and
GemmaScope's SAE releases are placed in a temporary Hugging Face cache (HF_HUB_CACHE, HF_HUB_OFFLINE=1); what
`--transcoders` / `--dict` read from them must compute what those formats define."""

import shutil

import numpy as np
import pytest
import torch
import yaml

from modelrecon.circuits.attribute import attribute
from modelrecon.dictionaries import Dictionary, DictionaryConfig
from modelrecon.dictionaries.defaults import transcoders_by_name
from modelrecon.dictionaries.formats import export_circuit_tracer, export_saelens
from modelrecon.dictionaries.hub import open_dictionaries
from modelrecon.errors import BadInputError

from conftest import assert_one_line_error, cli
from test_circuits import _transcoders
from tiny import tiny_model

COMMIT = "a" * 40
PROMPT = "The cat sat on the mat"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A Hugging Face cache with nothing in it, the network off: `put(repo, path, source)` adds a file."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def put(repo: str, path: str, source) -> None:
        root = cache / f"models--{repo.replace('/', '--')}"
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text(COMMIT)
        target = root / "snapshots" / COMMIT / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, bytes):
            target.write_bytes(source)
        else:
            shutil.copyfile(source, target)

    return put


def _gemma_scope_params(d_in, width, d_out, seed):
    """A GemmaScope params.npz: JumpReLU, W_enc [d_in, width], W_dec [width, d_out]."""
    rng = np.random.default_rng(seed)
    return {"W_enc": rng.normal(0, 0.3, (d_in, width)).astype(np.float32),
            "W_dec": rng.normal(0, 0.3, (width, d_out)).astype(np.float32),
            "b_enc": rng.normal(0, 0.1, width).astype(np.float32),
            "b_dec": rng.normal(0, 0.1, d_out).astype(np.float32),
            "threshold": rng.uniform(0.0, 0.3, width).astype(np.float32)}  # fmt: skip


def _npz(tmp_path, params, name):
    path = tmp_path / name
    np.savez(path, **params)
    return path


def _gemma_scope_reference(params, x, subtract_b_dec=False):
    """GemmaScope's own definition: pre = x W_enc + b_enc; JumpReLU(pre) = pre where pre > threshold; out = f W_dec
    + b_dec."""
    pre = x @ params["W_enc"] + params["b_enc"]
    f = pre * (pre > params["threshold"])
    return f, f @ params["W_dec"] + params["b_dec"]


def test_a_circuit_tracer_repo_with_layer_files_traces_like_the_originals(hub, tmp_path):
    model = tiny_model("llama")
    originals = _transcoders(model, activation="relu")
    export_circuit_tracer(originals, tmp_path / "ct")
    for f in (tmp_path / "ct").iterdir():
        hub("org/tiny-transcoders", f"set-a/{f.name}", f)
    loaded = transcoders_by_name(model, "org/tiny-transcoders/set-a")
    assert len(loaded) == model.n_layers
    x = torch.randn(5, model.d_model)
    for a, b in zip(originals, loaded, strict=True):
        assert torch.allclose(a.encode(x[:, None]), b.encode(x[:, None]), atol=1e-5)
    ours = attribute(model, PROMPT, originals, progress=False)
    theirs = attribute(model, PROMPT, loaded, progress=False)
    assert torch.allclose(ours.weights, theirs.weights, atol=1e-5)
    assert open_dictionaries("hf://org/tiny-transcoders/set-a")[0].config == loaded[0].config  # the hf:// form


def test_a_circuit_tracer_config_with_hf_paths_to_gemma_scope_npz(hub, tmp_path, capsys):
    """mwhanna/gemma-scope-transcoders' layout: config.yaml lists hf:// paths into google/gemma-scope-2b-pt-
    transcoders, one JumpReLU params.npz per layer; hooks ln2.hook_normalized -> hook_mlp_out."""
    model = tiny_model("gemma2", seed=3)
    d, width = model.d_model, 48
    params = [_gemma_scope_params(d, width, d, seed=layer) for layer in range(model.n_layers)]
    paths = []
    for layer, p in enumerate(params):
        path = f"layer_{layer}/width_16k/average_l0_{10 + layer}/params.npz"
        hub("google/gemma-scope-2b-pt-transcoders", path, _npz(tmp_path, p, f"p{layer}.npz"))
        paths.append(f"hf://google/gemma-scope-2b-pt-transcoders/{path}")
    config = {"model_name": "google/gemma-2-2b", "model_kind": "transcoder_set",
              "feature_input_hook": "ln2.hook_normalized", "feature_output_hook": "hook_mlp_out",
              "transcoders": paths}  # fmt: skip
    hub("mwhanna/gemma-scope-transcoders", "config.yaml", yaml.safe_dump(config).encode())
    loaded = transcoders_by_name(model, "mwhanna/gemma-scope-transcoders")
    x = np.random.default_rng(9).normal(0, 1, (6, d)).astype(np.float32)
    for layer, (p, t) in enumerate(zip(params, loaded, strict=True)):
        assert t.config.input_sites == (f"layers.{layer}.mlp.in",) and t.config.activation == "jumprelu"
        f, out = _gemma_scope_reference(p, x)
        ours_f = t.encode(torch.from_numpy(x)[:, None])[:, 0]
        assert np.allclose(ours_f.detach().numpy(), f, atol=1e-5)
        assert np.allclose(t.decode(ours_f[:, None])[:, 0].detach().numpy(), out, atol=1e-4)
    graph = attribute(model, PROMPT, loaded, progress=False)  # Gemma 2 traced through GemmaScope-format features
    assert graph.metadata["edge_check_error"] < 1e-5
    # the same config as a file on disk, its paths still on the hub
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert len(open_dictionaries(tmp_path / "config.yaml")) == model.n_layers


def test_saelens_release_names_and_saelens_repos(hub, tmp_path):
    rng_params = _gemma_scope_params(32, 24, 32, seed=5)
    hub("google/gemma-scope-2b-pt-res", "layer_1/width_16k/average_l0_5/params.npz",
        _npz(tmp_path, rng_params, "res.npz"))  # fmt: skip
    (sae,) = open_dictionaries("saelens:gemma-scope-2b-pt-res/layer_1/width_16k/average_l0_5")
    assert sae.config.kind == "sae" and sae.config.input_sites == ("layers.1.resid_post",)
    x = np.random.default_rng(1).normal(0, 1, (4, 32)).astype(np.float32)
    f, _ = _gemma_scope_reference(rng_params, x)  # GemmaScope encodes x itself, not x - b_dec
    assert np.allclose(sae.encode(torch.from_numpy(x)[:, None])[:, 0].detach().numpy(), f, atol=1e-5)
    with pytest.raises(BadInputError, match="canonical ids need SAELens"):
        open_dictionaries("saelens:gemma-scope-2b-pt-res/layer_1/width_16k/canonical")
    with pytest.raises(BadInputError, match="unknown SAELens release"):
        open_dictionaries("saelens:no-such-release/blocks.1")
    # a repo in SAELens's own layout (cfg.json + sae_weights.safetensors in a subfolder)
    model = tiny_model("llama")
    d = Dictionary(DictionaryConfig("sae", 32, 32, 16, "topk", 4, ("layers.1.resid_post",), ("layers.1.resid_post",)))
    with torch.no_grad():
        for p in d.parameters():
            p.normal_(0, 0.3)
    export_saelens(d, tmp_path / "sl", model_name=model.name)
    for f in (tmp_path / "sl").iterdir():
        hub("org/saes", f"blocks.1.hook_resid_post/{f.name}", f)
    (loaded,) = open_dictionaries("org/saes/blocks.1.hook_resid_post")
    assert torch.allclose(loaded.encode(torch.ones(2, 1, 32)), d.encode(torch.ones(2, 1, 32)), atol=1e-5)


def test_a_name_not_in_the_cache_offline_is_a_one_line_error(hub, capsys, tmp_path, tiny_llama_folder):
    code, _, err = cli(capsys, "trace", PROMPT, "--model", tiny_llama_folder, "--transcoders", "org/not-cached",
                       "--out", tmp_path / "g")  # fmt: skip
    assert_one_line_error(code, err, "org/not-cached", "fetch it once online")
    assert not (tmp_path / "g").exists()
    code, _, err = cli(capsys, "trace", PROMPT, "--model", tiny_llama_folder, "--transcoders", "nonsense",
                       "--out", tmp_path / "g")  # fmt: skip
    assert_one_line_error(code, err, "nonsense", "saelens:RELEASE/ID")


def test_a_modelrecon_set_in_a_repo_loads_every_member(hub, tmp_path, monkeypatch):
    from modelrecon.dictionaries import hub as hub_module
    from modelrecon.dictionaries.formats import save_dictionaries

    saved = _transcoders(tiny_model("llama"), activation="relu")
    save_dictionaries(saved, tmp_path / "set")
    files = sorted(p.relative_to(tmp_path / "set").as_posix() for p in (tmp_path / "set").rglob("*") if p.is_file())
    for name in files:
        hub("org/mine", f"tc/{name}", tmp_path / "set" / name)
    download, fetched = hub_module._download, []
    monkeypatch.setattr(hub_module, "_download", lambda repo, name, *a, **k: fetched.append(name) or download(
        repo, name, *a, **k))  # fmt: skip
    loaded = open_dictionaries("org/mine/tc")
    assert {f"tc/{name}" for name in files} <= set(fetched)  # every member is fetched, not only the index
    assert len(loaded) == len(saved) > 1
    for a, b in zip(loaded, saved, strict=True):
        assert a.config == b.config and torch.equal(a.W_dec[0], b.fold_normalisation().W_dec[0])
