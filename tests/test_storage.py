"""Results on any fsspec URL: dictionaries, graphs and explanations written to and read from a real S3-compatible
server (moto's server mode on 127.0.0.1, s3fs as the client), and from file:// URLs; an interrupted remote write is
never read as complete; the viewer serves a remote folder lazily without reaching outside its prefix."""

import json
import tempfile
import uuid

import pytest
import torch
from starlette.testclient import TestClient

from modelrecon import storage
from modelrecon.circuits.graph_file import graph_to_json, load_graph, save_graph
from modelrecon.cli import main
from modelrecon.dictionaries import Dictionary, DictionaryConfig
from modelrecon.dictionaries.defaults import transcoders_by_name
from modelrecon.dictionaries.formats import (
    export_circuit_tracer,
    export_saelens,
    import_circuit_tracer,
    import_saelens,
    load_dictionaries,
    load_dictionary,
    save_dictionaries,
)
from modelrecon.dictionaries.hub import looks_like_hub_name, open_dictionaries
from modelrecon.errors import BadInputError
from modelrecon.explain.store import label_trace, load_explanations, new_document, resumable, save_explanations
from modelrecon.web.app import create_app
from test_graph import random_dag

from conftest import cli


def _dictionaries(n=2, width=24, d=16, seed=0, kind="skip-transcoder", activation="jumprelu"):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for layer in range(n):
        sites = (f"layers.{layer}.mlp.in",), (f"layers.{layer}.mlp.out",)
        dictionary = Dictionary(DictionaryConfig(kind, d, d, width, activation, None, *sites))
        with torch.no_grad():
            for p in dictionary.parameters():
                p.copy_(torch.rand(p.shape, generator=generator) * 0.3)  # positive: valid JumpReLU thresholds
        out.append(dictionary)
    return out


def _same(loaded, saved):
    assert len(loaded) == len(saved)
    for a, b in zip(loaded, saved, strict=True):
        assert a.config == b.config
        state_a, state_b = a.state_dict(), b.fold_normalisation().state_dict()
        assert state_a.keys() == state_b.keys()
        for key in state_a:
            assert torch.equal(state_a[key], state_b[key]), key


@pytest.fixture
def bucket(s3_server):
    """A fresh prefix of the test bucket for each test."""
    return f"{s3_server}/{uuid.uuid4().hex[:12]}"


def _keys(url):
    return storage.list_files(url)


def test_dictionaries_round_trip_on_s3(bucket):
    saved = _dictionaries()
    url = f"{bucket}/tc"
    assert save_dictionaries(saved, url) == url
    assert _keys(url) == ["config.json", "dictionary_0/config.json", "dictionary_0/dictionary.safetensors",
                          "dictionary_1/config.json", "dictionary_1/dictionary.safetensors"]  # fmt: skip
    _same(load_dictionaries(url), saved)
    _same(load_dictionaries(url + "/"), saved)
    # by name, as --transcoders / --dict read them: a URL is a storage location, not a hub repo
    assert not looks_like_hub_name(url)
    _same(open_dictionaries(url), saved)
    _same(transcoders_by_name(None, url), saved)  # the model is only needed for the default tiers
    # one member on its own, and a second save replaces the first
    _same([load_dictionary(f"{url}/dictionary_1")], saved[1:])
    other = _dictionaries(n=1, seed=5)
    storage.write_bytes(f"{url}-sibling/keep.txt", b"not under the prefix")
    save_dictionaries(other, url)
    assert _keys(url) == ["config.json", "dictionary_0/config.json", "dictionary_0/dictionary.safetensors"]
    assert storage.read_bytes(f"{url}-sibling/keep.txt") == b"not under the prefix"
    _same(load_dictionaries(url), other)


def test_foreign_formats_on_s3(bucket):
    saved = _dictionaries(n=2, activation="relu")
    export_circuit_tracer(saved, f"{bucket}/ct")
    assert "config.yaml" in _keys(f"{bucket}/ct")
    back = import_circuit_tracer(f"{bucket}/ct")
    assert [d.config.input_sites for d in back] == [d.config.input_sites for d in saved]
    for a, b in zip(open_dictionaries(f"{bucket}/ct"), saved, strict=True):
        assert torch.allclose(a.W_dec[0], b.fold_normalisation().W_dec[0])
    export_saelens(saved[0], f"{bucket}/sae")
    assert torch.equal(import_saelens(f"{bucket}/sae").W_enc, saved[0].fold_normalisation().W_enc)


