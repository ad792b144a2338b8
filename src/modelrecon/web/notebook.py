"""The viewer without a server: a graph or a cube as one self-contained HTML page (the same front-end code, its data
embedded), for Jupyter (`modelrecon.web.show(graph)` displays inline) or for a file to open in a browser.

The page carries the answers to every API request its view can make (`window.MR_EMBED.routes`), so it works offline
and from `file://`; saving annotations needs `modelrecon serve`.
"""

from __future__ import annotations

import functools
import html
import json
from pathlib import Path
from urllib.parse import quote, urlencode

from modelrecon.files import write_text_atomic
from modelrecon.web.app import STATIC, attention_payload, cube_header, feature_panel, graph_payload

MAX_EMBEDDED_PROMPTS = 20


def _api_path(prefix: str, artifact_id: str) -> str:
    """The path app.js asks for (`apiPath`: encodeURIComponent of each part)."""
    return prefix + "/".join(quote(part, safe="!~*'()") for part in artifact_id.split("/"))


@functools.cache
def _d3() -> str:
    """The vendored d3 with its licence (copyright and permission notice) in a comment; its banner's web address is
    left out, as the page loads nothing."""
    code = (STATIC / "vendor" / "d3.min.js").read_text(encoding="utf-8").replace("// https://d3js.org ", "// d3 ", 1)
    licence = (STATIC / "vendor" / "d3.LICENSE").read_text(encoding="utf-8").replace("*/", "* /")
    return f"/* static/vendor/d3.min.js, ISC licence:\n{licence}*/\n{code}".replace("</", "<\\/")


def page(start: str, routes: dict) -> str:
    """A standalone HTML page of the viewer showing `start` (e.g. `#/graph/ID`) from the embedded `routes`, with the
    vendored d3 inlined: nothing is loaded from anywhere."""
    style = (STATIC / "style.css").read_text(encoding="utf-8")
    script = (STATIC / "app.js").read_text(encoding="utf-8").replace("</", "<\\/")  # no early </script>
    data = json.dumps({"start": start, "routes": routes}, allow_nan=False).replace("</", "<\\/")
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>modelrecon</title>'
        f'<style>{style}</style></head><body><header><b>modelrecon</b> <span id="crumb"></span></header>'
        '<main id="main"></main><div id="tip"></div>'
        f"<script>window.MR_EMBED = {data};</script><script>{_d3()}</script><script>{script}</script></body></html>"
    )


def graph_page(graph, dashboards: dict | None = None, annotations: dict | None = None) -> str:
    """A graph (a `Graph` or a graph.json path) with its node panels and, when given, feature dashboards."""
    from modelrecon.circuits.graph import Graph
    from modelrecon.circuits.graph_file import graph_to_json, load_graph

    if not isinstance(graph, Graph):
        graph = load_graph(graph)
    data = graph_to_json(graph)
    artifact_id = "graph.json"
    routes = {_api_path("/api/graph/", artifact_id): graph_payload(artifact_id, data, annotations or {},
                                                                   dashboards is not None)}  # fmt: skip
    nodes = {node["node_id"]: node for node in data["nodes"]}
    for node in data["nodes"]:
        if node["feature_type"] == "cross layer transcoder":
            key = _api_path("/api/feature/", artifact_id) + "?node=" + quote(node["node_id"], safe="!~*'()")
            routes[key] = feature_panel(nodes, dashboards, node["node_id"])
    return page(f"#/graph/{artifact_id}", routes)


def cube_page(cube, kind: str | None = None, metric: str = "norm", prompt: int = 0) -> str:
    """A cube (a `Cube` or its path): every site kind and metric of its first prompts, and their attention; it opens
    on `kind` (default the first), `metric` and `prompt`."""
    from modelrecon.cube import layout
    from modelrecon.cube.html import view_data
    from modelrecon.cube.reader import Cube
    from modelrecon.errors import CubeError

    if not isinstance(cube, Cube):
        cube = Cube(cube)
    kind = kind or cube.site_kinds[0]
    if metric not in layout.STATS:
        raise CubeError(f"unknown metric '{metric}'; choose one of {', '.join(layout.STATS)}")
    first = view_data(cube, prompt, kind, metric)  # a kind or prompt the cube lacks: its one-line error
    artifact_id = cube.path.name
    prompts = sorted({*range(min(cube.n_prompts, MAX_EMBEDDED_PROMPTS)), prompt})
    common = cube_header(cube, artifact_id, max(prompts) + 1)
    base = _api_path("/api/cube/", artifact_id)
    routes = {base: {**common, "view": first}}
    for kind in cube.site_kinds:
        for metric in layout.STATS:
            for p in prompts:
                query = urlencode({"kind": kind, "metric": metric, "prompt": p})
                routes[f"{base}?{query}"] = {**common, "view": view_data(cube, p, kind, metric)}
    attention = _api_path("/api/attention/", artifact_id)
    for p in prompts:
        for layer in common["attention_layers"]:
            routes[f"{attention}?prompt={p}&layer={layer}"] = attention_payload(cube, p, layer)
    return page(f"#/cube/{artifact_id}", routes)


