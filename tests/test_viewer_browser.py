"""The viewer in a real headless browser (Debian's Chromium driven by Playwright), with the network blocked: every
request must go to the local server, so a CDN reference would fail these tests. Screenshots go to
test-output/viewer/, or with MR_VIEWER_DOCS=1 (benchmarks/viewer_screenshots.py) also to docs/images/ for
docs/viewer.md."""

import json
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from modelrecon.circuits.graph import Graph, Node
from modelrecon.circuits.graph_file import save_graph
from modelrecon.cube.reader import Cube
from modelrecon.web.app import LOOPBACK_HOSTS, create_app
from modelrecon.web.notebook import show

from test_viewer import PROMPT, build_site

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parent.parent
SHOTS = REPO / "test-output" / "viewer"
DOCS_SHOTS = REPO / "docs" / "images" if os.environ.get("MR_VIEWER_DOCS") else None
SINK = 200.0  # the first position's embedding is scaled by this in the sink cube: its norm ends up 40-80x the rest
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


def sink_cube(model_folder, out):
    """A real capture of the tiny model with its first position's embedding scaled by SINK: the first token's norm is
    tens of times the other tokens' at every layer, as the attention sink makes it in real models."""
    from modelrecon import load
    from modelrecon.cube.capture import capture

    model = load(str(model_folder))

    def scale_first(module, args, output):
        output = output.clone()
        output[:, 0] *= SINK
        return output

    handle = model.hf.get_input_embeddings().register_forward_hook(scale_first)
    try:
        return capture(model, [PROMPT + " and the dog sat on the log"], out, sites=["layers.*.resid_post"],
                       dtype="float32", batch_size=1, progress=False)  # fmt: skip
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_folder):
    import uvicorn

    folder = tmp_path_factory.mktemp("browser") / "results"
    folder.mkdir()
    build_site(folder, tiny_llama_folder)
    sink_cube(tiny_llama_folder, folder / "sink.zarr")
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


DOCS_LIMIT = 200 * 1024
# Chromium re-encodes a PNG with 16 levels per channel: hundreds of faint, anti-aliased graph edges otherwise make a
# screenshot several times the docs' size limit
POSTERIZE = """async src => {
  const img = new Image(); img.src = src; await img.decode();
  const canvas = document.createElement("canvas"); canvas.width = img.width; canvas.height = img.height;
  const ctx = canvas.getContext("2d"); ctx.drawImage(img, 0, 0);
  const pixels = ctx.getImageData(0, 0, canvas.width, canvas.height);
  for (let i = 0; i < pixels.data.length; i++) if (i % 4 !== 3) pixels.data[i] &= 0xf0;
  ctx.putImageData(pixels, 0, 0);
  return canvas.toDataURL("image/png").split(",")[1];
}"""


def shot(page, name, docs=None):
    """A full-page screenshot in test-output/viewer/; with `docs` (a selector) and MR_VIEWER_DOCS set, that element
    also goes to docs/images/viewer-NAME.png (posterized where it would pass 200 KB)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
    if docs and DOCS_SHOTS:
        import base64

        DOCS_SHOTS.mkdir(parents=True, exist_ok=True)
        png = page.locator(docs).first.screenshot()
        if len(png) > DOCS_LIMIT:
            png = base64.b64decode(page.evaluate(POSTERIZE, "data:image/png;base64," + base64.b64encode(png).decode()))
        (DOCS_SHOTS / f"viewer-{name}.png").write_bytes(png)


def tick_texts(page, selector):
    return [t for t in page.eval_on_selector_all(selector + " .tick text", "ts => ts.map(t => t.textContent)") if t]


def fills(page, selector):
    return page.eval_on_selector_all(selector, "cells => cells.map(c => c.getAttribute('fill'))")


def tok_text(token, limit=12):
    """The viewer's label of a token (app.js `tokText`)."""
    text = json.dumps(token, ensure_ascii=False)[1:-1].replace(" ", "\u2423")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def assert_token_ticks(page, chart, tokens):
    """The x axis of a heatmap: at least a few ticks, each the label of the token of its column."""
    ticks = page.eval_on_selector_all(chart + " .x-axis .tick", "ts => ts.map(t => [+t.dataset.col, t.textContent])")
    assert len(ticks) >= min(4, len(tokens)), ticks
    for col, text in ticks:
        assert text == tok_text(tokens[col]), (col, text)