def test_a_half_written_remote_dictionary_is_refused(bucket, monkeypatch):
    saved = _dictionaries()
    url = f"{bucket}/tc"
    fs, _ = storage.filesystem(url)  # fsspec hands the writer this same (cached) instance
    put_file, written = fs.put_file, []

    def failing_put(lpath, rpath, **kwargs):  # the connection drops on the last upload
        written.append(rpath.rsplit("/", 2)[-2:])
        if len(written) == 5:
            raise ConnectionResetError("connection reset by peer")
        return put_file(lpath, rpath, **kwargs)

    monkeypatch.setattr(fs, "put_file", failing_put)
    with pytest.raises(BadInputError, match="cannot write"):
        save_dictionaries(saved, url)
    monkeypatch.undo()
    assert written[-1] == ["tc", "config.json"]  # the index, the marker of a complete set, comes last
    left = _keys(url)
    assert len(left) == 4 and "config.json" not in left  # the members are there, the index is not
    for reader in (load_dictionaries, load_dictionary, open_dictionaries):
        with pytest.raises(BadInputError) as info:
            reader(url)
        message = str(info.value)
        assert "\n" not in message and f"'{url}' has no " in message and "config.json" in message
        assert "incomplete" in message
    # nothing at all there, and an existing folder of something else is never overwritten
    with pytest.raises(BadInputError, match="nothing at"):
        load_dictionaries(f"{bucket}/nothing")
    storage.write_bytes(f"{bucket}/other/notes.txt", b"mine")
    with pytest.raises(BadInputError, match="does not hold"):
        save_dictionaries(saved, f"{bucket}/other")
    assert _keys(f"{bucket}/other") == ["notes.txt"]
    # the leftovers of the interrupted save are replaced by the next one
    save_dictionaries(saved, url)
    _same(load_dictionaries(url), saved)


def test_a_damaged_remote_dictionary_names_the_url(bucket):
    url = f"{bucket}/tc"
    save_dictionaries(_dictionaries(n=1), url)
    storage.write_bytes(f"{url}/dictionary_0/dictionary.safetensors", b"not the weights")
    with pytest.raises(BadInputError) as info:
        load_dictionaries(url)
    message = str(info.value)
    assert f"{url}/dictionary_0/dictionary.safetensors" in message and "sha256" in message
    assert tempfile.gettempdir() not in message  # the temporary copy is not named


def test_graph_round_trip_on_s3(bucket):
    graph = random_dag(40, seed=2)
    url = f"{bucket}/trace/graph.json"
    assert save_graph(graph, url) == url
    assert json.loads(storage.read_bytes(url)) == json.loads(json.dumps(graph_to_json(graph, slug="graph")))
    back = load_graph(url)
    assert back.nodes == graph.nodes
    assert back.sources.tolist() == graph.sources.tolist() and back.targets.tolist() == graph.targets.tolist()
    assert torch.equal(back.weights, graph.weights.to(torch.float32)) and back.prompt == graph.prompt
    with pytest.raises(BadInputError, match="cannot read graph file"):
        load_graph(f"{bucket}/trace/missing.json")


def test_explanations_round_trip_on_s3(bucket):
    document = new_document("tiny", "tc", "corpus.zarr", "lexical", "v1", "lexical")
    document["features"]["1_3"] = {"layer": 1, "feature": 3, "explanation": "cats", "frequency": 0.1, "scores": {}}
    url = f"{bucket}/trace/explanations.json"
    assert not storage.exists(url) and resumable(url, "tiny", "lexical", "v1") is None
    save_explanations(document, url)
    assert load_explanations(url) == document
    assert resumable(url, "tiny", "lexical", "v1") == document
    with pytest.raises(BadInputError, match="write to another --out"):
        resumable(url, "another-model", "lexical", "v1")
    # labels written into a remote trace folder's graph
    graph = random_dag(30, seed=1)
    save_graph(graph, f"{bucket}/trace/graph.json")
    node = next(n for n in graph.nodes if n.kind == "feature")
    document["features"] = {f"{node.layer}_{node.feature}": {"layer": node.layer, "feature": node.feature,
                                                              "explanation": "dogs"}}  # fmt: skip
    nodes, dashboards = label_trace(document, f"{bucket}/trace")
    labelled = json.loads(storage.read_bytes(f"{bucket}/trace/graph.json"))
    dogs = [(n["mr_layer"], n["mr_index"]) for n in labelled["nodes"] if n.get("clerp") == "dogs"]
    assert nodes >= 1 and dashboards == 0 and dogs == [(node.layer, node.feature)] * nodes


