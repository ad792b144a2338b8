"""Dictionary training on Ray (modelrecon.scale.train) on a local 2-CPU cluster: data parallel on 2 workers matches
one process within the stated tolerance, layers mode gives one process's dictionaries, the CLI trains with --ray."""

import sys

import pytest
import torch

from modelrecon.dictionaries import TrainOptions, load_dictionaries, train_on_model
from modelrecon.dictionaries.train import activation_source, dictionary_configs, dictionary_loss

from conftest import assert_one_line_error, cli
from tiny import tiny_model

DATA = dict(context_length=64, buffer_bytes=2**20)
# Data parallel vs one process: the same sums in another order (measured: every tensor within 2.6e-7 of its largest
# value after 16 steps, up to 7e-7 after 150; see modelrecon.scale.train for why it is not exact and can grow).
DATA_PARALLEL_RTOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny dictionaries train fastest on one thread (as each worker here does), and far slower on two on a busy
    machine; equality does not depend on it (both sides of every comparison run alike)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _held_out_fvu(model, dictionaries, options):
    """Each dictionary's FVU on 1024 tokens none of the runs trained on (another seed's batch)."""
    configs = [d.config for d in dictionaries]
    x, y = next(activation_source(model, configs, TrainOptions(batch_size=1024, seed=9), **DATA))
    out = []
    for i, d in enumerate(dictionaries):
        rows = slice(i, i + d.config.n_layers)
        dead = torch.zeros(d.config.n_layers, d.config.width, dtype=torch.bool)
        with torch.no_grad():
            out.append(dictionary_loss(d, x[:, rows], y[:, rows], options, dead)[1]["fvu"])
    return out


def test_data_parallel_on_two_workers_matches_one_process(ray_cluster, model):
    """BatchTopK SAEs on every layer, streamed: each worker runs the model on half of the model batches, trains on half
    of every batch, BatchTopK keeps the top k x batch of the whole batch, gradients are averaged."""
    from modelrecon.scale.train import train_on_ray

    options = TrainOptions(tokens=256 * 16, batch_size=256, lr=3e-3, seed=0)
    args = (model, "sae", "layers.*.resid_post", 64, options)
    single = train_on_model(*args, activation="batchtopk", k=4, progress=False, **DATA)
    ray_run = train_on_ray(*args, activation="batchtopk", k=4, workers=2, mode="data", **DATA)
    runs = {(d.config.provenance["ray"]["mode"], d.config.provenance["ray"]["workers"]) for d in ray_run}
    assert runs == {("data", 2)}
    for one, two in zip(single, ray_run, strict=True):
        assert two.config.input_sites == one.config.input_sites
        for name, value in one.state_dict().items():
            scale = float(value.abs().max()) or 1.0
            assert float((two.state_dict()[name] - value).abs().max()) <= DATA_PARALLEL_RTOL * scale, name
    fvu_one, fvu_two = _held_out_fvu(model, single, options), _held_out_fvu(model, ray_run, options)
    assert max(fvu_one) < 0.8  # it learned (the initial dictionaries explain about nothing)
    assert fvu_two == pytest.approx(fvu_one, abs=1e-5)


@pytest.mark.parametrize("kind,site,activation,atol", [("transcoder", "layers.*.mlp", "jumprelu", 0.0),
                                                       ("sae", "layers.*.resid_post", "topk", 1e-6)])  # fmt: skip
def test_layers_split_over_workers_train_as_one_process(model, kind, site, activation, atol):
    """Each worker's part of a layers-mode run (here in this process): same rows in the same order, same stack kernels.
    Identical bits, except TopK's gathered decoder gradient (summed in an order that depends on the stack's other
    layers: ~1e-7)."""
    from modelrecon.scale.train import _split, _train_part

    options = TrainOptions(tokens=256 * 16, batch_size=256, lr=3e-3, seed=0)
    configs = dictionary_configs(model, kind, site, 64, options, activation=activation, k=4, context_length=64)
    single = train_on_model(model, kind, site, 64, options, activation=activation, k=4, progress=False, **DATA)
    whole = activation_source(model, configs, options, **DATA)
    parts = [list(p) for p in _split(len(configs), 2)]
    assert parts == [[0, 1], [2]]
    states = {}
    for rank in range(2):
        states |= _train_part(model, configs, options, "layers", rank, 2, cube=None, data=DATA, parts=parts,
                              buffer_tokens=whole.buffer_tokens)  # fmt: skip
    assert sorted(states) == [0, 1, 2]
    for i, d in enumerate(single):
        for name, value in d.state_dict().items():
            torch.testing.assert_close(states[i][name], value, rtol=0, atol=atol, msg=name)


def test_cli_trains_by_layer_on_ray_and_writes_the_single_process_folder(ray_cluster, capsys, tmp_path,
                                                                        tiny_llama_folder):  # fmt: skip
    common = ["train", "--model", tiny_llama_folder, "--kind", "transcoder", "--site", "layers.*.mlp", "--width", "32",
              "--k", "4", "--activation", "relu", "--tokens", "4096", "--batch-size", "256", "--lr", "0.003",
              "--context-length", "64", "--reuse", "8"]  # fmt: skip
    code, stdout, err = cli(capsys, *common, "--out", tmp_path / "one")
    assert code == 0, err
    code, stdout, err = cli(capsys, *common, "--out", tmp_path / "ray", "--ray", "local", "--workers", "2",
                            "--ray-mode", "layers")  # fmt: skip
    assert code == 0, err
    assert f"wrote 3 dictionaries to {tmp_path / 'ray'} (Ray: 2 workers, layers)" in stdout
    one, two = load_dictionaries(tmp_path / "one"), load_dictionaries(tmp_path / "ray")
    assert [d.config.input_sites for d in two] == [(f"layers.{i}.mlp.in",) for i in range(3)]
    for a, b in zip(one, two, strict=True):
        for name, value in a.state_dict().items():
            assert torch.equal(b.state_dict()[name], value), name  # the same bits through Ray and the folder


def test_ray_options_fail_in_one_line(ray_cluster, capsys, tmp_path, tiny_llama_folder, monkeypatch):
    base = ["train", "--model", tiny_llama_folder, "--out", tmp_path / "x", "--width", "32", "--k", "4"]
    code, _, err = cli(capsys, *base, "--workers", "2")
    assert_one_line_error(code, err, "--workers and --ray-mode need --ray")
    code, _, err = cli(capsys, *base, "--ray", "local", "--ray-mode", "heads")
    assert_one_line_error(code, err, "unknown --ray-mode 'heads'")
    code, _, err = cli(capsys, *base, "--ray", "local", "--ray-mode", "layers", "--kind", "clt", "--site",
                       "layers.*.mlp")  # fmt: skip
    assert_one_line_error(code, err, "a clt is one dictionary", "--ray-mode data")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the scale extra were not installed
    code, _, err = cli(capsys, *base, "--ray", "local")
    assert_one_line_error(code, err, "--ray needs Ray", "modelrecon[scale]")
    assert not (tmp_path / "x").exists()
