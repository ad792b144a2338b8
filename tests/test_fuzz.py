"""Property-based fuzzing (hypothesis): random damage to every file format modelrecon reads, and random values for
the main commands' arguments. The property: the reader either refuses in one line (on the command line: exit code 2,
one `error: ...` line on stderr, no traceback, nothing written) or, when the damage did not matter, gives the
undamaged result: byte for byte where the format can tell (cube exports, modelrecon dictionaries: checksummed), a
consistent one where it cannot (a changed number in a JSON file or an unchecked safetensors file reads as a number).

Bounded for CI: a fixed number of examples per test, derandomized (the same examples on every run), about a minute in
all on two CPU cores. Raw activation chunks have no checksum (docs/cube-format.md), so a flipped byte inside one
changes a value undetectably; the cube fuzz flips bytes everywhere else and only truncates, extends or deletes those.
"""

import contextlib
import io
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from modelrecon.circuits.batch import read_batch_prompts
from modelrecon.circuits.graph_file import load_graph, save_graph
from modelrecon.cli import main
from modelrecon.corpus.read import read_texts
from modelrecon.counterfactual.interventions import components_from_json
from modelrecon.counterfactual.pairs import read_pairs
from modelrecon.cube.capture import capture
from modelrecon.cube.prompts import read_prompts
from modelrecon.dictionaries.formats import export_circuit_tracer, load_dictionaries, save_dictionary
from modelrecon.dictionaries.model import Dictionary, DictionaryConfig
from modelrecon.errors import ModelreconError

from tiny import save_tiny_model, tiny_model

FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip


