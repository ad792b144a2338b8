"""Graph files: the circuit-tracer / Neuronpedia attribution-graph JSON (schema_version 1), with a `modelrecon`
extension that rebuilds our Graph exactly. docs/graph-format.md documents every field.

Node ids (`node_id`, what `links` refer to) follow circuit-tracer's `{layer}_{index}_{position}` so its frontend
parses them, and are collision-free across kinds:

- feature `{layer}_{latent}_{pos}`; error `{layer}_-1_{pos}` (circuit-tracer's fixed form; older versions wrote
  `0_{layer}_{pos}`, which collides with layer-0 features); embedding `E_{token_id}_{pos}`; logit
  `{n_layers + 1}_{token_id}_{pos}` (no feature layer reaches n_layers + 1);
- component graphs: attention head `{layer}_H{head}`, MLP `{layer}_M` (no position: `ctx_idx` is null).

Files are untrusted input: `load_graph` reads JSON only and checks every field it uses.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from modelrecon import storage
from modelrecon.circuits.graph import KINDS, Graph, Node
from modelrecon.circuits.prune import completeness_score, cumulative_influence, node_influence, replacement_score
from modelrecon.errors import BadInputError
from modelrecon.files import json_safe

SCHEMA_VERSION = 1  # circuit-tracer / Neuronpedia graph schema
MODELRECON_SCHEMA_VERSION = 1  # our `metadata.modelrecon` block and per-node extensions

KIND_OF_FEATURE_TYPE = {kind.feature_type: name for name, kind in KINDS.items()}


def _cantor(x: int, y: int) -> int:
    """circuit-tracer's global feature number for (layer, latent): the Cantor pairing."""
    return (x + y) * (x + y + 1) // 2 + y


def n_layers_of(graph: Graph) -> int:
    """The model's layer count: `metadata["n_layers"]` when the attribution recorded it, else (or when that is too
    small) the highest feature or error layer + 1."""
    layers = [n.layer for n in graph.nodes if KINDS[n.kind].layered and n.layer is not None]
    seen = max(layers) + 1 if layers else 0
    recorded = graph.metadata.get("n_layers")
    return max(recorded, seen) if isinstance(recorded, int) and not isinstance(recorded, bool) else seen


def node_json_id(node: Node, n_layers: int) -> str:
    """The circuit-tracer style `node_id` of a node (module docstring)."""
    return node.name("json_id", logit_layer=n_layers + 1)


def _json_feature(node: Node) -> int:
    """circuit-tracer's `feature`: a feature's global number, an embedding's position, a logit's token id, a head."""
    if node.kind == "feature":
        return _cantor(node.layer, node.feature)
    if node.kind == "embedding":
        return node.position
    return -1 if node.feature is None else node.feature


def _clerp(node: Node) -> str:
    if node.kind == "logit":
        return f'Output "{node.token}" (p={node.activation if node.activation is not None else 0.0:.3f})'
    return "" if KINDS[node.kind].positioned else node.label  # components are labelled, the rest left to the viewer


def _node_json(node: Node, n_layers: int, influence: float | None, target_logit: bool) -> dict:
    return {
        "node_id": node_json_id(node, n_layers),
        "ctx_idx": node.position,
        "feature_type": KINDS[node.kind].feature_type,
        "feature": _json_feature(node),
        "layer": node.name("json_layer", logit_layer=n_layers + 1),
        "jsNodeId": node.name("js_id"),
        "clerp": _clerp(node),
        "activation": node.activation,
        "influence": influence,
        "token_prob": (node.activation or 0.0) if node.kind == "logit" else 0.0,
        "is_target_logit": target_logit,
        "run_idx": 0,
        "reverse_ctx_idx": 0,
        # modelrecon extensions: enough to rebuild the Node exactly
        "mr_id": node.id,
        "mr_index": node.feature,
        "mr_layer": node.layer,
        "token": node.token,
    }


