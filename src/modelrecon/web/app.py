"""The local viewer: a Starlette (ASGI) app over one folder of results, served by uvicorn (`modelrecon serve DIR`).

Read-only, except for a graph's annotations (pins, supernodes, labels), written beside the graph as
`NAME.annotations.json` (atomically, one writer at a time per file; a client that sends the version it loaded gets 409
instead of overwriting another client's save). Every route that takes a name looks it up in the folder's index
(`web.index.scan`), so no request can reach a file outside the folder. JSON API under `/api`, the front-end (plain
JS drawing with d3, vendored in static/vendor; nothing from a CDN) under `/static`; docs/viewer.md lists the routes
and their limits under load.

The folder may be an fsspec URL (`modelrecon serve s3://bucket/results`): the same routes list and read it through
fsspec on request (web.index), cubes open through `Cube(url)`, annotations are written as whole objects.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Container, Mapping
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from modelrecon import storage
from modelrecon.errors import ModelreconError
from modelrecon.web.index import Artifact, annotations_path, dashboards_path, scan

STATIC = Path(__file__).resolve().parent / "static"
MAX_ANNOTATION_BYTES = 64 * 1024
CACHE_ENTRIES = 8  # opened graphs, cubes and reports kept (least recently used dropped first)
SEND_CHUNK = 1024 * 1024  # a graph's JSON goes out in slices this big
MAX_CONNECTIONS = 64  # `serve` answers 503 beyond this many open connections (memory stays bounded)
LIMITS = {"pinned": 5000, "supernodes": 500, "supernode_nodes": 1000, "name": 100, "labels": 5000, "label": 200}
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]


class ApiError(Exception):
    def __init__(self, status: int, message: str, extra: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.extra = status, extra or {}


@dataclass(frozen=True)
class _Failed:
    error: Exception


class OpenedFiles:
    """A bounded LRU of opened files keyed by (what, path), each valid while the file's stamp is unchanged. Requests
    run in worker threads; a key is loaded by one thread at a time, so N clients opening the same new 10k-node graph
    parse it once and the others wait for that copy. A file that fails to load (not JSON, not a valid graph) is kept
    as its error, so it too is parsed once per version, not once per request."""

    def __init__(self, size: int = CACHE_ENTRIES) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, Path | str], tuple[object, object]] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple[str, Path | str], threading.Lock] = {}

    def get(self, what: str, path: Path | str, load):
        key = (what, path)
        with self._lock:
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            stamp = storage.stamp(path)
            with self._lock:
                hit = self._items.get(key)
                if hit is not None and hit[0] == stamp:
                    self._items.move_to_end(key)
            if hit is None or hit[0] != stamp:
                try:
                    hit = (stamp, load(path))
                except (ModelreconError, ValueError) as exc:  # the file's fault: the same answer until it changes
                    hit = (stamp, _Failed(exc))
                with self._lock:
                    self._items[key] = hit
                    self._items.move_to_end(key)
                    while len(self._items) > self.size:
                        self._items.popitem(last=False)
        if isinstance(hit[1], _Failed):
            raise hit[1].error.with_traceback(None)
        return hit[1]

    def __len__(self) -> int:
        return len(self._items)


class Viewer:
    """The folder (or URL), its index, a bounded cache of opened files and one write lock per annotations file."""

    def __init__(self, root: Path | str) -> None:
        self.root = root if storage.is_url(root) else Path(root).resolve()
        self.scan_started, self._scan_lock = -float("inf"), threading.Lock()
        self.rescan()
        self.opened = OpenedFiles()
        self._write_locks: dict[Path | str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def artifact(self, artifact_id: str, kind: str | tuple[str, ...]) -> Artifact:
        kinds = (kind,) if isinstance(kind, str) else kind
        found = self.index.get(artifact_id)
        if found is None:  # written since the last scan?
            found = self.rescan().get(artifact_id)
        if found is None or found.kind not in kinds:
            raise ApiError(404, f"no {' or '.join(kinds)} named {artifact_id[:200]!r} in this folder")
        return found

    def rescan(self) -> dict[str, Artifact]:
        """The index as of this call: scanned again unless a scan began after the call arrived. One scan runs at a
        time, and the clients waiting for it share it, so N clients listing the folder (or naming missing files) at
        once cost about two scans, while a file written before a request is always found."""
        arrived = time.monotonic()
        with self._scan_lock:
            if self.scan_started < arrived:
                self.scan_started = time.monotonic()
                self.index, self.truncated = scan(self.root)
            return self.index

    def write_lock(self, path: Path | str) -> threading.Lock:
        with self._locks_lock:
            return self._write_locks.setdefault(path, threading.Lock())


def _read_json(path: Path | str):
    return json.loads(storage.read_bytes(path).decode("utf-8"))


@dataclass(frozen=True)
class OpenedGraph:
    """A validated graph file as the server keeps it: its JSON serialised once (spliced into every `/api/graph`
    answer, so a 10k-node graph is not re-encoded per request) and its nodes by id (panels, annotation checks)."""

    body: bytes
    nodes: dict[str, dict]


def _load_graph(path: Path | str) -> OpenedGraph:
    from modelrecon.circuits.graph_file import graph_from_text

    text = storage.read_bytes(path).decode("utf-8")
    graph_from_text(text, path)  # validates every field the viewer uses (one-line error otherwise)
    data = json.loads(text)
    body = json.dumps(data, allow_nan=False, separators=(",", ":")).encode("utf-8")  # ASCII: lone surrogates too
    return OpenedGraph(body, {n["node_id"]: n for n in data["nodes"]})


def _own_file(path: Path | str) -> bool:
    """A file beside a graph that the server may read: a regular file, not a symbolic link (which could point out of
    the folder; the index skips links, and so do the annotations and dashboards found beside a graph)."""
    return storage.is_file(path) and (storage.is_url(path) or not Path(path).is_symlink())


def _version(data: bytes) -> str:
    """An annotations file's version: a hash of its bytes (not its mtime, which two saves in one clock tick share)."""
    return hashlib.sha256(data).hexdigest()[:16]


