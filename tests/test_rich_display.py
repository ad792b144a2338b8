"""Results display themselves in notebooks through the viewer's own front end: `_repr_html_` of a graph, a traced
graph, a patching sweep, an attribution-vs-patching report, an experiment and a logit lens is an iframe holding one
self-contained page (no script or address loaded from anywhere) that embeds the object's own data, and that page
renders in headless Chromium without a console error."""

import html
import json
from pathlib import Path

import numpy as np
import pytest

from modelrecon.attribution.compare import compare
from modelrecon.attribution.lens import logit_lens
from modelrecon.attribution.patching import attribution_patching
from modelrecon.circuits.graph_file import graph_to_json
from modelrecon.circuits.tracing import trace
from modelrecon.counterfactual import Pair, Patch, Zero
from modelrecon.counterfactual.experiment import experiment
from modelrecon.counterfactual.sweep import sweep

from conftest import embedded_routes
from tiny import tiny_model

CHROMIUM = Path("/usr/bin/chromium")
PAIRS = [Pair("The cat sat", "The dog ran", "x", "q"), Pair("A red apple", "A big melon", "e", "z"),
         Pair("Birds fly!!", "Fish swim!!", "s", "k")]  # fmt: skip
PROMPT = "The cat sat on"


@pytest.fixture(scope="module")
def results():
    model = tiny_model("llama")
    exact = sweep(model, PAIRS, "resid_pre", n_boot=100)
    traced = trace(model, PROMPT, progress=False)
    components = {"zero mlp 0": [Zero("layers.0.mlp.out")],
                  "patch input": [Patch("layers.0.resid_pre", source="counterfactual")]}  # fmt: skip
    return {
        "graph": traced.pruned,
        "traced": traced,
        "sweep": exact,
        "verify": compare(attribution_patching(model, PAIRS, "resid_pre", n_boot=100), exact),
        "experiment": experiment(model, PAIRS, components, n_boot=100),
        "lens": logit_lens(model, PROMPT, k=3, target="t"),
    }


def _page(result) -> str:
    """The standalone page inside the iframe `_repr_html_` returns."""
    frame = result._repr_html_()
    assert frame.startswith('<iframe srcdoc="') and 'sandbox="allow-scripts"' in frame
    return html.unescape(frame.split('srcdoc="', 1)[1].split('"', 1)[0])


def _plain(data):
    return json.loads(json.dumps(data))  # what the embedded JSON reads back as (tuples become lists)


def test_graphs_embed_every_node_and_edge(results):
    for name in ("graph", "traced"):
        routes = embedded_routes(_page(results[name]))
        shown = routes["/api/graph/graph.json"]["graph"]
        expected = graph_to_json(results["graph"])
        assert [n["node_id"] for n in shown["nodes"]] == [n["node_id"] for n in expected["nodes"]], name
        assert len(shown["links"]) == len(expected["links"]) == len(results["graph"].weights) > 0


@pytest.mark.parametrize("kind", ["sweep", "verify", "experiment"])
def test_reports_embed_their_results(results, kind):
    routes = embedded_routes(_page(results[kind]))
    payload = routes[f"/api/experiment/{kind}.json"]
    assert payload["kind"] == kind and payload["data"] == _plain(results[kind].to_dict())
    if kind == "sweep":
        assert [r["effect"] for r in payload["data"]["results"]] == pytest.approx(
            results["sweep"].effect.flatten().tolist(), nan_ok=True)  # fmt: skip
    if kind == "experiment":
        effects = {c["name"]: c["effect"] for c in payload["data"]["components"]}
        assert effects == {c.name: pytest.approx(c.effect) for c in results["experiment"].components}


