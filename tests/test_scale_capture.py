"""Capture on a Ray cluster and on object storage: the cube is bit-identical to a single-process capture, a killed
worker is survived, and an interrupted capture resumes (with or without Ray, locally or on an S3 server)."""

import importlib
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from modelrecon.cube.capture import capture
from modelrecon.cube.reader import Cube

from conftest import assert_one_line_error, cli
from tiny import tiny_model

PROMPTS = [f"prompt {i}: " + "the quick brown fox jumps over the lazy dog"[: 5 + 3 * i] for i in range(12)]
SETTINGS = dict(sites=["layers.*.resid_post", "layers.*.mlp.out"], batch_size=3, chunk_tokens=16, attention=True)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    """One process with one torch thread, as each worker below has (CPU kernels split some sums by thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return capture(model, PROMPTS, tmp_path_factory.mktemp("ref") / "cube.zarr", progress=False, **SETTINGS)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """The reference's thread count in this process, for captures compared with it bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _files(root: Path) -> dict[str, bytes]:
    """Every stored file's bytes, keyed by path, except the root metadata (it holds the creation time)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} | {
        "zarr.json": b""
    }


def _assert_same_cube(cube: Cube, reference: Cube) -> None:
    assert cube.complete and cube.n_tokens == reference.n_tokens
    for kind in reference.site_kinds:
        np.testing.assert_array_equal(cube.get(kind), reference.get(kind))
        np.testing.assert_array_equal(cube.summaries(kind), reference.summaries(kind))
    for prompt in range(reference.n_prompts):
        np.testing.assert_array_equal(cube.attention(prompt), reference.attention(prompt))
    assert cube.str_tokens() == reference.str_tokens()
    meta, ref = dict(cube.metadata), dict(reference.metadata)
    for key in ("created",):
        meta.pop(key), ref.pop(key)
    assert meta == ref


def test_ray_capture_is_bit_identical_to_one_process(ray_cluster, model, reference, tmp_path):
    from modelrecon.scale.capture import capture_on_ray

    seen = []
    cube = capture_on_ray(model, PROMPTS, tmp_path / "cube.zarr", workers=2, segment_chunks=1, progress=False,
                          on_segment=lambda segment, pool: seen.append(segment), **SETTINGS)  # fmt: skip
    assert len(seen) == cube.metadata["progress"]["done_chunks"][0][1] > 4  # one task per chunk, all recorded
    _assert_same_cube(cube, reference)
    assert _files(Path(cube.path)) == _files(Path(reference.path))  # every chunk file byte for byte


def test_a_killed_worker_is_survived(ray_cluster, model, reference, tmp_path):
    from modelrecon.scale.capture import capture_on_ray

    killed = []

    def kill_one(segment, pool):
        if not killed:  # after the first segment: its worker has more queued, one is running or about to
            pid = ray_cluster.get(pool[0].pid.remote())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    cube = capture_on_ray(model, PROMPTS, tmp_path / "cube.zarr", workers=2, segment_chunks=1, progress=False,
                          on_segment=kill_one, **SETTINGS)  # fmt: skip
    assert killed
    _assert_same_cube(cube, reference)


def test_interrupted_ray_capture_resumes_in_one_process(ray_cluster, model, reference, tmp_path, one_thread):
    from modelrecon.scale.capture import capture_on_ray

    def stop_after_three(segment, pool, count=[]):  # noqa: B006 - a counter across calls
        count.append(segment)
        if len(count) == 3:
            raise KeyboardInterrupt

    out = tmp_path / "cube.zarr"
    with pytest.raises(KeyboardInterrupt):
        capture_on_ray(model, PROMPTS, out, workers=2, segment_chunks=1, progress=False, on_segment=stop_after_three,
                       **SETTINGS)  # fmt: skip
    meta = json.loads((out / "zarr.json").read_text())["attributes"]["modelrecon_cube"]
    assert meta["status"] == "capturing" and sum(b - a for a, b in meta["progress"]["done_chunks"]) == 3
    _assert_same_cube(capture(model, PROMPTS, out, progress=False, **SETTINGS), reference)


def test_capture_on_s3_is_interrupted_and_resumed(s3_server, model, reference, monkeypatch, one_thread):
    url = f"{s3_server}/interrupted/cube.zarr"
    calls = []
    capture_module = importlib.import_module("modelrecon.cube.capture")  # the package's `capture` is the function
    real_record = capture_module.record

    def record_then_stop(group, ranges):
        meta = real_record(group, ranges)
        calls.append(ranges)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as Ctrl-C between two chunks
        return meta

    monkeypatch.setattr(capture_module, "record", record_then_stop)
    with pytest.raises(KeyboardInterrupt):
        capture(model, PROMPTS, url, progress=False, **SETTINGS)
    monkeypatch.undo()
    partial = Cube(url, allow_partial=True)
    written = partial.tokens_written  # the two chunks, and those already queued (they finish after Ctrl-C)
    assert not partial.complete and 2 * SETTINGS["chunk_tokens"] <= written < partial.n_tokens
    np.testing.assert_array_equal(
        partial.get("resid_post", tokens=slice(0, written)), reference.get("resid_post")[:written]
    )
    cube = capture(model, PROMPTS, url, progress=False, **SETTINGS)
    assert cube.path == url
    _assert_same_cube(cube, reference)
    assert Cube(url).describe()["bytes_on_disk"] > 0


def test_cli_capture_to_s3_and_bad_ray_address(s3_server, tiny_llama_folder, capsys, tmp_path):
    url = f"{s3_server}/cli/cube.zarr"
    code, out, err = cli(capsys, "capture", "--model", tiny_llama_folder, "--text", "Hello there", "--out", url)
    assert code == 0, err
    assert url in out and Cube(url).str_tokens() == list("Hello there")  # one token a character
    code, out, err = cli(capsys, "capture", "--model", tiny_llama_folder, "--text", "Hello",
                         "--out", tmp_path / "x.zarr", "--ray", "127.0.0.1:1")  # fmt: skip
    assert_one_line_error(code, err, "Ray")
    assert not (tmp_path / "x.zarr").exists()  # refused before anything is written
