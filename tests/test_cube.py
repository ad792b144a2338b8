"""Activation cubes: values equal the hooks, resumable capture, reading with plain zarr, exports, views, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import modelrecon as mr
from modelrecon.cube import layout
from modelrecon.cube.export import export_cube, import_activity_cube, to_activity_cube
from modelrecon.cube.html import view_data
from modelrecon.errors import BadInputError, CubeError
from modelrecon.models.sites import site_name

from conftest import assert_one_line_error, cli, embedded_routes, web_addresses
from tiny import save_tiny_model, tiny_model

PROMPTS = ["Hello there, world!", "Hi", "The quick brown fox jumps", "abc def", "x"]
SITES = ["embed", "layers.*.resid_post", "layers.1.mlp.neurons", "layers.*.attn.heads", "logits"]


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2")


def _direct(model, prompts, batch_size):
    """What the hooks record, run in the same batches as the capture."""
    acts = {}
    for start in range(0, len(prompts), batch_size):
        result = mr.run(model, prompts[start : start + batch_size], record=SITES)
        for site, values in result.acts.items():
            acts.setdefault(site, []).extend(values)
    return acts


def test_a_cube_smaller_than_a_chunk_takes_the_size_of_its_tokens(model, tmp_path):
    out = tmp_path / "c.zarr"
    cube = mr.capture(model, "Hello there", out, sites=["layers.*.resid_post"], dtype="float32", progress=False)
    assert cube.metadata["capture"]["chunk_tokens"] == cube.n_tokens < 1024  # the default chunk is 1024 tokens
    values = cube.get("resid_post", prompt=0)
    chunks = [f for f in (out / "sites").rglob("*") if f.is_file() and f.name != "zarr.json"]
    assert sum(f.stat().st_size for f in chunks) == values.nbytes  # not padded to 1024 tokens
    hooks = mr.run(model, "Hello there", record=["layers.1.resid_post"]).acts["layers.1.resid_post"][0]
    assert np.array_equal(values[:, 1], hooks.numpy())


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_values_read_back_equal_the_hooks(model, tmp_path, dtype):
    cube = mr.capture(
        model, PROMPTS, tmp_path / "c.zarr", sites=SITES, dtype=dtype, batch_size=2, chunk_tokens=7, progress=False
    )
    direct = _direct(model, PROMPTS, batch_size=2)
    cast = torch.float32 if dtype == "float32" else torch.float16
    assert cube.site_kinds == ["embed", "attn.heads", "resid_post", "mlp.neurons", "logits"]  # model order
    for i in range(len(PROMPTS)):
        for kind in cube.site_kinds:
            layers = cube.layers(kind)
            names = [site_name(kind, layer) for layer in layers]
            expected = torch.stack([direct[n][i].flatten(1) for n in names], 1).to(cast).numpy()
            assert np.array_equal(cube.get(kind, prompt=i), expected), (kind, i)
        assert cube.str_tokens(i) == model.str_tokens(model.encode(PROMPTS[i]))
        assert cube.prompt_text(i) == PROMPTS[i]
    # Summaries are computed from the fp32 values before any cast.
    full = torch.stack([direct[f"layers.{layer}.resid_post"][2] for layer in range(model.n_layers)], 1)
    norms = cube.summaries("resid_post", "norm", prompt=2)
    np.testing.assert_allclose(norms, full.norm(dim=-1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(
        cube.summaries("resid_post", "frac_active", prompt=2), (full > 0).float().mean(-1), rtol=1e-6
    )
    std = full.double().std(-1, correction=0).float().numpy()
    np.testing.assert_allclose(cube.summaries("resid_post", "std", prompt=2), std, rtol=1e-4)
    np.testing.assert_allclose(cube.summaries("resid_post", "max", prompt=2), full.amax(-1).numpy())


def test_slices_xarray_and_top_examples(model, tmp_path):
    cube = mr.capture(model, PROMPTS, tmp_path / "c.zarr", sites=SITES, dtype="float32", progress=False)
    full = cube.get("resid_post")
    assert np.array_equal(cube.get("resid_post", layers=[2, 0], units=[5, 1]), full[:, [2, 0]][:, :, [5, 1]])
    assert np.array_equal(cube.get("resid_post", layers=1, units=slice(3, 9)), full[:, [1], 3:9])
    assert torch.equal(cube.get("resid_post", prompt=3, as_torch=True), torch.from_numpy(full[cube.prompt_tokens(3)]))
    array = cube.to_xarray("resid_post", prompt=2)
    assert array.dims == ("token", "layer", "unit") and list(array.layer.values) == [0, 1, 2]
    assert list(array.text.values) == cube.str_tokens(2)
    top = cube.top_examples("resid_post", layer=1, unit=4, k=3, window=2)
    column = full[:, 1, 4]
    assert [e.value for e in top] == sorted(column, reverse=True)[:3]
    best = int(np.argmax(column))
    prompt = int(cube.token_table()["prompt_index"][best])
    assert top[0].prompt == prompt and top[0].position == best - cube.prompt_tokens(prompt).start
    assert f"[[{top[0].token}]]" in top[0].context


def test_notebook_overview_names_sites_and_prompt(model, tmp_path):
    cube = mr.capture(model, PROMPTS, tmp_path / "c.zarr", sites=SITES, progress=False)
    page = cube._repr_html_()
    assert "5 prompts" in page and f"{cube.n_tokens} tokens" in page
    assert "resid_post" in page and f"{cube.n_tokens} × 3 × 32" in page and "0-2" in page
    assert "Hello there, world!" in page


def test_summaries_are_nan_safe_for_one_unit():
    stats = layout.summarise(torch.tensor([[[3.0]], [[-2.0]]])).numpy()
    assert not np.isnan(stats).any()
    assert stats[:, 0, layout.STATS.index("std")].tolist() == [0.0, 0.0]
    assert stats[:, 0, layout.STATS.index("norm")].tolist() == [3.0, 2.0]


PLAIN_READER = r"""
import hashlib, json, sys
import numpy as np, zarr
path = sys.argv[1]
attrs = json.load(open(f"{path}/zarr.json"))["attributes"]["modelrecon_cube"]
assert attrs["schema"] == "modelrecon.cube" and attrs["status"] == "complete"
group = zarr.open_group(path, mode="r")
offsets = group["prompts/token_offsets"][:]
text_bytes, text_offsets = group["tokens/text_bytes"][:].tobytes(), group["tokens/text_offsets"][:]
texts = [text_bytes[a:b].decode() for a, b in zip(text_offsets[:-1], text_offsets[1:])]
values = group["sites/resid_post"][int(offsets[1]):int(offsets[2])]
print(json.dumps({"layers": group["sites/resid_post"].attrs["layers"], "texts": texts[int(offsets[1]):int(offsets[2])],
                  "sha": hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest(),
                  "modelrecon_imported": "modelrecon" in sys.modules}))
