"""`modelrecon explain`: explanations of a dictionary's features from a cube, scored, saved, and written into a
trace's graph and dashboards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from modelrecon.cli.common import (
    TRANSCODERS_HELP,
    DeviceOption,
    DtypeOption,
    ModelOption,
    app,
    load_model,
    stdout,
)
from modelrecon.errors import BadInputError
from modelrecon.models.embedded import DEFAULT_MODEL

SpecHelp = "lexical (no model), local[:MODEL] (in-process; default the embedded smollm2-135m) or openai:URL#MODEL"


def parse_features(text: str) -> list[tuple[int, int]]:
    """`L/F,L/F,...` -> [(layer, feature)], with a one-line error for anything else."""
    features = []
    for item in text.split(","):
        layer, sep, feature = item.strip().partition("/")
        if not sep or not layer.isdigit() or not feature.isdigit():
            raise BadInputError(f"--features takes LAYER/FEATURE pairs like 3/17,29/394, not {item.strip()!r}")
        features.append((int(layer), int(feature)))
    return features


def graph_feature_nodes(path: str | Path, top: int | None = None) -> list[tuple[int, int]]:
    """The (layer, feature) pairs of a graph.json's feature nodes, most influential first (`top` of them)."""
    from modelrecon.circuits.graph_file import load_graph
    from modelrecon.circuits.prune import node_influence

    graph = load_graph(path)
    influence = node_influence(graph)
    order = sorted((i for i, n in enumerate(graph.nodes) if n.kind == "feature"), key=lambda i: -float(influence[i]))
    pairs = list(dict.fromkeys((graph.nodes[i].layer, graph.nodes[i].feature) for i in order))
    return pairs[:top] if top else pairs


def client(spec: str, timeout: float, concurrency: int):
    """None for the lexical explainer or judge, else a chat client."""
    if spec == "lexical":
        return None
    from modelrecon.explain.llm import client_from_spec

    return client_from_spec(spec, timeout=timeout, concurrency=concurrency)


@app.command()
def explain(
    cube: Annotated[
        str, typer.Option(help="a cube of mlp.in activations (modelrecon capture --sites 'layers.*.mlp.in')")
    ],
    out: Annotated[
        str, typer.Option("--out", "-o", help="the explanations file to write (resumed when it exists; path or URL)")
    ],
    dictionary: Annotated[
        str,
        typer.Option(
            "--dict",
            help=TRANSCODERS_HELP,
        ),
    ] = "default",
    features: Annotated[str | None, typer.Option(help="LAYER/FEATURE pairs: 3/17,29/394")] = None,
    graph: Annotated[
        str | None, typer.Option(help="a trace's graph.json (path or URL): explain its features and label the graph")
    ] = None,  # fmt: skip
    top: Annotated[int | None, typer.Option(min=1, help="with --graph: only its N most influential features")] = None,
    explainer: Annotated[str, typer.Option(help=f"who writes explanations: {SpecHelp}")] = "lexical",
    judge: Annotated[str, typer.Option(help=f"who scores detection and fuzzing: {SpecHelp}")] = "lexical",
    scorers: Annotated[
        str, typer.Option(help="detection, fuzzing, simulation, causal")
    ] = "detection,fuzzing,simulation,causal",
    neuronpedia: Annotated[Path | None, typer.Option(help="also write Neuronpedia's explanation export")] = None,
    timeout: Annotated[float, typer.Option(min=0.1, help="seconds per LLM request")] = 60.0,
    concurrency: Annotated[int, typer.Option(min=1, help="LLM requests in flight (endpoints)")] = 4,
    model: ModelOption = DEFAULT_MODEL,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
) -> None:
    """Explain features in words and score each explanation (detection, fuzzing, simulation, and causally by
    steering), each against another feature's explanation as its control."""
    from modelrecon.circuits.replacement import ReplacementModel
    from modelrecon.cube.reader import Cube
    from modelrecon.dictionaries.defaults import transcoders_by_name
    from modelrecon.explain.dashboards import check_cube
    from modelrecon.explain.explainers import check_scorers, explain_features
    from modelrecon.explain.store import label_trace, to_neuronpedia

    if (features is None) == (graph is None):
        raise BadInputError("name the features to explain with --features L/F,... or --graph graph.json (one of them)")
    chosen = parse_features(features) if features else graph_feature_nodes(graph, top)
    scorer_list = check_scorers(scorers.split(","))
    loaded = load_model(model, device, dtype)
    opened = Cube(cube)
    check_cube(opened, loaded.name)
    rm = ReplacementModel(loaded, transcoders_by_name(loaded, dictionary))
    bad = [f for f in chosen if not (0 <= f[0] < rm.n_layers and 0 <= f[1] < rm.dictionaries[0].config.width)]
    if bad:
        raise BadInputError(f"feature {bad[0][0]}/{bad[0][1]} is not in the dictionary ({rm.n_layers} layers of "
                            f"{rm.dictionaries[0].config.width} features)")  # fmt: skip
    document = explain_features(rm, opened, chosen, out, explainer=client(explainer, timeout, concurrency),
                                judge=client(judge, timeout, concurrency) or "lexical", scorers=scorer_list,
                                dictionary=dictionary)  # fmt: skip
    print_summary(document)
    stdout.print(f"wrote {out}", markup=False)
    if graph is not None:
        from modelrecon import storage

        nodes, dashboards = label_trace(document, storage.parent(storage.location(graph)))
        stdout.print(f"labelled {nodes} nodes of {graph}" + (f" and {dashboards} dashboards" if dashboards else ""),
                     markup=False)  # fmt: skip
    if neuronpedia is not None:
        from modelrecon.files import write_text_atomic

        write_text_atomic(neuronpedia, json.dumps(to_neuronpedia(document), indent=1))
        stdout.print(f"wrote {neuronpedia} (Neuronpedia explanation export)", markup=False)


def print_summary(document: dict) -> None:
    """Mean score and mean control per scorer over the explained features."""
    rows: dict[str, list[tuple[float, float]]] = {}
    failed = 0
    for feature in document["features"].values():
        if not feature.get("explanation"):
            failed += 1
            continue
        for name, score in feature.get("scores", {}).items():
            if score.get("score") is not None and score.get("control") is not None:
                rows.setdefault(name, []).append((score["score"], score["control"]))
    explained = len(document["features"]) - failed
    stdout.print(f"{explained} features explained by {document['explainer']['name']}"
                 + (f" ({failed} without an explanation)" if failed else ""), markup=False)  # fmt: skip
    for name, pairs in rows.items():
        score = sum(p[0] for p in pairs) / len(pairs)
        control = sum(p[1] for p in pairs) / len(pairs)
        stdout.print(f"  {name}: {score:.3f} (control {control:.3f}) over {len(pairs)} features", markup=False)
