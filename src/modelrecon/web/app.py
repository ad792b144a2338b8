"""The local viewer: a Starlette (ASGI) app over one folder of results, served by uvicorn (`modelrecon serve DIR`).

Read-only, except for a graph's annotations (pins, supernodes, labels), written beside the graph as
`NAME.annotations.json`. Every route that takes a name looks it up in the folder's index (`web.index.scan`), so no
request can reach a file outside the folder. JSON API under `/api`, the front-end (plain JS and SVG, no third-party
code) under `/static`; docs/viewer.md lists the routes.

The folder may be an fsspec URL (`modelrecon serve s3://bucket/results`): the same routes list and read it through
fsspec on request (web.index), cubes open through `Cube(url)`, annotations are written as whole objects.
"""

from __future__ import annotations

import json
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from modelrecon import storage
from modelrecon.errors import ModelreconError
from modelrecon.web.index import Artifact, annotations_path, dashboards_path, scan

STATIC = Path(__file__).resolve().parent / "static"
MAX_ANNOTATION_BYTES = 64 * 1024
LIMITS = {"pinned": 5000, "supernodes": 500, "supernode_nodes": 1000, "name": 100, "labels": 5000, "label": 200}
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Viewer:
    """The folder (or URL), its index and small caches of opened files (keyed by path and modification stamp)."""

    def __init__(self, root: Path | str) -> None:
        self.root = root if storage.is_url(root) else Path(root).resolve()
        self.index, self.truncated = scan(self.root)
        self._cache: dict[tuple[str, Path | str], tuple[object, object]] = {}

    def artifact(self, artifact_id: str, kind: str | tuple[str, ...]) -> Artifact:
        kinds = (kind,) if isinstance(kind, str) else kind
        found = self.index.get(artifact_id)
        if found is None:  # written since the last scan?
            self.index, self.truncated = scan(self.root)
            found = self.index.get(artifact_id)
        if found is None or found.kind not in kinds:
            raise ApiError(404, f"no {' or '.join(kinds)} named {artifact_id[:200]!r} in this folder")
        return found

    def cached(self, what: str, path: Path | str, load):
        stamp = storage.stamp(path)
        hit = self._cache.get((what, path))
        if hit is None or hit[0] != stamp:
            hit = (stamp, load(path))
            self._cache[(what, path)] = hit
        return hit[1]


def _read_json(path: Path | str):
    return json.loads(storage.read_bytes(path).decode("utf-8"))


def _load_graph(path: Path | str) -> dict:
    from modelrecon.circuits.graph_file import graph_from_text

    text = storage.read_bytes(path).decode("utf-8")
    graph_from_text(text, path)  # validates every field the viewer uses (one-line error otherwise)
    return json.loads(text)


def _int(request: Request, name: str, default: int) -> int:
    value = request.query_params.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer, not {value[:40]!r}") from None


# --- routes ---------------------------------------------------------------------------------------------------------
async def home(request: Request) -> Response:
    return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))


async def api_index(request: Request) -> Response:
    viewer: Viewer = request.app.state.viewer
    viewer.index, viewer.truncated = scan(viewer.root)
    return JSONResponse({"root": storage.name(viewer.root), "truncated": viewer.truncated,
                         "artifacts": [a.to_dict() for a in viewer.index.values()]})  # fmt: skip


def graph_payload(artifact_id: str, graph: dict, annotations: dict, has_dashboards: bool) -> dict:
    """What the graph view loads: the graph file's JSON, its annotations, and whether dashboards exist."""
    return {"id": artifact_id, "graph": graph, "annotations": annotations, "has_dashboards": has_dashboards}


def _graph_payload(viewer: Viewer, artifact: Artifact) -> dict:
    graph = viewer.cached("graph", artifact.path, _load_graph)
    notes = annotations_path(artifact.path)
    annotations = viewer.cached("notes", notes, _read_json) if storage.is_file(notes) else {}
    return graph_payload(artifact.id, graph, annotations, storage.is_file(dashboards_path(artifact.path)))


async def api_graph(request: Request) -> Response:
    viewer: Viewer = request.app.state.viewer
    return JSONResponse(_graph_payload(viewer, viewer.artifact(request.path_params["id"], "graph")))


