"""The viewer: its index and API over a folder of real results (a cube with attention, a traced graph with feature
dashboards, a patching sweep, an attribution-vs-patching report), its security (no name reaches outside the folder,
bad annotation posts are refused and write nothing, loopback by default), and the notebook page."""

import json

import numpy as np
import pytest
import torch
from starlette.testclient import TestClient

from modelrecon.circuits.attribute import attribute
from modelrecon.circuits.graph_file import save_graph
from modelrecon.circuits.prune import prune_graph
from modelrecon.circuits.replacement import ReplacementModel, encode
from modelrecon.cli import main
from modelrecon.cube.capture import capture
from modelrecon.dictionaries import Dictionary, DictionaryConfig
from modelrecon.explain.dashboards import feature_dashboards, graph_features, save_dashboards
from modelrecon.explain.explainers import explain_features
from modelrecon.explain.store import label_trace
from modelrecon.web.app import LOOPBACK_HOSTS, MAX_ANNOTATION_BYTES, create_app
from modelrecon.web.notebook import show

from conftest import web_addresses

PROMPT = "The cat sat on the mat"


def _transcoders(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for layer in range(model.n_layers):
        sites = (f"layers.{layer}.mlp.in",), (f"layers.{layer}.mlp.out",)
        d = Dictionary(DictionaryConfig("skip-transcoder", model.d_model, model.d_model, 40, "topk", 5, *sites))
        with torch.no_grad():
            for p in d.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
        out.append(d)
    return out


def _cli(*argv):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert not exit_info.value.code


def build_site(folder, model_folder):
    """A results folder like `make demo` leaves: cube, graph + dashboards, sweep, verify report."""
    from modelrecon import load

    model = load(str(model_folder))
    texts = ["the cat sat on the mat and the dog sat too", "a bird in the hand is worth two in the bush",
             "the quick brown fox jumps over the lazy dog", PROMPT]  # fmt: skip
    cube = capture(model, texts, folder / "corpus.zarr", sites=["layers.*.mlp.in", "layers.*.resid_post"],
                   dtype="float32", attention=True)  # fmt: skip
    rm = ReplacementModel(model, _transcoders(model))
    graph = prune_graph(attribute(model, PROMPT, rm, max_feature_nodes=40, progress=False))
    (folder / "trace").mkdir()
    save_graph(graph, folder / "trace" / "graph.json")
    save_dashboards(feature_dashboards(rm, graph_features(graph), cube), folder / "trace" / "features.json")
    document = explain_features(rm, cube, graph_features(graph), folder / "trace" / "explanations.json",
                                scorers=["detection", "simulation"], progress=False)  # fmt: skip
    label_trace(document, folder / "trace")  # labels on the graph's feature nodes, explanations in the dashboards
    pair = ["--clean", "ab cd", "--corrupt", "ab ce", "--answer", "x", "--wrong", "y", "--model", model_folder]
    _cli("patch", *pair, "--sweep", "resid_pre", "--json", folder / "patch.json")
    _cli("verify", *pair, "--sweep", "heads", "--json", folder / "verify.json")
    (folder / "notes.json").write_text('{"something": "else"}')  # not an artifact
    return model, rm, cube, graph


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_llama_folder):
    root = tmp_path_factory.mktemp("viewer")
    folder = root / "results"
    folder.mkdir()
    model, rm, cube, graph = build_site(folder, tiny_llama_folder)
    return {"root": root, "folder": folder, "model": model, "rm": rm, "cube": cube, "graph": graph}


@pytest.fixture()
def client(site):
    return TestClient(create_app(site["folder"]))


def test_index_lists_every_artifact(client):
    index = client.get("/api/index").json()
    kinds = {a["id"]: a["kind"] for a in index["artifacts"]}
    assert kinds == {"corpus.zarr": "cube", "trace/graph.json": "graph", "patch.json": "sweep",
                     "verify.json": "verify"}  # fmt: skip
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200