def rgb(colour):
    """(r, g, b) of a d3 colour string: 'rgb(r, g, b)' or '#rrggbb'."""
    if colour.startswith("#"):
        return tuple(int(colour[k : k + 2], 16) for k in (1, 3, 5))
    return tuple(int(float(v)) for v in colour[colour.index("(") + 1 : -1].split(","))


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
    assert tick_texts(page, "#histogram .x-axis") and tick_texts(page, "#histogram .y-axis")
    assert "activation" in page.locator("#histogram").text_content()
    # the feature's explanation is its label in the panel's title, and the dashboard shows it with its scores
    graph = json.loads((server["folder"] / "trace" / "graph.json").read_text())
    clerp = next(n["clerp"] for n in graph["nodes"] if n["node_id"] == node_id)
    assert clerp and clerp in page.locator("#panel-title").inner_text()
    assert clerp in page.locator("#explanation").inner_text()
    assert "control" in page.locator("#explanation-scores").inner_text()
    shot(page, "graph-feature-panel")
    shot(page, "dashboard", docs="#panel")
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
    page.wait_for_selector("#cube-heat rect.cell")
    before = fills(page, "#cube-heat rect.cell")
    page.select_option("#cube-metric", "max")
    page.wait_for_selector("#cube-heat[data-metric='max']")
    after = fills(page, "#cube-heat rect.cell")
    assert len(before) == len(after) and before != after
    assert "max" in page.locator("#cube-heat .legend-title").text_content()
    page.wait_for_selector("#attn-heat rect.cell")
    head0 = fills(page, "#attn-heat rect.cell")
    page.select_option("#attn-head", "1")
    assert fills(page, "#attn-heat rect.cell") != head0
    # attention: query tokens down, key tokens across, a legend with its unit
    tokens = Cube(server["folder"] / "corpus.zarr").str_tokens(0)
    assert_token_ticks(page, "#attn-heat", tokens)
    assert set(tick_texts(page, "#attn-heat .y-axis")) <= {tok_text(t) for t in tokens}
    assert "attention weight (probability" in page.locator("#attn-heat .legend-title").text_content()
    assert tick_texts(page, "#attn-heat .legend")
    shot(page, "cube-max-attention")
    shot(page, "attention", docs="#attention")


def test_experiment_views(page, server):
    page.goto(server["url"] + "/#/experiment/patch.json")
    page.wait_for_selector("#sweep-heat rect.cell")
    assert "patching of resid_pre" in page.locator("h2").inner_text()
    data = json.loads((server["folder"] / "patch.json").read_text())
    assert page.locator("#sweep-heat rect.cell").count() == len(data["results"])
    # axes: layers down, the patched tokens across; a diverging legend centred on 0 naming the metric
    assert tick_texts(page, "#sweep-heat .y-axis")[0] == "L0"
    assert len(tick_texts(page, "#sweep-heat .x-axis")) == data["shape"][1]
    assert f"effect on {data['metric']}" in page.locator("#sweep-heat .legend-title").text_content()
    assert "0" in tick_texts(page, "#sweep-heat .legend")
    colours = fills(page, "#sweep-heat rect.cell")
    for cell, colour in zip(data["results"], colours, strict=True):  # blue restores the clean answer, red moves away
        r, _, b = rgb(colour)
        if cell["effect"] is not None and abs(cell["effect"]) > 0.05:
            assert (b > r) == (cell["effect"] > 0), (cell, colour)
    shot(page, "sweep", docs="#main")
    page.goto(server["url"] + "/#/experiment/verify.json")
    page.wait_for_selector("#scatter circle.point")
    report = json.loads((server["folder"] / "verify.json").read_text())
    assert page.locator("#disagreements tr").count() == 1 + len(report["disagreements"])
    assert tick_texts(page, "#scatter .x-axis") and tick_texts(page, "#scatter .y-axis")
    scatter = page.locator("#scatter").text_content()
    assert "exact patching effect" in scatter and f"{report['method']} estimate" in scatter
    assert "disagreement" in scatter
    shot(page, "verify", docs="#main")


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
    page.wait_for_selector("#sweep-heat rect.cell")
    assert page.locator("#sweep-heat rect.cell").count() == len(data["results"])
    page.goto("about:blank")  # a fresh document: each page is a whole app
    page.set_content(cube_page(server["folder"] / "corpus.zarr", kind="resid_post", metric="max", prompt=1))
    page.wait_for_selector("#cube-heat[data-metric='max']")
    page.select_option("#cube-metric", "mean")  # switching works from the embedded answers too
    page.wait_for_selector("#cube-heat[data-metric='mean']")
    page.wait_for_selector("#attn-heat rect.cell")
    assert tick_texts(page, "#attn-heat .x-axis")


