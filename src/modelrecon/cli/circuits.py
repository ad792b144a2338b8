"""`modelrecon trace` (one prompt or a batch) and `graph-eval`: attribution graphs, their causal checks and their
quality on held-out prompts."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from modelrecon.cli.common import (
    TRANSCODERS_HELP,
    DeviceOption,
    DtypeOption,
    ModelOption,
    RayOption,
    TruncateOption,
    WorkersOption,
    app,
    interrupted,
    stdout,
)
from modelrecon.errors import BadInputError
from modelrecon.models.embedded import DEFAULT_MODEL


@app.command()
def trace(
    prompt: Annotated[str | None, typer.Argument(help="the prompt to trace (or --prompts FILE)")] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="the folder to write graph.json into (--prompts: NNNN/...)")
    ] = None,  # fmt: skip
    prompts: Annotated[
        Path | None,
        typer.Option("--prompts", help='many prompts: .txt (one a line) or .jsonl ({"prompt", "target"?, "wrong"?})'),
    ] = None,
    model: ModelOption = DEFAULT_MODEL,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    truncate: TruncateOption = False,
    transcoders: Annotated[
        str,
        typer.Option(help=TRANSCODERS_HELP),
    ] = "default",
    level: Annotated[
        str,
        typer.Option(
            help="features (transcoders), components (heads and MLPs, EAP-IG), or auto: features when transcoders exist"
        ),
    ] = "auto",  # fmt: skip
    target: Annotated[str | None, typer.Option(help="one target token (default: the top logits to 95%)")] = None,
    wrong: Annotated[str | None, typer.Option(help="with --target: trace logit(target) - logit(wrong)")] = None,
    counterfactual: Annotated[
        str | None, typer.Option(help="components: the baseline prompt (same length; default: the blank prompt)")
    ] = None,  # fmt: skip
    max_features: Annotated[int, typer.Option("--max-features", min=1, help="feature rows to compute")] = 1000,
    check_features: Annotated[int, typer.Option(min=1, help="nodes ablated by the causal check")] = 10,
    batch_size: Annotated[int, typer.Option(min=1, help="targets per backward pass")] = 32,
    cube: Annotated[
        Path | None, typer.Option(help="a cube of mlp.in activations: write feature dashboards (DIR/features.json)")
    ] = None,  # fmt: skip
    explain: Annotated[
        bool, typer.Option("--explain", help="with --cube: label the graph's features (DIR/explanations.json)")
    ] = False,  # fmt: skip
    explainer: Annotated[
        str, typer.Option(help="with --explain: lexical (instant), local[:MODEL] or openai:URL#MODEL")
    ] = "lexical",  # fmt: skip
    ray: RayOption = None,
    workers: WorkersOption = None,
) -> None:
    """Attribution graph of PROMPT: input tokens -> transcoder features (or heads and MLPs) -> output, pruned, with
    its strongest paths and a causal check (the graph's top nodes ablated against as many random ones).

    With --prompts FILE: every prompt traced into OUT/NNNN/graph.json, with OUT/summary.json and OUT/summary.csv;
    re-run the same command to resume (a prompt whose graph exists is skipped). --ray spreads the prompts over Ray
    workers, each loading the model once."""
    from modelrecon.circuits.batch import TraceSource

    if (prompt is None) == (prompts is None):
        raise BadInputError("give either a PROMPT or --prompts FILE")
    if out is None:
        raise BadInputError("give --out DIR: the folder to write the graph" + ("s" if prompts else "") + " into")
    source = TraceSource(model, transcoders, level, device, dtype, truncate)  # checks --level
    if explain and cube is None:
        raise BadInputError("--explain needs --cube CUBE (the text the features' examples come from)")
    if prompts is not None:
        _trace_batch(source, prompts, out, target, wrong, counterfactual, cube, ray, workers,
                     max_features=max_features, check_features=check_features, batch_size=batch_size)  # fmt: skip
        return
    if ray is not None or workers is not None:
        raise BadInputError("--ray and --workers trace many prompts: give --prompts FILE")
    from modelrecon.circuits.check import strongest_paths
    from modelrecon.circuits.graph_file import save_graph
    from modelrecon.circuits.tracing import trace as trace_prompt

    loaded, rm, note = source.load()
    level = "components" if rm is None else "features"
    if note:
        stdout.print(note, markup=False)
    if level == "features":
        corpus_cube = _open_cube_for(cube, loaded.name)
    traced = trace_prompt(loaded, prompt, rm, target=target, wrong=wrong,
                          counterfactual=counterfactual if level == "components" else None,
                          max_feature_nodes=max_features, batch_size=batch_size,
                          check_features=check_features)  # fmt: skip
    graph, pruned, check = traced.graph, traced.pruned, traced.check
    out.mkdir(parents=True, exist_ok=True)
    path = save_graph(pruned, out / "graph.json")
    stdout.print(f"{graph.n_nodes} nodes, {len(graph.weights)} edges -> pruned to {pruned.n_nodes} nodes, "
                 f"{len(pruned.weights)} edges in {graph.metadata['seconds']:.1f} s", markup=False)  # fmt: skip
    if "edge_check_error" in graph.metadata:
        stdout.print(f"edges checked by one exact intervention (every source moved at once, attention and norms "
                     f"frozen): largest error {graph.metadata['edge_check_error']:.1e} of the largest change",
                     markup=False)  # fmt: skip
    for i, p in enumerate(strongest_paths(graph), 1):
        steps = " -> ".join(f"{graph.nodes[n].label} ({w:+.2f})" for n, w in p)
        stdout.print(f"path {i}: {steps} -> logit {graph.nodes[graph.logit_nodes()[0]].token!r}", markup=False)
    stdout.print(check.summary(), markup=False)
    stdout.print(f"wrote {path}", markup=False)
    if level == "features" and cube is not None:
        from modelrecon.explain.dashboards import feature_dashboards, graph_features, save_dashboards

        dashboards = feature_dashboards(rm, graph_features(pruned), corpus_cube)
        stdout.print(f"wrote {save_dashboards(dashboards, out / 'features.json')} "
                     f"({len(dashboards['features'])} feature dashboards from {corpus_cube.n_tokens} tokens)",
                     markup=False)  # fmt: skip
        if explain:
            _label_trace(rm, corpus_cube, pruned, out, explainer, transcoders)
    stdout.print(f"view it: modelrecon serve {out}", markup=False)


def _trace_batch(source, prompts: Path, out: Path, target, wrong, counterfactual, cube, ray, workers,
                 **options) -> None:  # fmt: skip
    """`trace --prompts`: every prompt's graph into OUT/NNNN/graph.json and a summary table (circuits.batch)."""
    from dataclasses import replace

    from modelrecon.circuits.batch import TraceOptions, read_batch_prompts, trace_batch

    if cube is not None:
        raise BadInputError("--cube and --explain work on one PROMPT; trace it on its own for dashboards")
    if counterfactual is not None:
        raise BadInputError('with --prompts, give each prompt its counterfactual in the JSONL ("counterfactual")')
    if workers is not None and ray is None:
        raise BadInputError("--workers needs --ray ADDRESS (local: a Ray cluster on this machine)")
    items = [replace(p, target=p.target if p.target is not None else target,
                     wrong=p.wrong if p.wrong is not None else wrong) for p in read_batch_prompts(prompts)]  # fmt: skip
    trace_options = TraceOptions(max_feature_nodes=options["max_features"], batch_size=options["batch_size"],
                                 check_features=options["check_features"])  # fmt: skip

    def started(summary) -> None:
        if summary.note:
            stdout.print(summary.note, markup=False)

    try:
        summary = trace_batch(source, items, out, trace_options, ray=ray, workers=workers, on_start=started)
    except KeyboardInterrupt:
        interrupted(out)
    where = "this process" if summary.workers is None else f"{summary.workers} Ray worker(s)"
    title = f"{summary.model} ({summary.level}): {len(summary.rows)} prompts, {where}"
    table = Table("#", "prompt", "target", "nodes", "edges", "pruned", "edge check", "causal: top", "predicted",
                  "random", "s", title=title)  # fmt: skip
    for row in summary.rows:
        edge_error = row["edge_check_error"]
        table.add_row(str(row["index"]), escape(repr(row["prompt"][:40])), escape(repr(row["target"])),
                      str(row["nodes"]), str(row["edges"]), f"{row['pruned_nodes']} / {row['pruned_edges']}",
                      "" if edge_error is None else f"{edge_error:.1e}", _signed(row["causal_top_change"]),
                      _signed(row["causal_top_predicted"]), _signed(row["causal_random_mean"]),
                      "resumed" if row["seconds"] is None else f"{row['seconds']:.1f}")  # fmt: skip
    stdout.print(table)
    resumed = sum(r["status"] == "resumed" for r in summary.rows)
    stdout.print(f"traced {len(summary.rows) - resumed} prompt(s), {resumed} already done, in {summary.seconds:.1f} s; "
                 f"wrote {out / 'summary.json'} and {out / 'summary.csv'}", markup=False)  # fmt: skip
    stdout.print(f"view them: modelrecon serve {out}", markup=False)


def _signed(value) -> str:
    return "" if value is None else f"{value:+.3f}"


def _label_trace(rm, cube, graph, out: Path, explainer: str, transcoders: str) -> None:
    """Explain the graph's features (scored by the lexical judge) and write the labels into graph and dashboards."""
    from modelrecon.cli.explain import client, print_summary
    from modelrecon.explain.dashboards import graph_features
    from modelrecon.explain.explainers import explain_features
    from modelrecon.explain.store import label_trace

    (out / "explanations.json").unlink(missing_ok=True)  # a new graph: its labels start afresh
    document = explain_features(rm, cube, graph_features(graph), out / "explanations.json",
                                explainer=client(explainer, 60.0, 4), dictionary=transcoders)  # fmt: skip
    print_summary(document)
    nodes, _ = label_trace(document, out)
    stdout.print(f"wrote {out / 'explanations.json'}; labelled {nodes} feature nodes", markup=False)


def _open_cube_for(path: Path | None, model_name: str):
    """The dashboards' cube, opened and checked before the long work so a bad one fails at once."""
    if path is None:
        return None
    from modelrecon.cube.reader import Cube
    from modelrecon.explain.dashboards import check_cube

    cube = Cube(path)
    check_cube(cube, model_name)
    return cube


def _figure(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


@app.command("graph-eval")
def graph_eval(
    json_out: Annotated[Path, typer.Option("--json", help="the JSON report to write (per prompt and averages)")],
    transcoders: Annotated[
        str,
        typer.Option(help=TRANSCODERS_HELP),
    ] = "default",
    prompts: Annotated[
        Path | None, typer.Option(help="a JSONL file of {prompt, answer, kind?, subject?} (default: the shipped set)")
    ] = None,  # fmt: skip
    model: ModelOption = DEFAULT_MODEL,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    max_features: Annotated[int, typer.Option("--max-features", min=1, help="feature rows per graph")] = 1000,
    check_features: Annotated[int, typer.Option(min=1, help="features ablated by each causal check")] = 10,
    limit: Annotated[int | None, typer.Option(min=1, help="only the first N prompts")] = None,
    ray: RayOption = None,
    workers: WorkersOption = None,
) -> None:
    """Graph quality on held-out prompts: each traced to its answer, scored (replacement, completeness, errors'
    share, influence through features, top input tokens, subject's share) and checked by intervention. With --ray,
    the prompts are spread over Ray workers that each load the model once; the report is the same."""
    from modelrecon.circuits.batch import TraceSource
    from modelrecon.circuits.evaluate import evaluate_batch, read_prompts
    from modelrecon.files import write_text_atomic

    if workers is not None and ray is None:
        raise BadInputError("--workers needs --ray ADDRESS (local: a Ray cluster on this machine)")
    chosen = read_prompts(prompts)[:limit]
    source = TraceSource(model, transcoders, "features", device, dtype)
    report = evaluate_batch(source, chosen, max_feature_nodes=max_features, check_features=check_features,
                            ray=ray, workers=workers)  # fmt: skip
    data = report.to_dict()
    columns = {"replacement": "replacement", "completeness": "completeness", "error_share": "error share",
               "through_features": "via features", "subject_share": "subject share", "subject_top": "subject top",
               "causal_agrees": "causal agrees", "causal_accounted": "accounted (median)"}  # fmt: skip
    table = Table("prompts", "n", *columns.values(), title=f"graph quality of {transcoders} on {report.model}")
    for name, row in [*data["by_kind"].items(), ("all", data["average"])]:
        table.add_row(name, str(row["prompts"]), *(_figure(row[k]) for k in columns))
    stdout.print(table)
    wrong = [r["prompt"] for r in data["prompts"] if not r["correct"]]
    if wrong:
        stdout.print(f"{len(wrong)} prompt(s) the model does not answer: {wrong[:3]}", markup=False)
    stdout.print(f"wrote {write_text_atomic(json_out, json.dumps(data, indent=1))}", markup=False)