def test_feature_panel_shows_dashboards_computed_from_the_cube(client, site):
    graph = client.get("/api/graph/trace/graph.json").json()
    assert graph["has_dashboards"] and len(graph["graph"]["nodes"]) == site["graph"].n_nodes
    node = next(n for n in graph["graph"]["nodes"] if n["feature_type"] == "cross layer transcoder")
    panel = client.get("/api/feature/trace/graph.json", params={"node": node["node_id"]}).json()
    dashboard = panel["dashboard"]
    assert panel["node"]["node_id"] == node["node_id"] and dashboard["layer"] == node["mr_layer"]
    # oracle: the feature encoded straight from the cube's stored MLP inputs by the transcoder itself
    layer, feature = node["mr_layer"], node["mr_index"]
    x = torch.from_numpy(site["cube"].get("mlp.in", layers=[layer])[:, 0].astype(np.float32))
    acts = encode(site["rm"].transcoders[layer], x)[:, feature].detach().numpy()
    assert dashboard["max"] == pytest.approx(float(acts.max()), rel=1e-5)
    assert dashboard["frequency"] == pytest.approx(float((acts > 0).mean()))
    top = dashboard["top_examples"][0]
    assert top["value"] == pytest.approx(float(acts.max()), rel=1e-5) and top["acts"][top["focus"]] == pytest.approx(
        top["value"], abs=1e-4)  # fmt: skip
    assert sum(dashboard["histogram"]["counts"]) == int((acts > 0).sum())
    assert len(dashboard["top_logits"]) == 10 and dashboard["top_logits"][0][1] >= dashboard["top_logits"][-1][1]
    assert client.get("/api/feature/trace/graph.json", params={"node": "no_such_node"}).status_code == 404


def test_cube_attention_and_experiment_routes(client, site):
    cube = client.get("/api/cube/corpus.zarr", params={"kind": "resid_post", "metric": "max", "prompt": 3}).json()
    view = cube["view"]
    expected = site["cube"].summaries("resid_post", "max", prompt=3)
    assert np.allclose(np.array(view["values"], dtype=float), expected, rtol=1e-5)
    assert cube["attention_layers"]
    attention = client.get("/api/attention/corpus.zarr", params={"prompt": 3, "layer": 0}).json()
    assert np.allclose(np.array(attention["heads"]), site["cube"].attention(3, 0), atol=1e-5)
    sweep = client.get("/api/experiment/patch.json").json()
    assert sweep["kind"] == "sweep" and sweep["data"]["results"][0]["ci_low"] <= sweep["data"]["results"][0]["effect"]
    assert client.get("/api/experiment/verify.json").json()["data"]["method"] == "atp"
    for bad in ({"prompt": 99}, {"kind": "nope"}, {"metric": "nope"}, {"prompt": "x"}):
        assert client.get("/api/cube/corpus.zarr", params=bad).status_code in (400, 404)


TRAVERSALS = ["../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2e%2e/%2e%2e/etc/passwd", "/etc/passwd",
              "trace/../../outside.json", "corpus.zarr/../../outside.json", "nosuch.json"]  # fmt: skip


def test_symbolic_links_out_of_the_folder_are_not_served(site, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "graph.json").write_text((site["folder"] / "trace" / "graph.json").read_text())
    links = [site["folder"] / "linked-dir", site["folder"] / "linked.json", site["folder"] / "linked.zarr"]
    links[0].symlink_to(outside, target_is_directory=True)
    links[1].symlink_to(outside / "graph.json")
    links[2].symlink_to(site["cube"].path, target_is_directory=True)
    try:
        client = TestClient(create_app(site["folder"]))
        ids = {a["id"] for a in client.get("/api/index").json()["artifacts"]}
        assert not any(i.startswith("linked") for i in ids)
        for route in ("graph/linked-dir/graph.json", "graph/linked.json", "cube/linked.zarr"):
            assert client.get(f"/api/{route}").status_code == 404
    finally:
        for link in links:
            link.unlink()


@pytest.mark.parametrize("route", ["graph", "feature", "cube", "attention", "experiment"])
def test_names_never_reach_outside_the_folder(client, site, route):
    (site["root"] / "outside.json").write_text(json.dumps({"metadata": {"secret": 1}}))
    for name in TRAVERSALS:
        response = client.get(f"/api/{route}/{name}")
        assert response.status_code == 404, (route, name)
        assert "secret" not in response.text
    # a real artifact of another kind is not served through the wrong route either
    other = "corpus.zarr" if route != "cube" and route != "attention" else "trace/graph.json"
    assert client.get(f"/api/{route}/{other}").status_code == 404


def test_static_files_stay_in_their_folder(client):
    for name in ["../app.py", "..%2Fapp.py", "%2e%2e/app.py", "../../cli.py"]:
        response = client.get(f"/static/{name}")
        assert response.status_code == 404 and "Starlette" not in response.text, name


