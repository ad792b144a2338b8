"""Every reader refuses bad input in one line (exit code 2 on the command line) and writes nothing: damaged cubes,
dictionary folders, graph files, pair / component / prompt files, prompts longer than the model's context, and NaN
or infinite weights, activations and results."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from modelrecon.circuits.graph import Graph, Node
from modelrecon.circuits.graph_file import load_graph, save_graph
from modelrecon.cube.capture import capture
from modelrecon.cube.reader import open_cube
from modelrecon.dictionaries.formats import export_circuit_tracer, load_dictionaries, save_dictionary
from modelrecon.dictionaries.model import Dictionary, DictionaryConfig
from modelrecon.errors import BadInputError, CubeError, NonFiniteError

from conftest import assert_one_line_error, cli
from tiny import save_tiny_model, tiny_model

PROMPTS = ["Hello there, world!", "The quick brown fox"]
LONG = "x" * 200  # the tiny models' character tokenizer: 200 tokens, past their 128 positions


@pytest.fixture(scope="module")
def clean_cube(tmp_path_factory):
    """A small finished cube (raw activation chunks, checksummed zstd for the rest) and its npz export."""
    folder = tmp_path_factory.mktemp("cube")
    cube = capture(tiny_model("llama"), PROMPTS, folder / "c.zarr", sites=["layers.*.resid_post"],
                   dtype="float32", chunk_tokens=16, progress=False)  # fmt: skip
    return cube.path


@pytest.fixture
def cube(clean_cube, tmp_path):
    copy = tmp_path / "c.zarr"
    shutil.copytree(clean_cube, copy)
    return copy


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


CUBE_COMMANDS = {
    "export": lambda cube, out: ["cube", "export", cube, "--out", out / "x.npz"],
    "info": lambda cube, out: ["cube", "info", cube],
    "show": lambda cube, out: ["cube", "show", cube, "--html", out / "x.html"],
}


@pytest.mark.parametrize("command", CUBE_COMMANDS)
@pytest.mark.parametrize(
    "chunk,damage,message",
    [
        ("sites/resid_post/c/1/2/0", truncate, "chunk sites/resid_post/c/1/2/0 is corrupt"),
        ("sites/resid_post/c/0/1/0", Path.unlink, "chunk sites/resid_post/c/0/1/0 is missing"),
        ("tokens/token_id/c/0", truncate, "chunk tokens/token_id/c/0 is corrupt"),
        ("tokens/text_bytes/c/0", Path.unlink, "chunk tokens/text_bytes/c/0 is missing"),
        ("tokens/position/c/0", Path.unlink, "tokens/position does not match the token offsets"),
    ],
)
def test_damaged_cube_chunk(capsys, tmp_path, cube, command, chunk, damage, message):
    damage(cube / chunk)
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = cli(capsys, *CUBE_COMMANDS[command](cube, out))
    assert_one_line_error(code, err, f"cube '{cube}'", message, "capture it again")
    assert list(out.iterdir()) == []  # nothing written, not even a temporary file


def test_damaged_summaries(capsys, tmp_path, clean_cube, cube):
    """A flipped byte in a checksummed chunk is found; `cube export` (activations only) does not read that chunk,
    and its output is then the undamaged cube's."""
    flip(cube / "summaries/resid_post/c/1/0/0")
    for command in ("info", "show"):
        code, _, err = cli(capsys, *CUBE_COMMANDS[command](cube, tmp_path))
        assert_one_line_error(code, err, "chunk summaries/resid_post/c/1/0/0 is corrupt (Zstd")
    assert cli(capsys, "cube", "export", cube, "--out", tmp_path / "damaged.npz")[0] == 0
    assert cli(capsys, "cube", "export", clean_cube, "--out", tmp_path / "clean.npz")[0] == 0
    with np.load(tmp_path / "damaged.npz") as damaged, np.load(tmp_path / "clean.npz") as clean:
        assert sorted(damaged.files) == sorted(clean.files)
        assert all(np.array_equal(damaged[k], clean[k]) for k in clean.files)


