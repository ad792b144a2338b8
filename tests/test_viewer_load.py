"""The viewer under load: the real server (uvicorn on a free loopback port, in this process so its memory is this
process's) over a 10k-node graph, with 16 clients at once reading the graph and node panels and saving annotations.
Every answer is a 200 or a clean 4xx with a JSON error, concurrent saves all land (a client that sends the version it
loaded gets a 409 with the current annotations instead of overwriting them), the graph is parsed once, oversized and
malformed bodies are refused without the server's memory growing, and nothing is written outside the folder."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from modelrecon.circuits.graph import Graph, Node
from modelrecon.circuits.graph_file import graph_to_json, save_graph
from modelrecon.web import app as viewer_app
from modelrecon.web.app import LOOPBACK_HOSTS, MAX_ANNOTATION_BYTES, OpenedFiles, create_app

CLIENTS = 16
GRAPH = "big/graph.json"
MB = 1024 * 1024
# A connection per request: uvicorn closes a keep-alive connection idle for 5 s (a client busy parsing a 12 MB graph
# under the GIL can take that long), and httpx, unlike a browser, does not retry a request sent as it closes.
FRESH = httpx.Limits(max_keepalive_connections=0)


def synthetic_graph(n_layers: int = 16, positions: int = 25, per_cell: int = 24, fan_in: int = 12) -> Graph:
    """10,026 nodes with the defaults: `per_cell` features per (layer, position), an error node per (layer, position),
    the embeddings and a logit; each feature (and the logit) has `fan_in` inputs from earlier layers (115k edges)."""
    generator = torch.Generator().manual_seed(0)
    tokens = [f"t{p}" for p in range(positions)]
    nodes = [Node("embedding", p, feature=100 + p, token=tokens[p]) for p in range(positions)]
    first = torch.zeros(positions * (n_layers * (per_cell + 1)) + positions + 1, dtype=torch.long)
    for layer in range(n_layers):  # nodes are in layer order: a node's inputs are drawn from the nodes before its layer
        start = len(nodes)
        acts = (1 + torch.rand(positions * per_cell, generator=generator)).tolist()
        nodes += [Node("feature", p, layer, f, acts[p * per_cell + f], tokens[p])
                  for p in range(positions) for f in range(per_cell)]  # fmt: skip
        nodes += [Node("error", p, layer, token=tokens[p]) for p in range(positions)]
        first[start : len(nodes)] = start
    first[len(nodes)] = len(nodes)
    nodes.append(Node("logit", positions - 1, feature=7, activation=0.9, token="out"))
    fed = [i for i, n in enumerate(nodes) if n.kind in ("feature", "logit")]
    targets = torch.tensor(fed).repeat_interleave(fan_in)
    sources = (torch.rand(len(targets), generator=generator) * first[targets]).long()
    weights = torch.randn(len(targets), generator=generator)
    return Graph("synthetic", tokens, list(range(positions)), "synthetic", nodes, sources, targets, weights,
                 {"n_layers": n_layers})  # fmt: skip


def rss_kib(key: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/self/status")


def tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import uvicorn

    root = tmp_path_factory.mktemp("load")
    folder = root / "results"
    (folder / "big").mkdir(parents=True)
    graph = synthetic_graph()
    save_graph(graph, folder / GRAPH)
    app = create_app(folder, trusted_hosts=LOOPBACK_HOSTS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert server.started
    features = [n["node_id"] for n in graph_to_json(graph)["nodes"] if n["feature_type"] == "cross layer transcoder"]
    yield {"root": root, "folder": folder, "graph": graph, "features": features, "url": f"http://127.0.0.1:{port}",
           "app": app}  # fmt: skip
    server.should_exit = True
    thread.join(timeout=10)


def clean_answer(response: httpx.Response, allowed=(200,)) -> httpx.Response:
    """A 200 (or an allowed status), or a 4xx whose body is a JSON error: never a 500 or an HTML page."""
    assert response.status_code in allowed or 400 <= response.status_code < 500, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    if response.status_code >= 400:
        assert isinstance(response.json()["error"], str)
    return response


def test_sixteen_clients_read_and_annotate_a_10k_node_graph(served, monkeypatch):
    loads, scans = [], []
    real_load, real_scan = viewer_app._load_graph, viewer_app.scan
    monkeypatch.setattr(viewer_app, "_load_graph", lambda path: loads.append(path) or real_load(path))
    monkeypatch.setattr(viewer_app, "scan", lambda root: scans.append(root) or real_scan(root))
    served["app"].state.viewer.opened = OpenedFiles()  # start cold: all 16 clients arrive at an unparsed graph
    before = tree(served["root"])
    feature_ids = served["features"]
    url = served["url"]

    def client(k: int) -> dict:
        mine, statuses = feature_ids[k * 97], []
        with httpx.Client(base_url=url, timeout=60, limits=FRESH) as http:
            assert [a["id"] for a in clean_answer(http.get("/api/index")).json()["artifacts"]] == [GRAPH]
            payload = clean_answer(http.get(f"/api/graph/{GRAPH}")).json()
            assert len(payload["graph"]["nodes"]) == served["graph"].n_nodes
            panel = clean_answer(http.get(f"/api/feature/{GRAPH}", params={"node": mine})).json()
            assert panel["node"]["node_id"] == mine
            statuses.append(clean_answer(http.get(f"/api/feature/{GRAPH}", params={"node": "99_0_0"})).status_code)
            statuses.append(clean_answer(http.get("/api/graph/big%2F..%2F..%2Foutside.json")).status_code)
            notes, version = payload["annotations"], payload["annotations_version"]
            for _ in range(4 * CLIENTS):  # read-modify-write: a 409 carries what to build on
                change = {"pinned": [*notes.get("pinned", []), mine], "supernodes": notes.get("supernodes", []),
                          "labels": {**notes.get("labels", {}), mine: f"client {k}"}}  # fmt: skip
                saved = clean_answer(http.post(f"/api/annotations/{GRAPH}", json=change, headers={"If-Match": version}))
                statuses.append(saved.status_code)
                if saved.status_code == 200:
                    break
                assert saved.status_code == 409
                notes, version = saved.json()["annotations"], saved.json()["annotations_version"]
        return {"node": mine, "statuses": statuses}

    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(client, range(CLIENTS)))
    assert len(loads) == 1  # sixteen clients, one parse of the 10k-node graph
    # each client listed the folder and named a missing file: at most one scan each, fewer where they overlapped
    assert 1 <= len(scans) <= 2 * CLIENTS
    assert all(r["statuses"][:2] == [404, 404] and r["statuses"][-1] == 200 for r in results)
    on_disk = json.loads((served["folder"] / "big" / "graph.annotations.json").read_text())
    assert on_disk["labels"] == {r["node"]: f"client {k}" for k, r in enumerate(results)}
    assert sorted(on_disk["pinned"]) == sorted(r["node"] for r in results)
    with httpx.Client(base_url=url, limits=FRESH) as http:
        assert http.get(f"/api/graph/{GRAPH}").json()["annotations"] == on_disk
    assert tree(served["root"]) - before == {"results/big/graph.annotations.json"}  # no temporary file left behind
    (served["folder"] / "big" / "graph.annotations.json").unlink()


def test_saves_without_a_version_take_turns_and_the_last_one_stands_whole(served):
    nodes = served["features"][:CLIENTS]
    bodies = [{"pinned": [node], "labels": {node: "x" * 200}, "supernodes": [{"name": f"g{k}", "nodes": nodes}]}
              for k, node in enumerate(nodes)]  # fmt: skip

    def post(body: dict) -> int:
        with httpx.Client(base_url=served["url"], timeout=60, limits=FRESH) as http:
            return clean_answer(http.post(f"/api/annotations/{GRAPH}", json=body)).status_code

    with ThreadPoolExecutor(CLIENTS) as pool:
        assert list(pool.map(post, bodies)) == [200] * CLIENTS
    notes = served["folder"] / "big" / "graph.annotations.json"
    assert json.loads(notes.read_text()) in bodies  # one client's save, whole: never two interleaved
    notes.unlink()


def test_oversized_bodies_are_refused_without_the_server_growing(served):
    chunk = b" " * MB

    def twenty_megabytes():
        for _ in range(20):
            yield chunk

    url = f"{served['url']}/api/annotations/{GRAPH}"
    with httpx.Client(timeout=60, limits=FRESH) as http:
        clean_answer(http.get(f"{served['url']}/api/graph/{GRAPH}"))  # the graph opened before measuring
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident size (VmHWM) to the current size
        base = rss_kib("VmHWM")
        declared = http.post(url, content=twenty_megabytes(), headers={"content-type": "application/json",
                                                                       "content-length": str(20 * MB)})  # fmt: skip
        chunked = http.post(url, content=twenty_megabytes(), headers={"content-type": "application/json"})
        peak = rss_kib("VmHWM")
    for response in (declared, chunked):
        assert clean_answer(response).status_code == 413 and str(MAX_ANNOTATION_BYTES) in response.json()["error"]
    assert peak - base < 8 * 1024, f"peak resident size grew by {(peak - base) / 1024:.1f} MiB"
    assert not (served["folder"] / "big" / "graph.annotations.json").exists()


def test_malformed_and_invalid_annotations_are_refused_and_write_nothing(served):
    node = served["features"][0]
    before = tree(served["root"])
    json_type = {"content-type": "application/json"}
    cases = [
        (b"{not json", json_type, 400),
        (b"[" * MAX_ANNOTATION_BYTES, json_type, 400),  # nested past the parser's depth
        (b"\xff\xfe{}", json_type, 400),
        (json.dumps({"pinned": [node]}).encode(), {"content-type": "text/plain"}, 415),
    ]
    shapes = [
        [node],
        "pinned",
        {"pinned": node},
        {"pinned": [[node]]},
        {"pinned": [{"id": node}]},
        {"pinned": [7]},
        {"pinned": ["99_0_0"]},
        {"pinned": [node] * 5001},
        {"labels": [node]},
        {"labels": {node: 7}},
        {"labels": {node: "\ud800"}},
        {"labels": {"nope": "x"}},
        {"supernodes": {"name": "x", "nodes": [node]}},
        {"supernodes": [{"name": "x"}]},
        {"supernodes": [{"name": "", "nodes": [node]}]},
        {"supernodes": [{"name": "x", "nodes": []}]},
        {"supernodes": [{"name": ["x"], "nodes": [node]}]},
        {"supernodes": [{"name": "x", "nodes": [[node]]}]},
        {"supernodes": [{"name": "x", "nodes": [node], "y": 1}]},
        {"pinned": [node], "extra": True},
    ]
    cases += [(json.dumps(shape).encode(), json_type, 422) for shape in shapes]

    def post(case) -> tuple[int, int]:
        body, headers, expected = case
        with httpx.Client(base_url=served["url"], timeout=60, limits=FRESH) as http:
            response = http.post(f"/api/annotations/{GRAPH}", content=body, headers=headers)
        return clean_answer(response).status_code, expected

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(post, cases))
    assert [got for got, _ in answers] == [expected for _, expected in answers]
    assert tree(served["root"]) == before


def test_a_linked_annotations_file_is_neither_read_nor_written_through(served):
    outside = served["root"] / "outside.json"
    node = served["features"][0]
    secret = json.dumps({"pinned": [node], "labels": {node: "secret"}})
    outside.write_text(secret)
    link = served["folder"] / "big" / "graph.annotations.json"
    link.symlink_to(outside)
    try:
        with httpx.Client(base_url=served["url"], timeout=60, limits=FRESH) as http:
            payload = http.get(f"/api/graph/{GRAPH}").json()
            assert payload["annotations"] == {}
            assert clean_answer(http.post(f"/api/annotations/{GRAPH}", json={"pinned": [node]})).status_code == 200
        assert outside.read_text() == secret and not link.is_symlink()  # the link was replaced, not written through
    finally:
        link.unlink()
        outside.unlink()


def test_opened_files_are_a_bounded_lru_keyed_by_path_and_stamp(tmp_path):
    files = [tmp_path / f"{k}.json" for k in range(3)]
    for k, path in enumerate(files):
        path.write_text(json.dumps({"k": k}))
    loads = []

    def load(path):
        loads.append(path.name)
        time.sleep(0.05)  # long enough for the other threads to arrive while it loads
        return json.loads(path.read_text())

    opened = OpenedFiles(size=2)
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda _: opened.get("json", files[0], load)["k"], range(8))) == [0] * 8
    assert loads == ["0.json"]
    opened.get("json", files[1], load)
    opened.get("json", files[2], load)  # evicts 0.json, the least recently used
    assert len(opened) == 2 and loads == ["0.json", "1.json", "2.json"]
    opened.get("json", files[0], load)
    assert loads[-1] == "0.json"
    files[0].write_text(json.dumps({"k": "changed"}))
    assert opened.get("json", files[0], load)["k"] == "changed"
    files[1].write_text("{broken")  # a bad file is parsed once per version too, and fails the same way each time
    for _ in range(3):
        with pytest.raises(ValueError):
            opened.get("json", files[1], load)
    assert loads.count("1.json") == 2


def test_clients_waiting_for_a_scan_share_it_and_a_new_file_is_found(tmp_path, monkeypatch):
    """Eight requests arriving while a slow scan runs cost one more scan, not eight; a file written before a request
    is always found (no stale index)."""
    from modelrecon.web.app import Viewer

    scans = []
    real_scan = viewer_app.scan

    def slow_scan(root):
        scans.append(root)
        time.sleep(0.3)
        return real_scan(root)

    viewer = Viewer(tmp_path)
    monkeypatch.setattr(viewer_app, "scan", slow_scan)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: viewer.rescan(), range(8)))
    assert 1 <= len(scans) <= 2
    (tmp_path / "patch.json").write_text(json.dumps({"direction": "denoise", "metric": "logit_diff", "n_pairs": 1}))
    assert "patch.json" in viewer.rescan()
