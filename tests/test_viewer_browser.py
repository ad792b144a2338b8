"""The viewer in a real headless browser (Debian's Chromium driven by Playwright), with the network blocked: every
request must go to the local server, so a CDN reference would fail these tests. Screenshots go to
test-output/viewer/."""

import json
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from modelrecon.circuits.graph import Graph, Node
from modelrecon.circuits.graph_file import save_graph
from modelrecon.web.app import LOOPBACK_HOSTS, create_app
from modelrecon.web.notebook import show

from test_viewer import build_site

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parent.parent / "test-output" / "viewer"
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install -y chromium")


def big_graph(n_layers: int = 12, positions: int = 25, per_cell: int = 10, seed: int = 0) -> Graph:
    """~3,000 nodes: `per_cell` features per (layer, position), errors, embeddings and a logit, ~12 edges each."""
    generator = torch.Generator().manual_seed(seed)
    tokens = [f"t{p}" for p in range(positions)]
    nodes = [Node("feature", p, layer, f, 1.0 + float(torch.rand(1, generator=generator)), tokens[p])
             for layer in range(n_layers) for p in range(positions) for f in range(per_cell)]  # fmt: skip
    nodes += [Node("error", p, layer, token=tokens[p]) for layer in range(n_layers) for p in range(positions)]
    nodes += [Node("embedding", p, feature=100 + p, token=tokens[p]) for p in range(positions)]
    nodes.append(Node("logit", positions - 1, feature=7, activation=0.9, token="out"))
    layer_of = torch.tensor([n.layer if n.layer is not None else (-1 if n.kind == "embedding" else 99) for n in nodes])
    sources, targets = [], []
    for t, node in enumerate(nodes):
        if node.kind in ("feature", "logit"):
            below = (layer_of < (node.layer if node.kind == "feature" else 99)).nonzero().flatten()
            pick = below[torch.randperm(len(below), generator=generator)[:12]]
            sources += pick.tolist()
            targets += [t] * len(pick)
    weights = torch.randn(len(sources), generator=generator)
    return Graph("synthetic", tokens, list(range(positions)), "synthetic", nodes, torch.tensor(sources),
                 torch.tensor(targets), weights, {"n_layers": n_layers})  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_folder):
    import uvicorn

    folder = tmp_path_factory.mktemp("browser") / "results"
    folder.mkdir()
    build_site(folder, tiny_llama_folder)
    (folder / "big").mkdir()
    save_graph(big_graph(), folder / "big" / "graph.json")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(folder, trusted_hosts=LOOPBACK_HOSTS), host="127.0.0.1", port=port,
                            log_level="warning")  # fmt: skip
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not instance.started and time.time() < deadline:
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}", "folder": folder}
    instance.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield instance
        instance.close()