def test_cube_colour_scale_is_not_dominated_by_the_first_position(page, server):
    cube = Cube(server["folder"] / "sink.zarr")
    norms = cube.summaries("resid_post", "norm", prompt=0)  # [token, layer]
    assert (norms[0] > 30 * np.median(norms[1:], axis=0)).all()  # the sink: the first token dwarfs the rest
    page.goto(server["url"] + "/#/cube/sink.zarr")
    page.wait_for_selector("#cube-heat rect.cell")
    tokens = cube.str_tokens(0)
    assert_token_ticks(page, "#cube-heat", tokens)
    assert tick_texts(page, "#cube-heat .y-axis") == [f"L{k}" for k in cube.layers("resid_post")]
    assert "norm (L2 norm over the site's units)" in page.locator("#cube-heat .legend-title").text_content()
    assert len(tick_texts(page, "#cube-heat .legend")) >= 3
    assert "position 0 left out" in page.locator("#cube-scale-note").inner_text()
    assert tick_texts(page, "#cube-line .x-axis") and tick_texts(page, "#cube-line .y-axis")

    def others():  # the cells of every token but the first
        return fills(page, "#cube-heat rect.cell:not([data-col='0'])")

    readable = others()
    assert len(readable) == (len(tokens) - 1) * len(cube.layers("resid_post"))
    assert len(set(readable)) > len(readable) / 2  # the other tokens' cells are told apart
    shot(page, "cube", docs="#main")
    # the plain min-to-max scale with the first position in its domain: the washed-out picture of the issue
    page.uncheck("#cube-skip-first")
    page.select_option("#cube-scale", "linear")
    washed = others()
    assert len(set(washed)) < len(set(readable)) / 3
    page.select_option("#cube-scale", "log")  # symlog tells them apart even with the first position in
    assert len(set(others())) > 2 * len(set(washed))