def test_a_lens_embeds_its_top_tokens_and_target(results):
    lens = results["lens"]
    data = embedded_routes(_page(lens))["/api/lens/lens.json"]["data"]
    assert data == _plain(lens.to_dict()) and data["tokens"] == lens.tokens
    assert data["top"][-1][-1][0]["token"] == lens.top_tokens[-1][-1][0]
    np.testing.assert_allclose(np.array(data["target_prob"]), lens.target_probs.numpy(), rtol=1e-6)


def _points(comparison) -> int:
    data = comparison.to_dict()
    return sum(e is not None and x is not None for e, x in zip(data["estimate"], data["exact"], strict=True))


# What each view draws from its embedded data: a selector and how many of it
DRAWN = {
    "graph": lambda r: ("svg circle.node", r["graph"].n_nodes),
    "traced": lambda r: ("svg circle.node", r["graph"].n_nodes),
    "sweep": lambda r: ("#sweep-heat .cell", len(r["sweep"].cells)),
    "verify": lambda r: ("#scatter circle.point", _points(r["verify"])),
    "experiment": lambda r: ("#experiment-components tr", len(r["experiment"].components) + 1),
    "lens": lambda r: ("#lens-heat .cell", len(r["lens"].rows) * len(r["lens"].tokens)),
}


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield instance
        instance.close()


@pytest.mark.parametrize("name", list(DRAWN))
def test_each_display_renders_in_chromium_without_errors(results, browser, name):
    """The `_repr_html_` markup as Jupyter puts it in a page: the sandboxed iframe draws its view, with every request
    the page might make aborted and recorded, and no console error."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    requested, errors = [], []
    context.route("**/*", lambda route: requested.append(route.request.url) or route.abort())
    page = context.new_page()
    page.on("console", lambda message: message.type == "error" and errors.append(message.text))
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.set_content(f"<!doctype html><html><body>{results[name]._repr_html_()}</body></html>")
        frame = page.frame_locator("iframe")
        selector, count = DRAWN[name](results)
        frame.locator(selector).first.wait_for(timeout=15000)
        assert frame.locator(selector).count() == count
        assert frame.locator("p.error").count() == 0, frame.locator("#main").inner_text()[:300]
        page.wait_for_timeout(100)  # late errors (a redraw after the first paint)
        assert errors == [] and requested == []
    finally:
        context.close()


def test_the_served_viewer_lists_and_draws_experiments_and_lenses(results, browser, tmp_path):
    """`experiment --json` and `lens --json` files in a served folder are listed and open in the same views as their
    notebook displays."""
    import threading
    import time

    import uvicorn
    from starlette.testclient import TestClient

    from modelrecon.web.app import create_app

    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "exp.json").write_text(json.dumps({"model": "tiny", **results["experiment"].to_dict()}, indent=1))
    (folder / "lens.json").write_text(results["lens"].to_json())
    app = create_app(folder)
    client = TestClient(app)
    kinds = {a["id"]: a["kind"] for a in client.get("/api/index").json()["artifacts"]}
    assert kinds == {"exp.json": "experiment", "lens.json": "lens"}
    assert client.get("/api/lens/lens.json").json()["data"]["rows"] == results["lens"].rows
    assert client.get("/api/experiment/exp.json").json()["data"]["sanity"] == _plain(results["experiment"].sanity)
    assert client.get("/api/lens/exp.json").status_code == 404  # each file only through its own kind

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    page = browser.new_page()
    try:
        page.goto(f"http://127.0.0.1:{port}/")
        page.locator("a[data-kind=lens]").click()
        page.locator("#lens-heat .cell").first.wait_for(timeout=15000)
        assert page.locator("#lens-heat .cell").count() == len(results["lens"].rows) * len(results["lens"].tokens)
        page.goto(f"http://127.0.0.1:{port}/#/")
        page.locator("a[data-kind=experiment]").click()
        page.locator("#experiment-components tr").first.wait_for(timeout=15000)
        assert page.locator("#experiment-components tr").count() == len(results["experiment"].components) + 1
    finally:
        page.close()
        server.should_exit = True
        thread.join(10)