"""


def test_plain_zarr_reads_a_cube_by_the_spec_alone(model, tmp_path):
    cube = mr.capture(model, PROMPTS, tmp_path / "c.zarr", sites=SITES, progress=False)
    out = subprocess.run(
        [sys.executable, "-c", PLAIN_READER, str(cube.path)], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    got = json.loads(out.stdout)
    assert got["modelrecon_imported"] is False
    assert got["layers"] == [0, 1, 2] and got["texts"] == cube.str_tokens(1)
    import hashlib

    assert got["sha"] == hashlib.sha256(np.ascontiguousarray(cube.get("resid_post", prompt=1)).tobytes()).hexdigest()


def _capture_command(folder, prompts_file, out):
    return [
        sys.executable,
        "-m",
        "modelrecon.cli",
        "capture",
        "--model",
        str(folder),
        "--prompts",
        str(prompts_file),
        "--out",
        str(out),
        "--sites",
        "layers.*.resid_post",
        "--sites",
        "layers.1.mlp.out",
        "--batch-size",
        "2",
        "--chunk-tokens",
        "32",
        "--store-dtype",
        "float32",
        "--attention",
    ]


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and str(p.relative_to(root)) != "zarr.json"
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tiny model folder, 800 prompts, and the cube of an uninterrupted capture of them."""
    root = tmp_path_factory.mktemp("corpus")
    folder = save_tiny_model(root / "tiny", "llama")
    prompts_file = root / "prompts.txt"
    rng = np.random.default_rng(0)
    prompts_file.write_text(
        "\n".join("".join(rng.choice(list("abcdefgh ,."), size=rng.integers(3, 30))) for _ in range(800))
    )
    straight = root / "straight.zarr"
    subprocess.run(_capture_command(folder, prompts_file, straight), env=_ENV, check=True, capture_output=True)
    return folder, prompts_file, straight