def graph_to_json(graph: Graph, node_threshold: float | None = None, slug: str | None = None) -> dict:
    """The graph as a circuit-tracer / Neuronpedia graph JSON object (plus our extensions).

    `node_threshold` defaults to the one `prune_graph` recorded. Node `influence` is the cumulative influence share
    `prune_graph` recorded for the unpruned graph (circuit-tracer's convention); for a graph that was not pruned it is
    computed on the graph itself. The first logit node is the target logit."""
    pruning = graph.metadata.get("pruning", {})
    if node_threshold is None:
        node_threshold = pruning.get("node_threshold")
    recorded = graph.metadata.get("cumulative_influence")
    if not isinstance(recorded, dict):
        cumulative = cumulative_influence(node_influence(graph)).tolist()
        recorded = {node.id: cumulative[i] for i, node in enumerate(graph.nodes)}
    n_layers = n_layers_of(graph)
    logits = graph.logit_nodes()
    nodes = [
        _node_json(
            node, n_layers, None if node.kind == "logit" else recorded.get(node.id), bool(logits) and i == logits[0]
        )
        for i, node in enumerate(graph.nodes)
    ]
    ids = [n["node_id"] for n in nodes]
    links = [
        {"source": ids[s], "target": ids[t], "weight": w}
        for s, t, w in zip(graph.sources.tolist(), graph.targets.tolist(), graph.weights.tolist(), strict=True)
    ]
    transcoders = graph.metadata.get("transcoders", [])
    scan = graph.metadata.get("scan") or graph.model
    extension = {
        "schema_version": MODELRECON_SCHEMA_VERSION,
        "model": graph.model,
        "token_ids": list(graph.token_ids),
        "n_layers": n_layers,
        "transcoders": transcoders,
        "scores": {"replacement": replacement_score(graph), "completeness": completeness_score(graph)},
        "graph_metadata": graph.metadata,
    }
    return json_safe(
        {
            "metadata": {
                "slug": slug or _slug(graph.prompt),
                "scan": str(scan),
                "transcoder_list": [t for t in transcoders if isinstance(t, str)]
                if isinstance(transcoders, list)
                else [],
                "prompt_tokens": list(graph.tokens),
                "prompt": graph.prompt,
                "node_threshold": node_threshold,
                "schema_version": SCHEMA_VERSION,
                "modelrecon": extension,
            },
            "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
            "nodes": nodes,
            "links": links,
        }
    )


def _slug(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "graph"


def save_graph(
    graph: Graph, path: str | Path, node_threshold: float | None = None, slug: str | None = None
) -> Path | str:
    """Write `graph_to_json(graph)` to `path` atomically (a temporary file renamed into place; at an fsspec URL, one
    whole object). Returns the path (a URL as a string)."""
    path = storage.location(path)
    graph.check_finite()  # never a NaN graph on disk with its values silently written as null
    data = graph_to_json(graph, node_threshold=node_threshold, slug=slug or Path(storage.name(path)).stem)
    storage.write_bytes(path, json.dumps(data, default=str, allow_nan=False).encode("utf-8"))
    return path


# ---------------------------------------------------------------------------------------------------------- loading


def _bad(path, what: str) -> BadInputError:
    return BadInputError(f"graph file '{path}': {what}; write it with modelrecon.circuits.graph_file.save_graph")


def _get(obj, key: str, types, path, where: str, optional: bool = False):
    if not isinstance(obj, dict):
        raise _bad(path, f"{where} is not an object")
    if key not in obj:
        if optional:
            return None
        raise _bad(path, f"{where} lacks '{key}'")
    value = obj[key]
    if optional and value is None:
        return None
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise _bad(path, f"{where}.{key} has the wrong type")
    if not isinstance(value, types):
        raise _bad(path, f"{where}.{key} has the wrong type ({type(value).__name__})")
    if isinstance(value, float) and not math.isfinite(value):
        raise _bad(path, f"{where}.{key} is not finite")
    return value


def _node_from_json(item, path, where: str) -> Node:
    feature_type = _get(item, "feature_type", str, path, where)
    if feature_type not in KIND_OF_FEATURE_TYPE:
        raise _bad(path, f"{where}.feature_type '{feature_type[:40]}' is not one of {sorted(KIND_OF_FEATURE_TYPE)}")
    kind = KIND_OF_FEATURE_TYPE[feature_type]
    spec = KINDS[kind]
    position = _get(item, "ctx_idx", int, path, where) if spec.positioned else None
    if position is not None and position < 0:
        raise _bad(path, f"{where}.ctx_idx is negative")
    layer = _get(item, "mr_layer", int, path, where, optional=True)
    index = _get(item, "mr_index", int, path, where, optional=True)
    if spec.layered and (layer is None or layer < 0):
        raise _bad(path, f"{where} ({kind}) needs a layer >= 0 in 'mr_layer'")
    if spec.indexed and (index is None or index < 0):
        raise _bad(path, f"{where} ({kind}) needs an index >= 0 in 'mr_index'")
    activation = _get(item, "activation", (int, float), path, where, optional=True)
    token = _get(item, "token", str, path, where, optional=True)
    node = Node(kind, position, layer if spec.layered else None, index if spec.indexed else None,
                None if activation is None else float(activation), token)  # fmt: skip
    mr_id = _get(item, "mr_id", str, path, where)
    if mr_id != node.id:
        raise _bad(path, f"{where}.mr_id '{mr_id[:60]}' does not match its fields ('{node.id}')")
    return node


def load_graph(path: str | Path) -> Graph:
    """Read a graph file written by `save_graph` (a path or an fsspec URL) back into the Graph it was written from
    (edge weights as float32).

    Raises BadInputError (one line) for anything that is not such a file: not JSON, missing or mistyped fields,
    negative positions or layers, duplicate node ids, links to unknown nodes, non-finite weights."""
    path = storage.location(path)
    try:
        text = storage.read_bytes(path).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"cannot read graph file '{path}': {getattr(exc, 'strerror', None) or exc}") from None
    return graph_from_text(text, path)