def edit_metadata(cube: Path, change) -> None:
    meta = json.loads((cube / "zarr.json").read_text())
    change(meta["attributes"]["modelrecon_cube"])
    (cube / "zarr.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda m: m.update(schema_version=99), "schema version 99"),
        (lambda m: m.pop("sites"), "lacks the 'sites' section"),
        (lambda m: m["capture"].update(n_tokens=3), "does not match the 3 tokens"),
        (lambda m: m["progress"].update(tokens_written="all"), "progress.tokens_written"),
    ],
)
def test_cube_metadata(capsys, cube, change, message):
    edit_metadata(cube, change)
    code, _, err = cli(capsys, "cube", "info", cube)
    assert_one_line_error(code, err, message)


def test_truncated_token_table(capsys, cube):
    """tokens/token_id cut to fewer rows than the cube has tokens (its zarr.json edited)."""
    meta_path = cube / "tokens" / "token_id" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["shape"] = [meta["shape"][0] - 5]
    meta_path.write_text(json.dumps(meta))
    code, _, err = cli(capsys, "cube", "export", cube, "--out", cube.parent / "x.npz")
    assert_one_line_error(code, err, "tokens/token_id has", "truncated or damaged")
    assert not (cube.parent / "x.npz").exists()


def test_damage_found_lazily_by_the_library(cube):
    """Opening reads metadata only; the damaged chunk is named when a read reaches it."""
    truncate(cube / "sites/resid_post/c/0/0/0")
    opened = open_cube(cube)
    assert opened.get("resid_post", layers=[1]).shape[1] == 1  # other chunks still read
    with pytest.raises(CubeError, match="chunk sites/resid_post/c/0/0/0 is corrupt"):
        opened.get("resid_post", prompt=0)


# --- dictionary folders ------------------------------------------------------------------------------------------
def _transcoder(layer: int) -> Dictionary:
    sites = {"input_sites": (f"layers.{layer}.mlp.in",), "output_sites": (f"layers.{layer}.mlp.out",)}
    config = DictionaryConfig(kind="transcoder", d_in=32, d_out=32, width=16, activation="relu", **sites)
    return Dictionary(config).eval()


def _dictionary_folder(tmp_path, layout: str) -> Path:
    if layout == "own":
        save_dictionary(_transcoder(0), tmp_path / "d")
    else:
        export_circuit_tracer([_transcoder(i) for i in range(2)], tmp_path / "d")
    return tmp_path / "d"


@pytest.mark.parametrize(
    "layout,damage,message",
    [
        ("own", lambda f: truncate(f / "dictionary.safetensors"), "does not match the sha256"),
        ("own", lambda f: (f / "config.json").write_text('{"kind": '), "not valid JSON"),
        ("own", lambda f: (f / "config.json").write_bytes(b"\xff\xfe{}"), "not valid JSON"),
        ("circuit-tracer", lambda f: (f / "config.yaml").write_text("transcoders: [unclosed"), "not valid YAML"),
        ("circuit-tracer", lambda f: truncate(f / "layer_0.safetensors"), "not a readable safetensors file"),
    ],
)
def test_damaged_dictionary_folder(capsys, tmp_path, tiny_llama_folder, layout, damage, message):
    folder = _dictionary_folder(tmp_path, layout)
    damage(folder)
    with pytest.raises(BadInputError, match=message):
        load_dictionaries(folder)
    code, _, err = cli(capsys, "eval-dict", "--dict", folder, "--model", tiny_llama_folder, "--json", tmp_path / "r")
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_dictionary_weights_not_finite(tmp_path, value):
    from safetensors.torch import load_file, save_file

    folder = _dictionary_folder(tmp_path, "circuit-tracer")
    tensors = load_file(folder / "layer_1.safetensors")
    key = next(k for k in tensors if tensors[k].is_floating_point() and tensors[k].dim() == 2)
    tensors[key][0, 0] = value
    save_file(tensors, folder / "layer_1.safetensors")
    with pytest.raises(BadInputError, match=f"layer_1.safetensors': tensor '{key}' contains NaN or infinite"):
        load_dictionaries(folder)