def test_file_urls_are_local_paths(tmp_path):
    saved = _dictionaries(n=1)
    url = f"file://{tmp_path}/tc"
    save_dictionaries(saved, url)
    assert (tmp_path / "tc" / "config.json").is_file()
    _same(load_dictionaries(url), saved)
    _same(open_dictionaries(url), saved)
    graph = random_dag(20, seed=4)
    save_graph(graph, f"file://{tmp_path}/graph.json")
    assert load_graph(f"file://{tmp_path}/graph.json").nodes == graph.nodes
    document = new_document("tiny", "tc", "cube", "lexical", "v1", "lexical")
    save_explanations(document, f"file://{tmp_path}/explanations.json")
    assert load_explanations(tmp_path / "explanations.json") == document
    index = TestClient(create_app(f"file://{tmp_path}")).get("/api/index").json()
    assert {a["id"]: a["kind"] for a in index["artifacts"]} == {"graph.json": "graph"}


SWEEP = {"direction": "denoise", "metric": "logit_diff", "n_pairs": 1, "results": []}


@pytest.fixture
def remote_site(bucket):
    """A results folder on S3: a trace (graph, dashboards), a sweep, a file that is no artifact, a hidden folder; and
    beside the prefix, a graph that must never be served."""
    graph = random_dag(30, seed=3)
    folder = f"{bucket}/results"
    save_graph(graph, f"{folder}/trace/graph.json")
    storage.write_bytes(f"{folder}/trace/features.json", json.dumps({"features": {}}).encode())
    storage.write_bytes(f"{folder}/patch.json", json.dumps(SWEEP).encode())
    storage.write_bytes(f"{folder}/notes.json", b'{"something": "else"}')
    save_graph(graph, f"{folder}/.hidden/graph.json")
    secret = graph_to_json(graph)
    secret["metadata"]["prompt"] = "classified content"
    storage.write_bytes(f"{bucket}/results-outside/graph.json", json.dumps(secret).encode())
    storage.write_bytes(f"{bucket}/graph.json", json.dumps(secret).encode())
    return {"url": folder, "graph": graph, "bucket": bucket}


def test_viewer_serves_a_remote_folder(remote_site):
    url, graph = remote_site["url"], remote_site["graph"]
    client = TestClient(create_app(url))
    index = client.get("/api/index").json()
    assert index["root"] == "results"
    assert {a["id"]: a["kind"] for a in index["artifacts"]} == {"trace/graph.json": "graph", "patch.json": "sweep"}
    payload = client.get("/api/graph/trace/graph.json").json()
    assert payload["has_dashboards"] and payload["annotations"] == {}
    assert [n["node_id"] for n in payload["graph"]["nodes"]] == [n["node_id"] for n in graph_to_json(graph)["nodes"]]
    assert client.get("/api/experiment/patch.json").json()["data"] == SWEEP
    # annotations go to the remote folder, beside the graph
    node_ids = [n["node_id"] for n in payload["graph"]["nodes"]]
    saved = {"pinned": node_ids[:2], "supernodes": [], "labels": {node_ids[0]: "cat"}}
    assert client.post("/api/annotations/trace/graph.json", json=saved).status_code == 200
    assert json.loads(storage.read_bytes(f"{url}/trace/graph.annotations.json")) == saved
    assert client.get("/api/graph/trace/graph.json").json()["annotations"] == saved
    # a file written after the first listing is found (listed on request, not once)
    save_graph(graph, f"{url}/later/graph.json")
    assert client.get("/api/graph/later/graph.json").status_code == 200