def _annotation_bytes(path: Path | str) -> bytes:
    return storage.read_bytes(path) if _own_file(path) else b""


def _read_annotations(path: Path | str) -> tuple[dict, str]:
    """A graph's saved annotations ({} when none) and their version."""
    data = _annotation_bytes(path)
    try:
        return (json.loads(data) if data else {}), _version(data)
    except (ValueError, RecursionError):
        raise ApiError(422, f"{storage.name(path)} is not JSON; fix or delete it to view the graph") from None


def _int(request: Request, name: str, default: int) -> int:
    value = request.query_params.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer, not {value[:40]!r}") from None


# --- routes ---------------------------------------------------------------------------------------------------------
# Routes that read files are plain functions: Starlette runs them in worker threads, so a slow read or a first parse
# does not hold up every other client on the event loop.
def home(request: Request) -> Response:
    return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))


def api_index(request: Request) -> Response:
    viewer: Viewer = request.app.state.viewer
    viewer.rescan()
    return JSONResponse({"root": storage.name(viewer.root), "truncated": viewer.truncated,
                         "artifacts": [a.to_dict() for a in viewer.index.values()]})  # fmt: skip


def graph_payload(
    artifact_id: str, graph: dict | None, annotations: dict, has_dashboards: bool, annotations_version: str = ""
) -> dict:
    """What the graph view loads: the graph file's JSON, its annotations (and their version, to send back as
    `If-Match` when saving), and whether dashboards exist."""
    return {"id": artifact_id, "graph": graph, "annotations": annotations, "annotations_version": annotations_version,
            "has_dashboards": has_dashboards}  # fmt: skip


