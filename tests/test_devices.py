"""Every device present: the model, its recordings, the attribution graph and dictionary training live on the device
the model was loaded on, and give what the CPU gives (CUDA and MPS run where present and are skipped, with the
reason, elsewhere); bf16 models keep float32 where the graph's exactness needs it; a device that is not here is a
one-line error."""

import pytest
import torch

import modelrecon as mr
from modelrecon.circuits.attribute import attribute
from modelrecon.dictionaries.train import TrainOptions, train_on_model
from modelrecon.errors import BadInputError
from modelrecon.models.loading import mps_available, resolve_device

from conftest import assert_one_line_error, cli
from test_circuits import PROMPT, _transcoders

_MPS = mps_available()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")),
    pytest.param("mps", marks=pytest.mark.skipif(not _MPS, reason="no Apple MPS device here")),
]
# Stated tolerances of a device against the CPU (float32): kernels sum in other orders, nothing more.
LOGITS_TOL, EDGE_TOL = 1e-4, 1e-4


@pytest.fixture(scope="module")
def cpu_model(tiny_llama_folder):
    return mr.load(tiny_llama_folder)


@pytest.mark.parametrize("device", DEVICES)
def test_recordings_stay_on_the_device_and_equal_the_cpu(device, tiny_llama_folder, cpu_model):
    model = mr.load(tiny_llama_folder, device=device)
    assert model.device.type == device
    result = mr.run(model, PROMPT, record=["layers.*.resid_post", "layers.1.mlp.in"])
    assert all(v[0].device.type == device for v in result.acts.values())  # no silent copy to the host
    expected = mr.run(cpu_model, PROMPT, record=["layers.1.mlp.in"])
    assert (result.logits[0].cpu() - expected.logits[0]).abs().max() < LOGITS_TOL
    assert (result.acts["layers.1.mlp.in"][0].cpu() - expected.acts["layers.1.mlp.in"][0]).abs().max() < LOGITS_TOL


@pytest.mark.parametrize("device", DEVICES)
def test_the_attribution_graph_on_the_device_equals_the_cpu_graph(device, tiny_llama_folder, cpu_model):
    model = mr.load(tiny_llama_folder, device=device)
    transcoders = _transcoders(cpu_model)
    expected = attribute(cpu_model, PROMPT, transcoders, max_feature_nodes=1000, progress=False)
    graph = attribute(model, PROMPT, transcoders, max_feature_nodes=1000, progress=False)
    assert graph.metadata["edge_check_error"] < 1e-5
    assert [n.id for n in graph.nodes] == [n.id for n in expected.nodes]
    edges = dict(
        zip(
            zip(expected.sources.tolist(), expected.targets.tolist(), strict=True),
            expected.weights.tolist(),
            strict=True,
        )
    )
    got = dict(
        zip(zip(graph.sources.tolist(), graph.targets.tolist(), strict=True), graph.weights.tolist(), strict=True)
    )
    scale = max(abs(w) for w in edges.values())
    assert max(abs(got.get(k, 0.0) - w) for k, w in edges.items()) < EDGE_TOL * scale


@pytest.mark.parametrize("device", DEVICES)
def test_dictionaries_train_on_the_models_device(device, tiny_llama_folder):
    """Same seed, same stream: the device's dictionaries match the CPU's after a few steps (float32, Adam; a GPU
    sums in another order, so loosely: 1e-3 of the weights' scale)."""
    options = TrainOptions(tokens=256, batch_size=32, lr=1e-3, seed=0, checkpoint_every=0)
    trained = {}
    for where in dict.fromkeys(["cpu", device]):
        model = mr.load(tiny_llama_folder, device=where)
        trained[where] = train_on_model(model, "transcoder", "layers.1.mlp", 64, options, k=4, corpus="sample",
                                        context_length=32, buffer_bytes=1 << 16, progress=False)[0]  # fmt: skip
        assert trained[where].W_enc.device.type == where
    a, b = trained["cpu"].W_enc.detach(), trained[device].W_enc.detach().cpu()
    assert (a - b).abs().max() < 1e-3 * a.abs().max()


@pytest.mark.parametrize("device", DEVICES)
def test_a_bf16_model_keeps_float32_features_and_checked_edges(device, tiny_llama_folder, cpu_model):
    model = mr.load(tiny_llama_folder, device=device, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    transcoders = _transcoders(cpu_model)
    graph = attribute(model, PROMPT, transcoders, max_feature_nodes=1000, progress=False)
    expected = attribute(cpu_model, PROMPT, transcoders, max_feature_nodes=1000, progress=False)
    # the bf16 forward pass against the float32 transposed pass: bf16's 8 bits of mantissa, measured 6e-3
    assert graph.metadata["edge_check_error"] < 0.05
    assert {n.id for n in graph.nodes if n.kind == "logit"} & {n.id for n in expected.nodes if n.kind == "logit"}


def test_a_device_that_is_not_here_is_a_one_line_error(capsys, tiny_llama_folder):
    assert resolve_device("auto").type in ("cuda", "mps", "cpu")
    with pytest.raises(BadInputError, match="unknown device"):
        resolve_device("tpu")
    code, _, err = cli(capsys, "run", PROMPT, "--model", tiny_llama_folder, "--dtype", "float64")
    assert_one_line_error(code, err, "float64", "float32, bfloat16, float16")
    if torch.cuda.is_available():
        code, _, err = cli(capsys, "run", PROMPT, "--model", tiny_llama_folder, "--device", "cuda:99")
        assert_one_line_error(code, err, "cuda:99", "CUDA device")
    else:
        code, _, err = cli(capsys, "run", PROMPT, "--model", tiny_llama_folder, "--device", "cuda")
        assert_one_line_error(code, err, "--device cuda", "no CUDA device", "--device cpu")