def test_wrong_shape_in_dictionary(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _dictionary_folder(tmp_path, "circuit-tracer")
    tensors = load_file(folder / "layer_0.safetensors")
    key = next(k for k in tensors if tensors[k].dim() == 2)
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, folder / "layer_0.safetensors")
    with pytest.raises(BadInputError, match="shape"):
        load_dictionaries(folder)


# --- graph files -----------------------------------------------------------------------------------------------------
def _graph(weight: float = 1.0) -> Graph:
    nodes = [Node("embedding", 0, feature=5, token="a"), Node("logit", 0, feature=9, activation=0.5, token="c")]
    return Graph("a", ["a"], [5], "tiny", nodes, torch.tensor([0]), torch.tensor([1]), torch.tensor([weight]))


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda text: text[: len(text) // 2], "not JSON"),
        (lambda text: text.replace('"links"', '"lonks"'), "lacks 'links'"),
        (lambda text: text.replace('"weight": 1.0', '"weight": NaN'), "not finite"),
        (lambda text: text.replace('"weight": 1.0', '"weight": "1"'), "wrong type"),
        (lambda text: "[]", "not an object"),
    ],
)
def test_damaged_graph_file(tmp_path, damage, message):
    path = save_graph(_graph(), tmp_path / "graph.json")
    path.write_text(damage(path.read_text()))
    with pytest.raises(BadInputError, match=message):
        load_graph(path)


@pytest.mark.parametrize("weight", [float("nan"), float("inf")])
def test_non_finite_graph_is_not_written(tmp_path, weight):
    with pytest.raises(NonFiniteError, match=r"the edge 'a' -> 'c' of the graph of 'a' is NaN or infinite"):
        save_graph(_graph(weight), tmp_path / "graph.json")
    assert list(tmp_path.iterdir()) == []


# --- pairs, components and prompt files ----------------------------------------------------------------------------
PAIR = {"clean": "ab", "counterfactual": "cd", "answer": "x", "wrong": "y"}


@pytest.mark.parametrize(
    "content,message",
    [
        (b"\xff\xfe\x00garbage", "not UTF-8 text"),
        (b'{"clean": "ab"', "pairs.jsonl:1 is not valid JSON"),
        (json.dumps({**PAIR, "answer": 3}).encode(), "field 'answer' must be a non-empty string"),
        (json.dumps([PAIR]).encode(), "must be a JSON object"),
        (b"\n\n", "has no pairs"),
    ],
)
def test_bad_pairs_file(capsys, tmp_path, tiny_llama_folder, content, message):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes(content)
    code, _, err = cli(capsys, "patch", "--pairs", pairs, "--sweep", "resid_pre", "--model", tiny_llama_folder,
                       "--json", tmp_path / "out.json")  # fmt: skip
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize(
    "content,message",
    [
        (b"\xc3\x28", "not UTF-8 text"),
        (b"{", "not valid JSON"),
        (b"[]", "must be a non-empty object"),
        (b'{"ablate": [{"op": "explode"}]}', "components.json: "),
    ],
)
def test_bad_components_file(capsys, tmp_path, tiny_llama_folder, content, message):
    components, pairs = tmp_path / "components.json", tmp_path / "pairs.jsonl"
    components.write_bytes(content)
    pairs.write_text(json.dumps(PAIR))
    code, _, err = cli(capsys, "experiment", "--components", components, "--pairs", pairs, "--model",
                       tiny_llama_folder, "--json", tmp_path / "out.json")  # fmt: skip
    assert_one_line_error(code, err, message, str(components))
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("name,content", [("p.txt", b"\x80\x81"), ("p.jsonl", b"\xff"), ("p.jsonl", b"[1]")])
def test_bad_prompt_file(capsys, tmp_path, tiny_llama_folder, name, content):
    prompts = tmp_path / name
    prompts.write_bytes(content)
    code, _, err = cli(capsys, "capture", "--prompts", prompts, "--model", tiny_llama_folder, "--out",
                       tmp_path / "c.zarr")  # fmt: skip
    assert_one_line_error(code, err, str(prompts))
    assert not (tmp_path / "c.zarr").exists()