def feature_panel(graph: dict, dashboards: dict | None, node_id: str) -> dict:
    """A node's details and, for a feature with a dashboard, the dashboard."""
    node = next((n for n in graph["nodes"] if n.get("node_id") == node_id), None)
    if node is None:
        raise ApiError(404, f"no node {node_id[:100]!r} in this graph")
    dashboard = None
    if dashboards and node.get("feature_type") == "cross layer transcoder":
        dashboard = dashboards.get("features", {}).get(f"{node.get('mr_layer')}_{node.get('mr_index')}")
    return {"node": node, "dashboard": dashboard}


async def api_feature(request: Request) -> Response:
    viewer: Viewer = request.app.state.viewer
    artifact = viewer.artifact(request.path_params["id"], "graph")
    graph = viewer.cached("graph", artifact.path, _load_graph)
    path = dashboards_path(artifact.path)
    dashboards = viewer.cached("dashboards", path, _read_json) if storage.is_file(path) else None
    return JSONResponse(feature_panel(graph, dashboards, request.query_params.get("node", "")))


def validate_annotations(data, node_ids: set[str]) -> dict:
    """The annotations a client posted, checked: `{"pinned": [id], "supernodes": [{"name", "nodes": [id]}],
    "labels": {id: text}}` with ids of this graph's nodes and bounded sizes. Raises ApiError(422)."""

    def bad(what: str) -> ApiError:
        return ApiError(422, f"annotations: {what}")

    if not isinstance(data, dict) or set(data) - {"pinned", "supernodes", "labels"}:
        raise bad("send an object with only pinned, supernodes and labels")
    pinned = data.get("pinned", [])
    if not isinstance(pinned, list) or len(pinned) > LIMITS["pinned"]:
        raise bad(f"pinned must be a list of at most {LIMITS['pinned']} node ids")
    supernodes = data.get("supernodes", [])
    if not isinstance(supernodes, list) or len(supernodes) > LIMITS["supernodes"]:
        raise bad(f"supernodes must be a list of at most {LIMITS['supernodes']}")
    labels = data.get("labels", {})
    if not isinstance(labels, dict) or len(labels) > LIMITS["labels"]:
        raise bad(f"labels must be an object of at most {LIMITS['labels']} entries")
    for node in pinned:
        if node not in node_ids:
            raise bad(f"pinned node {str(node)[:60]!r} is not in the graph")
    for group in supernodes:
        if not isinstance(group, dict) or set(group) != {"name", "nodes"}:
            raise bad("each supernode is {name, nodes}")
        name, nodes = group["name"], group["nodes"]
        if not isinstance(name, str) or not 0 < len(name) <= LIMITS["name"]:
            raise bad(f"a supernode name is 1..{LIMITS['name']} characters")
        if not isinstance(nodes, list) or not 0 < len(nodes) <= LIMITS["supernode_nodes"]:
            raise bad(f"a supernode has 1..{LIMITS['supernode_nodes']} nodes")
        for node in nodes:
            if node not in node_ids:
                raise bad(f"supernode node {str(node)[:60]!r} is not in the graph")
    for node, text in labels.items():
        if node not in node_ids or not isinstance(text, str) or len(text) > LIMITS["label"]:
            raise bad(f"labels map node ids of the graph to texts of at most {LIMITS['label']} characters")
    return {"pinned": list(dict.fromkeys(pinned)), "supernodes": supernodes, "labels": labels}