def test_bad_annotation_posts_are_refused_and_write_nothing(client, site):
    notes = site["folder"] / "trace" / "graph.annotations.json"
    before = sorted(p.name for p in site["root"].rglob("*"))
    url = "/api/annotations/trace/graph.json"
    node = next(n.id for n in site["graph"].nodes if n.kind == "feature")
    node_id = client.get("/api/graph/trace/graph.json").json()["graph"]["nodes"][0]["node_id"]
    cases = [
        (
            client.post(url, content=b"x" * (MAX_ANNOTATION_BYTES + 1), headers={"content-type": "application/json"}),
            413,
        ),
        (client.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400),
        (client.post(url, content=b'{"pinned": []}', headers={"content-type": "text/plain"}), 415),
        (client.post(url, json=[1, 2]), 422),
        (client.post(url, json={"pinned": ["no_such_node"]}), 422),
        (client.post(url, json={"pinned": [node_id], "extra": 1}), 422),
        (client.post(url, json={"supernodes": [{"name": "x" * 500, "nodes": [node_id]}]}), 422),
        (client.post(url, json={"labels": {node_id: "y" * 1000}}), 422),
        (client.post("/api/annotations/../outside.json", json={"pinned": []}), 404),
        (client.post("/api/annotations/corpus.zarr", json={"pinned": []}), 404),
    ]
    for response, status in cases:
        assert response.status_code == status, (response.status_code, response.text)
    assert client.get(url).status_code == 405  # read-only except POSTed annotations
    assert not notes.exists() and sorted(p.name for p in site["root"].rglob("*")) == before
    assert node  # the graph has feature nodes to pin


def test_annotations_round_trip(client, site):
    nodes = [n["node_id"] for n in client.get("/api/graph/trace/graph.json").json()["graph"]["nodes"]]
    saved = {"pinned": nodes[:2], "supernodes": [{"name": "subject", "nodes": nodes[:2]}], "labels": {nodes[0]: "cat"}}
    response = client.post("/api/annotations/trace/graph.json", json=saved)
    assert response.status_code == 200
    notes = site["folder"] / "trace" / "graph.annotations.json"
    assert json.loads(notes.read_text()) == saved
    assert client.get("/api/graph/trace/graph.json").json()["annotations"] == saved
    assert "graph.annotations.json" not in {a["id"] for a in client.get("/api/index").json()["artifacts"]}
    notes.unlink()


def test_loopback_by_default_and_foreign_hosts_refused(site, capsys):
    import inspect

    from modelrecon.cli.serve import serve

    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    guarded = TestClient(create_app(site["folder"], trusted_hosts=LOOPBACK_HOSTS), base_url="http://127.0.0.1")
    assert guarded.get("/api/index").status_code == 200
    assert guarded.get("/api/index", headers={"host": "attacker.example"}).status_code == 400  # DNS rebinding
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", str(site["root"] / "nowhere")])
    assert exit_info.value.code == 2 and "not a folder" in capsys.readouterr().err
    import socket

    with socket.create_server(("127.0.0.1", 0)) as busy:
        with pytest.raises(SystemExit) as exit_info:
            main(["serve", str(site["folder"]), "--port", str(busy.getsockname()[1])])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "cannot listen on 127.0.0.1" in err and len(err.strip().splitlines()) == 1


def test_notebook_page_embeds_the_same_front_end(site):
    from modelrecon.web.app import STATIC

    dashboards = json.loads((site["folder"] / "trace" / "features.json").read_text())
    view = show(site["graph"], dashboards)
    page = view.html
    assert (STATIC / "app.js").read_text().splitlines()[5] in page  # the served script, inline
    assert not web_addresses(page) and "<script src" not in page
    assert "<iframe srcdoc=" in view._repr_html_() and 'sandbox="allow-scripts"' in view._repr_html_()
    routes = json.loads(page.split("window.MR_EMBED = ", 1)[1].split(";</script>", 1)[0].replace("<\\/", "</"))[
        "routes"]  # fmt: skip
    features = [k for k in routes if k.startswith("/api/feature/")]
    assert len(features) == sum(n.kind == "feature" for n in site["graph"].nodes)
    cube_page = show(site["cube"]).html
    assert "/api/attention/corpus.zarr?prompt=0&layer=0" in cube_page


def test_serve_command_binds_loopback_and_answers(site):
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "modelrecon.cli", "serve", str(site["folder"]), "--port",
                                str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        line = process.stdout.readline()
        assert "bound to 127.0.0.1" in line and "loopback only" in line and f":{port}/" in line
        deadline, body = time.time() + 30, None
        while body is None and time.time() < deadline:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/index", timeout=2).read()
            except OSError:
                time.sleep(0.1)
        assert body is not None and json.loads(body)["root"] == site["folder"].name
    finally:
        process.terminate()
        process.wait(timeout=10)
