"""The explanations file (docs/explanations.md): explanations and their scores for one dictionary, one JSON
document written atomically after every batch, so a killed run leaves the features done so far and resumes there.

`{"schema": "modelrecon-explanations", "version": 1, "model", "dictionary", "cube", "explainer": {"name",
"prompt_version"}, "judge", "created", "updated", "features": {"LAYER_FEATURE": {"layer", "feature", "explanation",
"frequency", "scores": {"detection": {"score", "control", "n", "judge", "auc"}, ...}, "error"?}}}`

Paths may be fsspec URLs (storage.py): there each write is one whole object.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from modelrecon import storage
from modelrecon.errors import BadInputError

SCHEMA = "modelrecon-explanations"
VERSION = 1


def new_document(model: str, dictionary: str, cube: str, explainer: str, prompt_version: str, judge: str) -> dict:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"schema": SCHEMA, "version": VERSION, "model": model, "dictionary": dictionary, "cube": cube,
            "explainer": {"name": explainer, "prompt_version": prompt_version}, "judge": judge, "created": now,
            "updated": now, "features": {}}  # fmt: skip


def load_explanations(path: str | Path) -> dict:
    """An explanations file (a path or a URL), checked (one-line errors for anything else)."""
    path = storage.location(path)
    try:
        data = json.loads(storage.read_bytes(path).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"cannot read explanations {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("features"), dict):
        raise BadInputError(f"{path} is not a modelrecon explanations file (schema {SCHEMA})")
    if data.get("version", 0) > VERSION:
        raise BadInputError(f"{path} has explanations version {data['version']}; upgrade modelrecon to read it")
    return data


def save_explanations(document: dict, path: str | Path) -> Path | str:
    """Write the document whole (atomically replaced; one object at a URL); returns the path (a URL as a string)."""
    document["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path = storage.location(path)
    storage.write_bytes(path, json.dumps(document, indent=1, allow_nan=False).encode("utf-8"))
    return path


def resumable(path: str | Path, model: str, explainer: str, prompt_version: str) -> dict | None:
    """The existing document at `path` when it can be continued (same model, explainer and prompts), else None."""
    if not storage.exists(path):
        return None
    document = load_explanations(path)
    same = (document.get("model") == model and document["explainer"].get("name") == explainer
            and document["explainer"].get("prompt_version") == prompt_version)  # fmt: skip
    if not same:
        raise BadInputError(f"{path} holds explanations by {document['explainer'].get('name')} of "
                            f"{document.get('model')}; write to another --out or delete it")  # fmt: skip
    return document


def labels(document: dict) -> dict[str, str]:
    """`{"LAYER_FEATURE": explanation}` of every explained feature."""
    return {key: f["explanation"] for key, f in document["features"].items() if f.get("explanation")}


def apply_to_dashboards(document: dict, dashboards: dict) -> int:
    """Write explanations and scores into a features.json document; returns how many features got one."""
    count = 0
    for key, feature in dashboards["features"].items():
        explained = document["features"].get(key)
        if explained and explained.get("explanation"):
            feature["explanation"] = explained["explanation"]
            feature["explanation_scores"] = explained.get("scores", {})
            feature["explainer"] = document["explainer"]["name"]
            count += 1
    return count


def to_neuronpedia(document: dict, model_id: str | None = None, source: str = "transcoder") -> list[dict]:
    """Neuronpedia's explanation export records: one per feature, `layer` as `LAYER-SOURCE`."""
    explainer = document["explainer"]["name"]
    return [{"modelId": model_id or document["model"], "layer": f"{f['layer']}-{source}", "index": str(f["feature"]),
             "description": f["explanation"], "explanationModelName": explainer,
             "typeName": "modelrecon-" + document["explainer"]["prompt_version"]}
            for f in document["features"].values() if f.get("explanation")]  # fmt: skip


def apply_to_graph(document: dict, graph: dict) -> int:
    """Set each explained feature node's `clerp` (its label, as circuit-tracer and Neuronpedia name it) in a
    graph.json document; returns how many nodes got one."""
    explained = labels(document)
    count = 0
    for node in graph["nodes"]:
        if node.get("feature_type") == "cross layer transcoder":
            text = explained.get(f"{node.get('mr_layer', node.get('layer'))}_{node.get('mr_index')}")
            if text:
                node["clerp"] = text
                count += 1
    return count


def label_trace(document: dict, folder: str | Path) -> tuple[int, int]:
    """Write the explanations into a trace folder's graph.json (labels) and features.json (explanations and scores),
    each rewritten atomically (one whole object at a URL); returns (labelled nodes, explained dashboards)."""
    folder = storage.location(folder)
    nodes = dashboards = 0
    graph_path, features_path = storage.join(folder, "graph.json"), storage.join(folder, "features.json")
    if storage.is_file(graph_path):
        graph = json.loads(storage.read_bytes(graph_path))
        nodes = apply_to_graph(document, graph)
        storage.write_bytes(graph_path, json.dumps(graph, allow_nan=False).encode("utf-8"))
    if storage.is_file(features_path):
        features = json.loads(storage.read_bytes(features_path))
        dashboards = apply_to_dashboards(document, features)
        storage.write_bytes(features_path, json.dumps(features, allow_nan=False).encode("utf-8"))
    return nodes, dashboards