# --- prompts longer than the model's context -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        ["run", LONG],
        ["capture", "--text", LONG, "--out", "{tmp}/c.zarr"],
        ["trace", LONG, "--out", "{tmp}/g"],
        ["patch", "--clean", LONG, "--corrupt", LONG.replace("x", "y"), "--answer", "a", "--wrong", "b", "--sweep",
         "resid_pre", "--json", "{tmp}/p.json"],
        ["lens", LONG],
    ],
)  # fmt: skip
def test_prompt_longer_than_the_context(capsys, tmp_path, tiny_llama_folder, argv):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, _, err = cli(capsys, *argv, "--model", tiny_llama_folder)
    assert_one_line_error(code, err, "has 200 tokens", "trained on at most 128 positions", "--truncate")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # refused before any work: nothing written


def test_truncation_is_explicit(capsys, tmp_path, tiny_llama_folder):
    code, out, _ = cli(capsys, "run", LONG, "--truncate", "--model", tiny_llama_folder)
    assert code == 0 and "next token" in out
    code, out, _ = cli(capsys, "capture", "--text", LONG, "--context-length", "100", "--model", tiny_llama_folder,
                       "--out", tmp_path / "c.zarr")  # fmt: skip
    assert code == 0 and open_cube(tmp_path / "c.zarr").n_tokens == 100


def test_context_check_comes_before_the_forward_pass(monkeypatch):
    model = tiny_model("llama")
    monkeypatch.setattr(model.hf, "forward", lambda *a, **k: pytest.fail("the model ran"))
    with pytest.raises(BadInputError, match="has 200 tokens"):
        model.tokenize(LONG)
    with pytest.raises(BadInputError, match="fewer new tokens"):
        from modelrecon.counterfactual.interventions import generate_with

        generate_with(model, "x" * 120, [], max_new_tokens=20)


# --- NaN and infinities ----------------------------------------------------------------------------------------------
def test_nan_weights_refused_at_load(capsys, tmp_path):
    folder = save_tiny_model(tmp_path / "m", "llama")
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][3, 4] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()  # the save's progress bar
    code, _, err = cli(capsys, "run", "hello", "--model", folder)
    assert_one_line_error(code, err, "weight 'model.layers.1.mlp.down_proj.weight' contains NaN or infinite")


def test_non_finite_activations_stop_the_capture(tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():
        model.layer_module(1, model.adapter.down_proj).weight[0, 0] = float("inf")  # in memory: no load-time check
    with pytest.raises(NonFiniteError, match=r"layers\.1\.resid_post is NaN or infinite at prompt 0, position 0"):
        capture(model, PROMPTS, tmp_path / "c.zarr", progress=False)


def test_float16_overflow_is_not_stored_as_infinity(tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():
        model.module("model.embed_tokens").weight.mul_(1e6)  # finite in float32, past float16's 65504
    with pytest.raises(NonFiniteError, match="more than a float16 cube holds; capture with --store-dtype float32"):
        capture(model, PROMPTS, tmp_path / "c.zarr", sites=["embed"], dtype="float16", progress=False)
    cube = capture(model, PROMPTS, tmp_path / "c32.zarr", sites=["embed"], dtype="float32", progress=False)
    assert np.isfinite(cube.get("embed")).all()


# --- argument errors -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv,message",
    [
        (["run", "hi", "--top", "-3"], "Invalid value for '--top'"),
        (["run"], "Missing argument"),
        (["run", "hi", "--no-such-option"], "No such option"),
        (["cube", "show", "x.zarr", "--html", "x.html", "--prompt", "one"], "Invalid value for '--prompt'"),
        (["no-such-command"], "No such command"),
    ],
)
def test_argument_errors_are_one_line(capsys, argv, message):
    code, _, err = cli(capsys, *argv)
    assert_one_line_error(code, err, message, "--help")
    assert "Traceback" not in err and "╭" not in err