@pytest.fixture()
def page(browser, server):
    """A page whose every request outside the local server is aborted (and recorded)."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    blocked = []

    def gate(route):
        if route.request.url.startswith(server["url"]) or route.request.url.startswith("data:"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    context.route("**/*", gate)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not blocked, f"requests left the machine: {blocked}"
    assert not errors, errors


def shot(page, name):
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_graph_feature_panel_and_pins_survive_reload(page, server):
    page.goto(server["url"] + "/")
    page.wait_for_selector("a[data-kind=graph]")
    shot(page, "index")
    page.click("a[data-kind=graph] >> text=trace/graph.json")
    page.wait_for_selector("circle.node")
    feature = page.locator("circle.node[data-kind='cross layer transcoder']").first
    node_id = feature.get_attribute("data-id")
    feature.click()
    page.wait_for_selector("#top-examples .example")
    assert page.locator("#top-examples .example").count() > 0
    assert page.locator("#top-examples .example .focus").count() > 0  # the activating token is highlighted
    assert page.locator("#histogram rect").count() > 0
    # the feature's explanation is its label in the panel's title, and the dashboard shows it with its scores
    graph = json.loads((server["folder"] / "trace" / "graph.json").read_text())
    clerp = next(n["clerp"] for n in graph["nodes"] if n["node_id"] == node_id)
    assert clerp and clerp in page.locator("#panel-title").inner_text()
    assert clerp in page.locator("#explanation").inner_text()
    assert "control" in page.locator("#explanation-scores").inner_text()
    shot(page, "graph-feature-panel")
    page.click("#pin-node")
    page.click("#save-annotations")
    page.wait_for_function("document.getElementById('save-status').textContent === 'saved'")
    page.reload()
    page.wait_for_selector("circle.node.pinned")
    assert page.locator("circle.node.pinned").first.get_attribute("data-id") == node_id
    assert node_id in page.locator("#pinned-list").inner_text()
    saved = json.loads((server["folder"] / "trace" / "graph.annotations.json").read_text())
    assert saved["pinned"] == [node_id]
    (server["folder"] / "trace" / "graph.annotations.json").unlink()
    shot(page, "graph-pinned-after-reload")


def test_cube_heatmap_metric_switch_and_attention(page, server):
    page.goto(server["url"] + "/#/cube/corpus.zarr")
    page.wait_for_selector("#cube-heat td")
    before = page.eval_on_selector_all("#cube-heat td", "cells => cells.map(c => c.style.background)")
    page.select_option("#cube-metric", "max")
    page.wait_for_selector("#cube-heat[data-metric='max']")
    after = page.eval_on_selector_all("#cube-heat td", "cells => cells.map(c => c.style.background)")
    assert len(before) == len(after) and before != after
    page.wait_for_selector("#attn-canvas")
    page.select_option("#attn-head", "1")
    shot(page, "cube-max-attention")


def test_experiment_views(page, server):
    page.goto(server["url"] + "/#/experiment/patch.json")
    page.wait_for_selector("#sweep-heat td")
    assert "patching of resid_pre" in page.locator("h2").inner_text()
    data = json.loads((server["folder"] / "patch.json").read_text())
    assert page.locator("#sweep-heat td").count() == len(data["results"])
    shot(page, "sweep")
    page.goto(server["url"] + "/#/experiment/verify.json")
    page.wait_for_selector("#scatter circle.point")
    report = json.loads((server["folder"] / "verify.json").read_text())
    assert page.locator("#disagreements tr").count() == 1 + len(report["disagreements"])
    shot(page, "verify")


def test_three_thousand_node_graph_renders_and_answers_a_click_within_a_second(page, server):
    start = time.perf_counter()
    page.goto(server["url"] + "/#/graph/big%2Fgraph.json")
    page.wait_for_selector("circle.node[data-kind=logit]")
    load_seconds = time.perf_counter() - start
    n = page.locator("circle.node").count()
    assert n >= 3000
    click_ms = page.evaluate("""() => new Promise(resolve => {
        const node = document.querySelectorAll("circle.node[data-kind='cross layer transcoder']")[1500];
        const t0 = performance.now();
        node.dispatchEvent(new MouseEvent("click", {bubbles: true}));
        requestAnimationFrame(() => requestAnimationFrame(() => resolve(performance.now() - t0)));
    })""")
    assert page.locator("#panel-title").inner_text()
    shot(page, "graph-3000-nodes")
    report = {"nodes": n, "load_and_render_seconds": round(load_seconds, 3), "click_to_paint_ms": round(click_ms, 1)}
    (SHOTS / "timing.json").write_text(json.dumps(report))
    print(report)
    assert load_seconds < 5 and click_ms < 1000


def test_notebook_page_renders_offline(page, server):
    from modelrecon.circuits.graph_file import load_graph

    graph = load_graph(server["folder"] / "trace" / "graph.json")
    dashboards = json.loads((server["folder"] / "trace" / "features.json").read_text())
    page.set_content(show(graph, dashboards).html)
    page.wait_for_selector("circle.node")
    page.locator("circle.node[data-kind='cross layer transcoder']").first.click()
    page.wait_for_selector("#top-examples .example")
    shot(page, "notebook-graph")


def test_standalone_experiment_and_cube_pages_render_offline(page, server):
    from modelrecon.web.notebook import cube_page, experiment_page

    data = json.loads((server["folder"] / "patch.json").read_text())
    page.set_content(experiment_page("sweep", data, "patch.json"))
    page.wait_for_selector("#sweep-heat td")
    assert page.locator("#sweep-heat td").count() == len(data["results"])
    page.goto("about:blank")  # a fresh document: each page is a whole app
    page.set_content(cube_page(server["folder"] / "corpus.zarr", kind="resid_post", metric="max", prompt=1))
    page.wait_for_selector("#cube-heat[data-metric='max']")
    page.select_option("#cube-metric", "mean")  # switching works from the embedded answers too
    page.wait_for_selector("#cube-heat[data-metric='mean']")
    assert page.locator("#attn-canvas").count() == 1