def test_viewer_shows_a_remote_cube(remote_site, tmp_path):
    """A cube published into the remote folder: listed as one artifact (its chunks are not), its heatmap and
    attention read through Cube(url) equal the local cube's."""
    import numpy as np

    from modelrecon.cube.capture import capture

    from tiny import tiny_model

    texts = ["the cat sat on the mat", "a bird in the hand", "the quick brown fox"]
    local = capture(tiny_model("llama"), texts, tmp_path / "corpus.zarr", sites=["layers.*.resid_post"],
                    dtype="float32", attention=True)  # fmt: skip
    storage.publish_folder(tmp_path / "corpus.zarr", f"{remote_site['url']}/corpus.zarr", ("zarr.json",))
    client = TestClient(create_app(remote_site["url"]))
    kinds = {a["id"]: a["kind"] for a in client.get("/api/index").json()["artifacts"]}
    assert kinds == {"trace/graph.json": "graph", "patch.json": "sweep", "corpus.zarr": "cube"}
    cube = client.get("/api/cube/corpus.zarr", params={"kind": "resid_post", "metric": "max", "prompt": 2}).json()
    expected = local.summaries("resid_post", "max", prompt=2)
    assert np.allclose(np.array(cube["view"]["values"], dtype=float), expected, rtol=1e-5)
    attention = client.get("/api/attention/corpus.zarr", params={"prompt": 1, "layer": 0}).json()
    assert np.allclose(np.array(attention["heads"]), local.attention(1, 0), atol=1e-5)
    assert client.get("/api/cube/corpus.zarr", params={"prompt": 9}).status_code == 404


@pytest.mark.parametrize("route", ["graph", "feature", "cube", "attention", "experiment"])
def test_remote_names_never_reach_outside_the_prefix(remote_site, route):
    client = TestClient(create_app(remote_site["url"]))
    names = ["../graph.json", "..%2Fgraph.json", "%2e%2e/graph.json", "../results-outside/graph.json",
             "..%2Fresults-outside%2Fgraph.json", "/results-outside/graph.json", ".hidden/graph.json",
             "trace/../../graph.json", "s3://modelrecon-test/graph.json", "nosuch.json"]  # fmt: skip
    for name in names:
        response = client.get(f"/api/{route}/{name}")
        assert response.status_code == 404, (route, name, response.status_code)
        assert "classified" not in response.text
    assert client.post("/api/annotations/../results-outside/graph.json", json={"pinned": []}).status_code == 404
    assert "results-outside/graph.annotations.json" not in _keys(remote_site["bucket"])


def test_serve_command_serves_a_url(remote_site, monkeypatch, capsys):
    """`modelrecon serve s3://...` keeps the URL whole (a Path would make it 's3:/...') and serves it."""
    import socket

    import uvicorn

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.update(app=app, **kwargs))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", remote_site["url"], "--port", str(port)])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"serving {remote_site['url']} " in out and served["host"] == "127.0.0.1" and served["port"] == port
    client = TestClient(served["app"], base_url="http://127.0.0.1")
    assert {a["id"] for a in client.get("/api/index").json()["artifacts"]} == {"trace/graph.json", "patch.json"}
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", f"{remote_site['bucket']}/nothing"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"{remote_site['bucket']}/nothing is not a folder" in err


def test_cli_trains_to_a_url_and_resumes_from_a_cube_there(bucket, tiny_llama_folder, capsys):
    """`train --out s3://...` from a cube on S3: the dictionaries land there and load back; its checkpoint folder (in
    the user cache, keyed by the URL) is gone once the result is written."""
    cube = f"{bucket}/acts.zarr"
    code, _, err = cli(capsys, "capture", "--model", tiny_llama_folder, "--text", "Hello there, world! " * 8,
                           "--context-length", "128", "--sites", "layers.0.resid_post", "--out", cube)  # fmt: skip
    assert code == 0, err
    out = f"{bucket}/sae"
    code, stdout, err = cli(capsys, "train", "--model", tiny_llama_folder, "--site", "layers.0.resid_post",
                                "--width", "16", "--k", "4", "--tokens", "256", "--batch-size", "64", "--cube", cube,
                                "--out", out)  # fmt: skip
    assert code == 0 and "wrote 1 dictionary" in stdout, err
    from modelrecon.cli.dictionaries import _checkpoint_folder

    assert not _checkpoint_folder(out).exists()
    [loaded] = open_dictionaries(out)
    assert loaded.config.input_sites == ("layers.0.resid_post",) and loaded.config.width == 16