async def _json_body(request: Request):
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise ApiError(415, "send the annotations as application/json")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_ANNOTATION_BYTES):
        raise ApiError(413, f"annotations are limited to {MAX_ANNOTATION_BYTES} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_ANNOTATION_BYTES:
            raise ApiError(413, f"annotations are limited to {MAX_ANNOTATION_BYTES} bytes")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ApiError(400, "the body is not JSON") from None


async def api_annotations(request: Request) -> Response:
    viewer: Viewer = request.app.state.viewer
    artifact = viewer.artifact(request.path_params["id"], "graph")
    data = await _json_body(request)
    graph = viewer.cached("graph", artifact.path, _load_graph)
    clean = validate_annotations(data, {n["node_id"] for n in graph["nodes"]})
    storage.write_bytes(annotations_path(artifact.path), json.dumps(clean).encode("utf-8"))
    return JSONResponse({"saved": storage.name(annotations_path(artifact.path)), **clean})


def _open_cube(location: Path | str):
    from modelrecon.cube.reader import Cube

    return Cube(location)


def _cube(viewer: Viewer, artifact: Artifact):
    return viewer.cached("cube", storage.join(artifact.path, "zarr.json"), lambda _: _open_cube(artifact.path))


async def api_cube(request: Request) -> Response:
    from modelrecon.cube import layout
    from modelrecon.cube.html import view_data

    viewer: Viewer = request.app.state.viewer
    artifact = viewer.artifact(request.path_params["id"], "cube")
    cube = _cube(viewer, artifact)
    kind = request.query_params.get("kind") or cube.site_kinds[0]
    metric = request.query_params.get("metric") or "norm"
    prompt = _int(request, "prompt", 0)
    if kind not in cube.site_kinds:
        raise ApiError(404, f"no site kind {kind[:60]!r} in this cube; it has {', '.join(cube.site_kinds)}")
    if metric not in layout.STATS:
        raise ApiError(404, f"no metric {metric[:60]!r}; use one of {', '.join(layout.STATS)}")
    if not 0 <= prompt < cube.n_prompts:
        raise ApiError(404, f"no prompt {prompt}; the cube has prompts 0..{cube.n_prompts - 1}")
    return JSONResponse({**cube_header(cube, artifact.id, min(cube.n_prompts, 500)),
                         "view": view_data(cube, prompt, kind, metric)})  # fmt: skip


def cube_header(cube, artifact_id: str, n_prompts: int) -> dict:
    """What a cube view needs besides the heatmap: its selectors' choices (the first `n_prompts` prompts)."""
    from modelrecon.cube import layout

    return {
        "id": artifact_id,
        "model": cube.metadata["model"]["name"],
        "kinds": cube.site_kinds,
        "metrics": list(layout.STATS),
        "prompts": [cube.prompt_text(p)[:80] for p in range(n_prompts)],
        "attention_layers": cube.metadata["capture"].get("attention_layers", []) if cube.has_attention else [],
    }


def attention_payload(cube, prompt: int, layer: int) -> dict:
    """One prompt's attention pattern at one layer: `{tokens, layer, heads: [head][query][key]}`."""
    pattern = cube.attention(prompt, layer)  # [head, q, k]
    heads = [[[round(float(v), 5) for v in row] for row in head] for head in pattern]
    return {"tokens": cube.str_tokens(prompt), "layer": layer, "heads": heads}


async def api_attention(request: Request) -> Response:
    viewer: Viewer = request.app.state.viewer
    artifact = viewer.artifact(request.path_params["id"], "cube")
    cube = _cube(viewer, artifact)
    prompt, layer = _int(request, "prompt", 0), _int(request, "layer", 0)
    if not 0 <= prompt < cube.n_prompts:
        raise ApiError(404, f"no prompt {prompt}; the cube has prompts 0..{cube.n_prompts - 1}")
    return JSONResponse(attention_payload(cube, prompt, layer))


async def api_experiment(request: Request) -> Response:
    viewer: Viewer = request.app.state.viewer
    artifact = viewer.artifact(request.path_params["id"], ("sweep", "verify"))
    return JSONResponse({"id": artifact.id, "kind": artifact.kind,
                         "data": viewer.cached("experiment", artifact.path, _read_json)})  # fmt: skip


async def _api_error(request: Request, exc: ApiError) -> Response:
    return JSONResponse({"error": str(exc)}, status_code=exc.status)


async def _user_error(request: Request, exc: ModelreconError) -> Response:
    return JSONResponse({"error": str(exc)}, status_code=422)


async def _unreadable(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": f"cannot read that file: {exc}"[:300]}, status_code=422)


def create_app(root: str | Path, trusted_hosts: list[str] | None = None) -> Starlette:
    """The viewer app over `root` (a folder or an fsspec URL). `trusted_hosts`: the Host headers accepted (the
    loopback names when bound to 127.0.0.1, which keeps a web page from reaching the server through DNS rebinding);
    None accepts any."""
    root = storage.location(root)
    if not storage.is_dir(root):
        raise ModelreconError(f"{root} is not a folder; give the folder of results to serve")
    routes = [
        Route("/", home),
        Route("/api/index", api_index),
        Route("/api/graph/{id:path}", api_graph),
        Route("/api/feature/{id:path}", api_feature),
        Route("/api/annotations/{id:path}", api_annotations, methods=["POST"]),
        Route("/api/cube/{id:path}", api_cube),
        Route("/api/attention/{id:path}", api_attention),
        Route("/api/experiment/{id:path}", api_experiment),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=trusted_hosts)] if trusted_hosts else []
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={ApiError: _api_error, ModelreconError: _user_error,
                                        OSError: _unreadable, ValueError: _unreadable})  # fmt: skip
    app.state.viewer = Viewer(root)
    return app