def test_graph_labels_legend_axes_edge_weights_and_zoom(page, server):
    graph = json.loads((server["folder"] / "trace" / "graph.json").read_text())
    page.goto(server["url"] + "/#/graph/trace%2Fgraph.json")
    page.wait_for_selector(".node-labels text")
    labels = page.eval_on_selector_all(".node-labels text", "ts => ts.map(t => t.textContent)")
    for node in graph["nodes"]:  # every token and the logit carry their text
        if node["feature_type"] == "embedding":
            assert tok_text(node["token"], 40) in labels, node
        if node["feature_type"] == "logit":
            assert "→" + tok_text(node["token"], 40) in labels, node
    box = page.locator(".node-labels text").first.bounding_box()
    assert box and box["width"] > 0 and box["height"] > 0
    legend = page.locator("#graph-legend").inner_text()
    for text in ("token embedding", "output logit", "transcoder feature", "positive edge", "negative edge"):
        assert text in legend
    tokens = graph["metadata"]["prompt_tokens"]
    assert tok_text(tokens[0]) in tick_texts(page, ".graph-svg .x-axis")
    n_layers = graph["metadata"]["modelrecon"]["n_layers"]
    assert tick_texts(page, ".graph-svg .y-axis") == ["emb", *(f"L{k}" for k in range(n_layers)), "out"]
    # a click draws the node's strongest edges; hovering one shows its weight
    page.locator("circle.node[data-kind=logit]").first.click()
    page.wait_for_selector(".highlight line")
    line = page.locator(".highlight line").first
    shown = page.evaluate("w => String(+(+w).toPrecision(4))", line.get_attribute("data-weight"))  # app.js fmt
    line.dispatch_event("mouseover")
    assert f"edge weight {shown}" in page.locator("#tip").inner_text()
    line.dispatch_event("mouseout")
    shot(page, "graph", docs="#main")

    # zoom and pan on the 3,000-node graph: the transform changes and more nodes get room for a label
    page.goto(server["url"] + "/#/graph/big%2Fgraph.json")
    page.wait_for_selector(".node-labels text")
    features = ".node-labels text.cross-layer-transcoder"
    assert page.locator(features).count() == 0  # ten to a column: no room for their labels at 1x
    assert page.locator("g.viewport").get_attribute("transform") in (None, "")
    svg = page.locator("svg.graph-svg").bounding_box()
    node = page.locator("circle.node[data-kind='cross layer transcoder']").nth(1500).bounding_box()
    page.mouse.move(node["x"] + node["width"] / 2, node["y"] + node["height"] / 2)  # zoom in around a feature
    page.mouse.wheel(0, -1200)
    page.mouse.wheel(0, -1200)  # ~28x: ten features share a column a few pixels wide at 1x
    page.wait_for_function("(document.querySelector('g.viewport').getAttribute('transform') || '').includes('scale')")
    page.wait_for_timeout(100)  # labels are redrawn on the next frame
    transform = page.locator("g.viewport").get_attribute("transform")
    scale = float(transform.split("scale(")[1].rstrip(")"))
    assert scale > 3
    assert page.locator(features).count() > 0
    shot(page, "graph-zoomed", docs="svg.graph-svg")
    page.mouse.down()
    page.mouse.move(svg["x"] + svg["width"] / 2 + 120, svg["y"] + svg["height"] / 2 + 40, steps=4)
    page.mouse.up()
    assert page.locator("g.viewport").get_attribute("transform") != transform  # panned
    page.click("#zoom-reset")
    assert page.locator("g.viewport").get_attribute("transform") == "translate(0,0) scale(1)"


def test_lens_page_renders_offline(page, server, tiny_llama_folder):
    from modelrecon import load
    from modelrecon.attribution.html import lens_html
    from modelrecon.attribution.lens import logit_lens

    lens = logit_lens(load(str(tiny_llama_folder)), PROMPT, target="e")
    page.set_content(lens_html(lens))
    page.wait_for_selector("#lens-heat rect.cell")
    assert page.locator("#lens-heat rect.cell").count() == len(lens.rows) * len(lens.tokens)
    assert_token_ticks(page, "#lens-heat", lens.tokens)
    assert tick_texts(page, "#lens-heat .y-axis") == lens.rows
    texts = page.eval_on_selector_all("#lens-heat .cell-text text", "ts => ts.map(t => t.textContent)")
    tops = [tok_text(lens.top_tokens[r][c][0], 40) for r in range(len(lens.rows)) for c in range(len(lens.tokens))]
    assert len(texts) == len(tops) and all(top.startswith(t.rstrip("…")) for t, top in zip(texts, tops, strict=True))
    assert "probability of the top next token" in page.locator("#lens-heat .legend-title").text_content()
    assert {"0", "1"} <= set(tick_texts(page, "#lens-heat .legend"))
    top = fills(page, "#lens-heat rect.cell")
    shot(page, "lens", docs="#main")
    page.select_option("#lens-colour", "target")
    assert '"e"' in page.locator("#lens-heat .legend-title").text_content()
    assert fills(page, "#lens-heat rect.cell") != top