def graph_from_text(text: str, path: str | Path = "<graph>") -> Graph:
    """`load_graph` for a file's text already read (`path` names it in errors)."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise _bad(path, f"not JSON ({str(exc).splitlines()[0][:100]})") from None
    meta = _get(data, "metadata", dict, path, "file")
    _get(data, "qParams", dict, path, "file")
    version = _get(meta, "schema_version", int, path, "metadata")
    if version != SCHEMA_VERSION:
        raise _bad(path, f"schema_version {version} is not {SCHEMA_VERSION}")
    prompt = _get(meta, "prompt", str, path, "metadata")
    tokens = _get(meta, "prompt_tokens", list, path, "metadata")
    if not all(isinstance(t, str) for t in tokens):
        raise _bad(path, "metadata.prompt_tokens holds a non-string")
    ext = _get(meta, "modelrecon", dict, path, "metadata")
    mr_version = _get(ext, "schema_version", int, path, "metadata.modelrecon")
    if mr_version != MODELRECON_SCHEMA_VERSION:
        raise _bad(path, f"modelrecon schema_version {mr_version} is not {MODELRECON_SCHEMA_VERSION}")
    model = _get(ext, "model", str, path, "metadata.modelrecon")
    token_ids = _get(ext, "token_ids", list, path, "metadata.modelrecon")
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in token_ids):
        raise _bad(path, "metadata.modelrecon.token_ids must be integers >= 0")
    graph_metadata = _get(ext, "graph_metadata", dict, path, "metadata.modelrecon")

    items = _get(data, "nodes", list, path, "file")
    nodes, index = [], {}
    for i, item in enumerate(items):
        node = _node_from_json(item, path, f"nodes[{i}]")
        node_id = _get(item, "node_id", str, path, f"nodes[{i}]")
        if node_id in index:
            raise _bad(path, f"node id '{node_id[:60]}' appears twice")
        index[node_id] = i
        nodes.append(node)
    if len({n.id for n in nodes}) != len(nodes):
        raise _bad(path, "two nodes describe the same feature, error, token or logit")

    links = _get(data, "links", list, path, "file")
    sources, targets, weights = [], [], []
    for i, link in enumerate(links):
        ends = []
        for key in ("source", "target"):
            end = _get(link, key, str, path, f"links[{i}]")
            if end not in index:
                raise _bad(path, f"links[{i}].{key} '{end[:60]}' is not a node")
            ends.append(index[end])
        sources.append(ends[0])
        targets.append(ends[1])
        weights.append(float(_get(link, "weight", (int, float), path, f"links[{i}]")))
    return Graph(
        prompt=prompt,
        tokens=list(tokens),
        token_ids=list(token_ids),
        model=model,
        nodes=nodes,
        sources=torch.tensor(sources, dtype=torch.int64),
        targets=torch.tensor(targets, dtype=torch.int64),
        weights=torch.tensor(weights, dtype=torch.float32),
        metadata=graph_metadata,
    )