def experiment_page(kind: str, data: dict, name: str = "experiment.json") -> str:
    """A patching sweep (`kind="sweep"`, `SweepResult.to_dict()`), an attribution-vs-patching report (`"verify"`,
    `Comparison.to_dict()`) or an experiment (`"experiment"`, `ExperimentResult.to_dict()`): the viewer's view of it."""
    from modelrecon.files import json_safe

    if kind not in ("sweep", "verify", "experiment"):
        raise ValueError(f"kind is sweep, verify or experiment, not {kind!r}")
    routes = {_api_path("/api/experiment/", name): {"id": name, "kind": kind, "data": json_safe(data)}}
    return page(f"#/experiment/{name}", routes)


def lens_page(lens, name: str = "lens.json") -> str:
    """A logit lens (a `LensResult` or its `to_dict()`): the viewer's lens view of it."""
    from modelrecon.files import json_safe

    data = lens if isinstance(lens, dict) else lens.to_dict()
    routes = {_api_path("/api/lens/", name): {"id": name, "kind": "lens", "data": json_safe(data)}}
    return page(f"#/lens/{name}", routes)


class View:
    """What `show` returns: Jupyter displays it inline (an iframe holding the standalone page)."""

    def __init__(self, html_page: str, height: int = 720) -> None:
        self.html, self.height = html_page, height

    def _repr_html_(self) -> str:
        return (f'<iframe srcdoc="{html.escape(self.html, quote=True)}" style="width:100%;height:{self.height}px;'
                'border:1px solid #ccd" sandbox="allow-scripts"></iframe>')  # fmt: skip

    def save(self, path: str | Path) -> Path:
        """The page as a file that opens offline in any browser."""
        return write_text_atomic(path, self.html)


def show(obj, dashboards: dict | str | Path | None = None, height: int = 720) -> View:
    """Display a result inline in a notebook: a graph (`Graph`, a `TracedGraph`'s pruned graph, or a graph.json path),
    a cube (`Cube` or its folder), a patching sweep (`SweepResult`), an attribution-vs-patching report (`Comparison`),
    an experiment (`ExperimentResult`) or a logit lens (`LensResult`). These results display themselves this way too
    (their `_repr_html_`)."""
    from modelrecon.attribution.compare import Comparison
    from modelrecon.attribution.lens import LensResult
    from modelrecon.circuits.graph import Graph
    from modelrecon.circuits.tracing import TracedGraph
    from modelrecon.counterfactual.experiment import ExperimentResult
    from modelrecon.counterfactual.sweep import SweepResult
    from modelrecon.cube.reader import Cube
    from modelrecon.errors import BadInputError

    if isinstance(dashboards, (str, Path)):
        dashboards = json.loads(Path(dashboards).read_text(encoding="utf-8"))
    reports = {SweepResult: "sweep", Comparison: "verify", ExperimentResult: "experiment"}
    if isinstance(obj, TracedGraph):
        obj = obj.pruned
    if isinstance(obj, Graph) or (isinstance(obj, (str, Path)) and Path(obj).is_file()):
        return View(graph_page(obj, dashboards), height)
    if isinstance(obj, Cube) or (isinstance(obj, (str, Path)) and Path(obj).is_dir()):
        return View(cube_page(obj), height)
    if type(obj) in reports:
        kind = reports[type(obj)]
        return View(experiment_page(kind, obj.to_dict(), f"{kind}.json"), height)
    if isinstance(obj, LensResult):
        return View(lens_page(obj), height)
    raise BadInputError(f"cannot show {type(obj).__name__}: give a Graph, TracedGraph, graph.json path, Cube, cube "
                        "folder, SweepResult, Comparison, ExperimentResult or LensResult")  # fmt: skip