def api_graph(request: Request) -> Response:
    viewer: Viewer = request.app.state.viewer
    artifact = viewer.artifact(request.path_params["id"], "graph")
    graph: OpenedGraph = viewer.opened.get("graph", artifact.path, _load_graph)
    annotations, version = _read_annotations(annotations_path(artifact.path))
    has_dashboards = _own_file(dashboards_path(artifact.path))
    head = graph_payload(artifact.id, None, annotations, has_dashboards, version)
    del head["graph"]  # spliced in below, already serialised
    start = json.dumps(head, allow_nan=False, separators=(",", ":")).encode("utf-8")[:-1] + b',"graph":'

    async def chunks():  # slices of the shared bytes, no copy per client: the send buffer holds one slice at a time
        yield start
        whole = memoryview(graph.body)
        for at in range(0, len(whole), SEND_CHUNK):
            yield whole[at : at + SEND_CHUNK]
        yield b"}"

    length = str(len(start) + len(graph.body) + 1)
    return StreamingResponse(chunks(), media_type="application/json", headers={"content-length": length})


def feature_panel(nodes: Mapping[str, dict], dashboards: dict | None, node_id: str) -> dict:
    """A node's details (`nodes`: the graph file's nodes by id) and, for a feature with a dashboard, the dashboard."""
    node = nodes.get(node_id)
    if node is None:
        raise ApiError(404, f"no node {node_id[:100]!r} in this graph")
    dashboard = None
    if dashboards and node.get("feature_type") == "cross layer transcoder":
        dashboard = dashboards.get("features", {}).get(f"{node.get('mr_layer')}_{node.get('mr_index')}")
    return {"node": node, "dashboard": dashboard}


def api_feature(request: Request) -> Response:
    viewer: Viewer = request.app.state.viewer
    artifact = viewer.artifact(request.path_params["id"], "graph")
    graph: OpenedGraph = viewer.opened.get("graph", artifact.path, _load_graph)
    path = dashboards_path(artifact.path)
    dashboards = viewer.opened.get("dashboards", path, _read_json) if _own_file(path) else None
    return JSONResponse(feature_panel(graph.nodes, dashboards, request.query_params.get("node", "")))


def validate_annotations(data, node_ids: Container[str]) -> dict:
    """The annotations a client posted, checked: `{"pinned": [id], "supernodes": [{"name", "nodes": [id]}],
    "labels": {id: text}}` with ids of this graph's nodes and bounded sizes. Raises ApiError(422)."""

    def bad(what: str) -> ApiError:
        return ApiError(422, f"annotations: {what}")

    def known(node) -> bool:  # a list or object where an id belongs is refused, not hashed
        return isinstance(node, str) and node in node_ids

    def text(value, shortest: int, longest: int) -> bool:  # JSON can carry lone surrogates ("\ud800"): not text
        if not isinstance(value, str) or not shortest <= len(value) <= longest:
            return False
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True

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
        if not known(node):
            raise bad(f"pinned node {str(node)[:60]!r} is not in the graph")
    for group in supernodes:
        if not isinstance(group, dict) or set(group) != {"name", "nodes"}:
            raise bad("each supernode is {name, nodes}")
        name, nodes = group["name"], group["nodes"]
        if not text(name, 1, LIMITS["name"]):
            raise bad(f"a supernode name is 1..{LIMITS['name']} characters")
        if not isinstance(nodes, list) or not 0 < len(nodes) <= LIMITS["supernode_nodes"]:
            raise bad(f"a supernode has 1..{LIMITS['supernode_nodes']} nodes")
        for node in nodes:
            if not known(node):
                raise bad(f"supernode node {str(node)[:60]!r} is not in the graph")
    for node, label in labels.items():
        if not known(node) or not text(label, 0, LIMITS["label"]):
            raise bad(f"labels map node ids of the graph to texts of at most {LIMITS['label']} characters")
    return {"pinned": list(dict.fromkeys(pinned)), "supernodes": supernodes, "labels": labels}