_ENV = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}


def _interrupt_mid_capture(command, out: Path, sig: int) -> subprocess.Popen:
    # A shell's background job ignores SIGINT and its children inherit that; Ctrl-C must reach this one.
    process = subprocess.Popen(command, env=_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        try:
            meta = json.loads((out / "zarr.json").read_text())["attributes"]["modelrecon_cube"]
            if meta["progress"]["tokens_written"] > 0:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    time.sleep(0.3)
    process.send_signal(sig)
    process.wait()
    return process


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_interrupted_capture_resumes_bit_identical(corpus, tmp_path, sig):
    folder, prompts_file, straight = corpus
    out = tmp_path / "interrupted.zarr"
    process = _interrupt_mid_capture(_capture_command(folder, prompts_file, out), out, sig)
    if sig == signal.SIGINT:  # Ctrl-C: a clean exit that says how to resume
        assert process.returncode == 130 and "re-run the same command to resume" in process.stderr.read()
    meta = json.loads((out / "zarr.json").read_text())["attributes"]["modelrecon_cube"]
    assert meta["status"] == "capturing", "the capture finished before it could be interrupted"
    total = meta["capture"]["n_tokens"]
    assert 0 < meta["progress"]["tokens_written"] < total
    with pytest.raises(CubeError, match="is not finished"):
        mr.open_cube(out)
    partial = mr.open_cube(out, allow_partial=True)
    assert partial.get("resid_post", prompt=0).shape[1] == 3

    subprocess.run(_capture_command(folder, prompts_file, out), env=_ENV, check=True, capture_output=True)
    resumed_files, straight_files = _files(out), _files(straight)
    assert resumed_files.keys() == straight_files.keys()
    assert all(resumed_files[name] == straight_files[name] for name in resumed_files)
    resumed = mr.open_cube(out)
    assert resumed.metadata["status"] == "complete" and resumed.n_tokens == total
    assert np.array_equal(resumed.get("resid_post"), mr.open_cube(straight).get("resid_post"))


def test_rerun_with_other_settings_is_refused(model, tmp_path):
    mr.capture(model, PROMPTS, tmp_path / "c.zarr", sites=["layers.0.resid_post"], progress=False)
    again = mr.capture(model, PROMPTS, tmp_path / "c.zarr", sites=["layers.0.resid_post"], progress=False)
    assert again.metadata["status"] == "complete"
    with pytest.raises(CubeError, match="holds a different capture"):
        mr.capture(model, PROMPTS, tmp_path / "c.zarr", sites=["layers.1.resid_post"], progress=False)


def test_write_failure_leaves_a_cube_that_does_not_look_finished(model, tmp_path):
    """A write fails in the middle of a capture (a folder stands where chunk 3 goes, as a full disk would fail it):
    a one-line error, and the cube stays unfinished, with the chunks before it recorded, and resumable."""
    from modelrecon.cube.capture import prepare

    settings = dict(sites=["layers.0.resid_post"], chunk_tokens=4)
    prepare(model, PROMPTS * 4, tmp_path / "c.zarr", **settings)
    blocker = tmp_path / "c.zarr" / "sites" / "resid_post" / "c" / "3" / "0" / "0"
    blocker.mkdir(parents=True)
    with pytest.raises(CubeError, match="writing the cube failed"):
        mr.capture(model, PROMPTS * 4, tmp_path / "c.zarr", progress=False, **settings)
    with pytest.raises(CubeError, match="is not finished"):
        mr.open_cube(tmp_path / "c.zarr")
    assert mr.open_cube(tmp_path / "c.zarr", allow_partial=True).tokens_written == 12  # chunks 0-2, not 3
    blocker.rmdir()
    resumed = mr.capture(model, PROMPTS * 4, tmp_path / "c.zarr", progress=False, **settings)
    straight = mr.capture(model, PROMPTS * 4, tmp_path / "d.zarr", progress=False, **settings)
    assert np.array_equal(resumed.get("resid_post"), straight.get("resid_post"))


def test_exports_hold_the_same_arrays(model, tmp_path):
    cube = mr.capture(model, PROMPTS, tmp_path / "c.zarr", sites=SITES, progress=False)
    export_cube(cube, tmp_path / "c.npz", "npz")
    export_cube(cube, tmp_path / "c.safetensors", "safetensors")
    from safetensors.numpy import load_file

    for arrays in (dict(np.load(tmp_path / "c.npz")), load_file(tmp_path / "c.safetensors")):
        assert set(arrays) == {*cube.site_kinds, "token_ids", "prompt_index", "position"}
        for kind in cube.site_kinds:
            assert np.array_equal(arrays[kind], cube.get(kind))
        assert np.array_equal(arrays["token_ids"], cube.token_table()["token_id"])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary files left


def test_activity_cube_json_round_trip(model, tmp_path):
    cube = mr.capture(model, PROMPTS, tmp_path / "c.zarr", sites=["layers.*.resid_post"], progress=False)
    doc = to_activity_cube(cube, "resid_post", prompt=2)
    assert [layer["layer_name"] for layer in doc["layers"]] == [f"layers.{i}.resid_post" for i in range(3)]
    assert doc["tokens"] == [str(t) for t in cube.token_ids(2).tolist()]
    (tmp_path / "a.json").write_text(json.dumps(doc))
    imported = import_activity_cube(tmp_path / "a.json", tmp_path / "imported.zarr")
    original = cube.summaries("resid_post", prompt=2)
    for stat in ("norm", "mean", "std"):
        np.testing.assert_array_equal(imported.summaries("imported", stat), original[..., layout.STATS.index(stat)])
    assert imported.str_tokens(0) == cube.str_tokens(2)
    with pytest.raises(CubeError, match="holds only summaries"):
        imported.get("imported")
    (tmp_path / "bad.json").write_text(json.dumps({"tokens": ["1"], "layers": [{"core_metrics": {}}]}))
    with pytest.raises(BadInputError, match="not an ActivityCube JSON file"):
        import_activity_cube(tmp_path / "bad.json", tmp_path / "bad.zarr")


def test_html_view_is_self_contained_and_shows_the_summaries(model, tmp_path):
    from modelrecon.web.notebook import cube_page

    cube = mr.capture(model, PROMPTS, tmp_path / "c.zarr", sites=["layers.*.resid_post"], progress=False)
    page = cube_page(cube, prompt=2, kind="resid_post", metric="max")
    assert not web_addresses(page) and "<script src" not in page
    data = embedded_routes(page)["/api/cube/c.zarr"]["view"]  # the view the page opens on
    assert data == view_data(cube, 2, "resid_post", "max")
    np.testing.assert_allclose(np.array(data["values"]), cube.summaries("resid_post", "max", prompt=2), rtol=1e-6)
    assert data["tokens"] == cube.str_tokens(2)


@pytest.mark.parametrize(
    "suffix,content", [(".txt", "first\n\nsecond\n"), (".jsonl", '{"text": "first"}\n{"text": "second"}\n')]
)
def test_prompt_files(suffix, content, tmp_path):
    from modelrecon.cube.prompts import read_prompts

    (tmp_path / f"p{suffix}").write_text(content)
    assert read_prompts(tmp_path / f"p{suffix}") == ["first", "second"]


def test_parquet_prompts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from modelrecon.cube.prompts import read_prompts

    pq.write_table(pa.table({"text": ["one", "two"], "other": [1, 2]}), tmp_path / "p.parquet")
    assert read_prompts(tmp_path / "p.parquet") == ["one", "two"]


# --- bad input through the CLI: one line, exit 2, no cube that looks finished ---------------------------------------
def test_cli_capture_info_show_export(capsys, tmp_path, tiny_llama_folder):
    out = tmp_path / "c.zarr"
    code, stdout, _ = cli(
        capsys,
        "capture",
        "--model",
        tiny_llama_folder,
        "--text",
        "hello world",
        "--text",
        "abc",
        "--sites",
        "layers.*.resid_post,final",
        "--out",
        out,
    )
    assert code == 0 and "2 prompts, 14 tokens" in stdout
    code, stdout, _ = cli(capsys, "cube", "info", out)
    assert code == 0 and "resid_post" in stdout and "14 × 3 × 32" in stdout and "bytes/token" in stdout
    code, stdout, _ = cli(
        capsys, "cube", "show", out, "--prompt", "1", "--site", "resid_post", "--html", tmp_path / "v.html"
    )
    assert code == 0 and (tmp_path / "v.html").is_file()
    code, _, _ = cli(capsys, "cube", "export", out, "--format", "npz", "--out", tmp_path / "c.npz")
    assert code == 0 and np.load(tmp_path / "c.npz")["resid_post"].shape == (14, 3, 32)
    code, _, _ = cli(capsys, "cube", "export", out, "--format", "activitycube", "--out", tmp_path / "a.json")
    code, stdout, _ = cli(capsys, "cube", "import", tmp_path / "a.json", "--out", tmp_path / "i.zarr")
    assert code == 0 and "11 tokens, 3 layers" in stdout


def test_cli_bad_cubes(capsys, tmp_path, tiny_llama_folder):
    assert_one_line_error(*cli(capsys, "cube", "info", tmp_path / "missing.zarr")[::2], "no cube at")
    (tmp_path / "corrupt.zarr").mkdir()
    (tmp_path / "corrupt.zarr" / "zarr.json").write_text("{not json")
    assert_one_line_error(*cli(capsys, "cube", "info", tmp_path / "corrupt.zarr")[::2], "missing or corrupt zarr.json")
    out = tmp_path / "c.zarr"
    cli(capsys, "capture", "--model", tiny_llama_folder, "--text", "hello", "--out", out)
    meta_file = out / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"]["modelrecon_cube"]["schema_version"] = 99
    (tmp_path / "future.zarr").mkdir()
    (tmp_path / "future.zarr" / "zarr.json").write_text(json.dumps(meta))
    assert_one_line_error(*cli(capsys, "cube", "info", tmp_path / "future.zarr")[::2], "schema version 99")
    assert_one_line_error(
        *cli(capsys, "cube", "show", out, "--site", "mlp.out", "--html", tmp_path / "v.html")[::2],
        "site kind 'mlp.out' was not captured",
    )
    assert not (tmp_path / "v.html").exists()


@pytest.mark.parametrize(
    "file_name,content,args,fragment",
    [
        ("p.csv", "a,b\n", ["--prompts", "{file}"], "unknown format '.csv'"),
        ("p.jsonl", '{"txt": "a"}\n', ["--prompts", "{file}"], 'has no string "text" field'),
        (None, None, ["--text", "a", "--sites", "layers.9.resid_post"], "unknown site"),
    ],
    ids=["unknown-format", "jsonl-without-text", "unknown-site"],
)
def test_cli_bad_capture_input(capsys, tmp_path, tiny_llama_folder, file_name, content, args, fragment):
    if file_name:
        (tmp_path / file_name).write_text(content)
    args = [a.format(file=tmp_path / (file_name or "")) for a in args]
    code, _, err = cli(capsys, "capture", "--model", tiny_llama_folder, *args, "--out", tmp_path / "c.zarr")
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "c.zarr").exists()


def test_cli_capture_to_a_read_only_place(capsys, tiny_llama_folder):
    target = Path("/sys/modelrecon-test.zarr")  # a read-only place, even for root
    code, _, err = cli(capsys, "capture", "--model", tiny_llama_folder, "--text", "a", "--out", target)
    if target.exists():
        pytest.skip("/sys is writable here")
    assert_one_line_error(code, err, "cannot write a cube")