def run_cli(*argv) -> tuple[int, str, str]:
    """`modelrecon ARGV` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in argv])
            code = 0
        except SystemExit as exit_info:
            code = exit_info.code or 0
    return code, out.getvalue(), err.getvalue()


def assert_refused(code: int, err: str) -> None:
    """The command-line property for a refused input: exit 2 and one `error:` line, no traceback."""
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)


def assert_one_line(exc: ModelreconError) -> None:
    assert len(str(exc).splitlines()) == 1 and str(exc).strip(), str(exc)


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


# --- damage -----------------------------------------------------------------------------------------------------------
ACTIONS = ("delete", "truncate", "flip", "garbage", "extend")


@st.composite
def damage(draw, files: list[str], raw: frozenset = frozenset()):
    """(file, action, position, byte): one random change to one file. `raw` files keep their size (no flipped byte,
    no same-size garbage): without a checksum such a change is undetectable."""
    name = draw(st.sampled_from(files))
    actions = [a for a in ACTIONS if not (a in ("flip", "garbage") and name in raw)]
    return name, draw(st.sampled_from(actions)), draw(st.floats(0, 1)), draw(st.integers(1, 255))


def apply(path: Path, action: str, where: float, byte: int) -> None:
    data = path.read_bytes()
    at = min(int(where * len(data)), max(len(data) - 1, 0))
    if action == "delete":
        path.unlink()
    elif action == "truncate":
        path.write_bytes(data[:at])
    elif action == "flip" and data:
        path.write_bytes(data[:at] + bytes([data[at] ^ byte]) + data[at + 1 :])
    elif action == "garbage":
        path.write_bytes(bytes((byte * (i + 7)) % 256 for i in range(max(len(data), 16))))
    else:
        path.write_bytes(data + bytes([byte]) * 9)


# --- cubes ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cube_and_export(tmp_path_factory):
    """A small finished cube with several chunks per array, and its npz export (the undamaged result)."""
    folder = tmp_path_factory.mktemp("fuzz-cube")
    cube = capture(tiny_model("llama"), ["Hello there, world!", "The quick brown fox"], folder / "c.zarr",
                   sites=["layers.0.resid_post", "layers.2.resid_post"], dtype="float32", chunk_tokens=16,
                   progress=False)  # fmt: skip
    code, _, err = run_cli("cube", "export", cube.path, "--out", folder / "clean.npz")
    assert code == 0, err
    with np.load(folder / "clean.npz") as clean:
        return cube.path, {k: clean[k] for k in clean.files}


def test_damaged_cube(cube_and_export):
    cube, clean = cube_and_export
    files = sorted(p.relative_to(cube).as_posix() for p in cube.rglob("*") if p.is_file())
    raw = frozenset(f for f in files if f.startswith("sites/") and "/c/" in f)  # no checksum: see the docstring

    @FUZZ
    @given(damage(files, raw))
    def check(change):
        with tempfile.TemporaryDirectory() as temp:
            copy, out = Path(temp) / "c.zarr", Path(temp) / "out"
            shutil.copytree(cube, copy)
            out.mkdir()
            apply(copy / change[0], *change[1:])
            code, _, err = run_cli("cube", "export", copy, "--out", out / "x.npz")
            event(f"export: exit {code}")  # the balance shows in pytest --hypothesis-show-statistics
            if code == 0:
                with np.load(out / "x.npz") as got:
                    assert sorted(got.files) == sorted(clean) and all(np.array_equal(got[k], clean[k]) for k in clean)
            else:
                assert_refused(code, err)
                assert list(out.iterdir()) == []  # no output, not even a temporary file
            code, _, err = run_cli("cube", "info", copy)
            if code != 0:
                assert_refused(code, err)

    check()


# --- dictionary folders -----------------------------------------------------------------------------------------------
def _transcoder(layer: int) -> Dictionary:
    sites = {"input_sites": (f"layers.{layer}.mlp.in",), "output_sites": (f"layers.{layer}.mlp.out",)}
    dictionary = Dictionary(DictionaryConfig(kind="transcoder", d_in=8, d_out=8, width=6, activation="relu", **sites))
    with torch.no_grad():
        for parameter in dictionary.parameters():
            parameter.normal_()
    return dictionary.eval()


@pytest.fixture(scope="module")
def dictionary_folders(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-dict")
    save_dictionary(_transcoder(0), folder / "own")
    export_circuit_tracer([_transcoder(0), _transcoder(1)], folder / "circuit-tracer")
    return {name: (folder / name, load_dictionaries(folder / name)) for name in ("own", "circuit-tracer")}


@pytest.mark.parametrize("layout", ["own", "circuit-tracer"])
def test_damaged_dictionary_folder(dictionary_folders, layout):
    folder, originals = dictionary_folders[layout]
    files = sorted(p.name for p in folder.iterdir())

    @FUZZ
    @given(damage(files))
    def check(change):
        with tempfile.TemporaryDirectory() as temp:
            copy = Path(temp) / "d"
            shutil.copytree(folder, copy)
            apply(copy / change[0], *change[1:])
            try:
                loaded = load_dictionaries(copy)
            except ModelreconError as exc:
                assert_one_line(exc)
                return
            assert [d.config for d in loaded] == [d.config for d in originals] or layout != "own"
            for got, original in zip(loaded, originals, strict=True):
                for (name, value), (_, expected) in zip(got.state_dict().items(), original.state_dict().items(),
                                                        strict=True):  # fmt: skip
                    assert value.shape == expected.shape and torch.isfinite(value).all(), name
                    if layout == "own":  # checksummed: any change to the weights is refused
                        assert torch.equal(value, expected), name

    check()


# --- graph files ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph_file(tmp_path_factory):
    from modelrecon.circuits.components import component_graph

    model = tiny_model("llama")
    path = save_graph(component_graph(model, "Hi there", steps=2), tmp_path_factory.mktemp("fuzz-graph") / "g.json")
    return path, load_graph(path)


def test_damaged_graph_file(graph_file):
    path, original = graph_file

    @FUZZ
    @given(damage([path.name]))
    def check(change):
        with tempfile.TemporaryDirectory() as temp:
            copy = Path(temp) / path.name
            shutil.copy(path, copy)
            apply(copy, *change[1:])
            try:
                graph = load_graph(copy)
            except ModelreconError as exc:
                assert_one_line(exc)
                return
            # it loaded: a consistent graph that saves and loads again (a changed number is undetectable in JSON)
            assert len(graph.sources) == len(graph.targets) == len(graph.weights)
            assert int(graph.sources.max()) < graph.n_nodes and int(graph.targets.max()) < graph.n_nodes
            back = load_graph(save_graph(graph, Path(temp) / "again.json"))
            assert [n.id for n in back.nodes] == [n.id for n in graph.nodes]

    check()


# --- pairs, components and prompt files -------------------------------------------------------------------------------
PAIR = {"clean": "ab", "counterfactual": "cd", "answer": "x", "wrong": "y"}
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
TEXT_FILES = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.lists(JSON_VALUES, max_size=3).map(lambda v: "\n".join(json.dumps(x) for x in v).encode()),
    st.lists(st.fixed_dictionaries({k: st.one_of(st.just(v), JSON_VALUES) for k, v in PAIR.items()}), max_size=3).map(
        lambda v: "\n".join(json.dumps(x) for x in v).encode()
    ),
    JSON_VALUES.map(lambda v: json.dumps({"ablate": v}).encode()),
)
READERS = {
    "pairs.jsonl": read_pairs,
    "prompts.txt": read_prompts,
    "prompts.jsonl": read_prompts,
    "batch.jsonl": read_batch_prompts,
    "components.json": lambda path: components_from_json(path.read_text("utf-8", "replace"), str(path)),
    "corpus.jsonl": lambda path: list(read_texts(path)),
}
MAY_BE_EMPTY = {"corpus.jsonl"}  # a corpus file may hold no document; every other reader refuses an empty file


@pytest.mark.parametrize("name", READERS)
def test_random_text_files(name):
    @FUZZ
    @given(TEXT_FILES)
    def check(content):
        with tempfile.TemporaryDirectory() as temp:
            path = Path(temp) / name
            path.write_bytes(content)
            try:
                result = READERS[name](path)
            except ModelreconError as exc:
                assert_one_line(exc)
                event("refused")
                return
            event("accepted")
            assert result or name in MAY_BE_EMPTY

    check()


# --- command-line arguments -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("fuzz-model"), "llama")


ODD_TEXT = st.one_of(st.text(max_size=12), st.sampled_from(["", " ", "-1", "0", "1e9", "nan", "\x00", "ünï", "🙂"]))
ODD_INT = st.one_of(st.integers(-(10**12), 10**12), ODD_TEXT)


def mostly(*valid, odd=ODD_TEXT):
    """Plausible values three times in four (so commands get past argument parsing), odd ones otherwise."""
    plausible = st.sampled_from(valid) if not isinstance(valid[0], st.SearchStrategy) else valid[0]
    return st.integers(0, 3).flatmap(lambda pick: odd if pick == 0 else plausible)


PROMPT = mostly("Hello world", "x" * 200, "a")
NUMBER = mostly(st.integers(-1, 6), odd=ODD_INT)
POSITIVE = mostly(st.integers(1, 300), odd=ODD_INT)
SITE_KIND = mostly("resid_post", "mlp.out")
SITES = mostly("layers.*.resid_post", "layers.1.mlp.out", "embed", "layers.9.resid_post")
FORMAT = mostly("npz", "safetensors", "activitycube", "csv")
METRIC = mostly("norm", "mean", "std", "max", "frac_active")


def test_random_cube_arguments(cube_and_export):
    cube, _ = cube_and_export

    @FUZZ
    @given(st.sampled_from(["export", "show", "info"]), NUMBER, SITE_KIND, FORMAT, METRIC,
           mostly(None, odd=st.sampled_from(["missing.zarr", "a-file"])))  # fmt: skip
    def check(command, prompt, site, fmt, metric, target):
        with tempfile.TemporaryDirectory() as temp:
            out = Path(temp)
            (out / "a-file").write_text("not a cube")
            where = cube if target is None else out / target
            argv = {
                "export": ["--out", out / "x.out", "--format", fmt, "--prompt", prompt, "--site", site],
                "show": ["--html", out / "x.html", "--prompt", prompt, "--site", site, "--metric", metric],
                "info": [],
            }[command]
            before = files_under(out)
            code, _, err = run_cli("cube", command, where, *argv)
            event(f"{command}: {err.split(':')[1].strip()[:30] if code else 'exit 0'}")
            if code != 0:
                assert_refused(code, err)
                assert files_under(out) == before
            else:
                assert command == "info" or len(files_under(out)) == len(before) + 1

    check()


def test_random_model_arguments(model_folder):
    @FUZZ
    @given(st.sampled_from(["run", "capture"]), PROMPT, POSITIVE, POSITIVE, SITES)
    def check(command, prompt, number, other, sites):
        with tempfile.TemporaryDirectory() as temp:
            out = Path(temp)
            argv = {
                "run": ["run", prompt, "--top", number],
                "capture": [
                    "capture",
                    "--text",
                    prompt,
                    "--sites",
                    sites,
                    "--batch-size",
                    number,
                    "--context-length",
                    other,
                    "--out",
                    out / "c.zarr",
                ],  # fmt: skip
            }[command]
            code, _, err = run_cli(*argv, "--model", model_folder)
            event(f"{command}: {err.split(':')[1].strip()[:30] if code else 'exit 0'}")
            if code != 0:
                assert_refused(code, err)
                assert files_under(out) == set()

    check()