async def _json_body(request: Request):
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise ApiError(415, "send the annotations as application/json")
    too_big = ApiError(413, f"annotations are limited to {MAX_ANNOTATION_BYTES} bytes")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_ANNOTATION_BYTES):
        raise too_big  # refused before a byte of the body is read
    body = bytearray()
    async for chunk in request.stream():  # a chunked body without a length stops being read past the limit
        body += chunk
        if len(body) > MAX_ANNOTATION_BYTES:
            raise too_big
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ApiError(400, "the body is not JSON") from None


async def api_annotations(request: Request) -> Response:
    viewer: Viewer = request.app.state.viewer
    artifact = await run_in_threadpool(viewer.artifact, request.path_params["id"], "graph")
    data = await _json_body(request)
    return await run_in_threadpool(save_annotations, viewer, artifact, data, request.headers.get("if-match"))


def save_annotations(viewer: Viewer, artifact: Artifact, data, expected: str | None) -> Response:
    """Check and write a graph's annotations. Writers to one file take turns (a lock); `expected` (the `If-Match`
    header: the version the client loaded) makes a save that would overwrite someone else's a 409 instead."""
    graph: OpenedGraph = viewer.opened.get("graph", artifact.path, _load_graph)
    clean = validate_annotations(data, graph.nodes)
    path = annotations_path(artifact.path)
    body = json.dumps(clean).encode("utf-8")
    with viewer.write_lock(path):
        current = _annotation_bytes(path)
        if expected not in (None, "*") and expected.strip().removeprefix("W/").strip('"') != _version(current):
            raise ApiError(409, "the annotations were saved by someone else since you loaded them; reload the graph "
                           "and make your change again", {"annotations": json.loads(current) if current else {},
                                                          "annotations_version": _version(current)})  # fmt: skip
        storage.write_bytes(path, body)
    return JSONResponse({"saved": storage.name(path), "annotations_version": _version(body), **clean})


def _open_cube(location: Path | str):
    from modelrecon.cube.reader import Cube

    return Cube(location)


def _cube(viewer: Viewer, artifact: Artifact):
    return viewer.opened.get("cube", storage.join(artifact.path, "zarr.json"), lambda _: _open_cube(artifact.path))


def api_cube(request: Request) -> Response:
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


def api_attention(request: Request) -> Response:
    viewer: Viewer = request.app.state.viewer
    artifact = viewer.artifact(request.path_params["id"], "cube")
    cube = _cube(viewer, artifact)
    prompt, layer = _int(request, "prompt", 0), _int(request, "layer", 0)
    if not 0 <= prompt < cube.n_prompts:
        raise ApiError(404, f"no prompt {prompt}; the cube has prompts 0..{cube.n_prompts - 1}")
    return JSONResponse(attention_payload(cube, prompt, layer))


def api_experiment(request: Request) -> Response:
    viewer: Viewer = request.app.state.viewer
    artifact = viewer.artifact(request.path_params["id"], ("sweep", "verify", "experiment"))
    return JSONResponse({"id": artifact.id, "kind": artifact.kind,
                         "data": viewer.opened.get("experiment", artifact.path, _read_json)})  # fmt: skip


def api_lens(request: Request) -> Response:
    viewer: Viewer = request.app.state.viewer
    artifact = viewer.artifact(request.path_params["id"], "lens")
    return JSONResponse({"id": artifact.id, "kind": "lens", "data": viewer.opened.get("lens", artifact.path,
                                                                                      _read_json)})  # fmt: skip


async def _api_error(request: Request, exc: ApiError) -> Response:
    return JSONResponse({"error": str(exc), **exc.extra}, status_code=exc.status)


async def _http_error(request: Request, exc: HTTPException) -> Response:  # no route, wrong method: JSON too
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


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
        Route("/api/lens/{id:path}", api_lens),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=trusted_hosts)] if trusted_hosts else []
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={ApiError: _api_error, HTTPException: _http_error, ModelreconError: _user_error,
                                        OSError: _unreadable, ValueError: _unreadable})  # fmt: skip
    app.state.viewer = Viewer(root)
    return app
