"""`modelrecon patch`, `experiment`, `lens`, `attribute`, `verify`: interventions over prompt pairs and the
correlational attributions next to their causal check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from modelrecon.cli.common import (
    AnswerOption,
    CleanOption,
    CorruptOption,
    DeviceOption,
    DtypeOption,
    ModelOption,
    PairsOption,
    SweepOption,
    TruncateOption,
    WrongOption,
    app,
    check_sweep,
    load_model,
    read_pair_options,
    stdout,
)
from modelrecon.errors import BadInputError
from modelrecon.models.embedded import DEFAULT_MODEL


@app.command()
def patch(
    sweep: SweepOption,
    json_out: Annotated[Path, typer.Option("--json", help="the JSON result file to write")],
    model: ModelOption = DEFAULT_MODEL,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    truncate: TruncateOption = False,
    pairs: PairsOption = None,
    clean: CleanOption = None,
    corrupt: CorruptOption = None,
    answer: AnswerOption = None,
    wrong: WrongOption = None,
    direction: Annotated[str, typer.Option(help="denoise: patch clean into corrupt; noise: the reverse")] = "denoise",
    metric: Annotated[str, typer.Option(help="logit_diff, prob, logprob, rank, top1 or kl")] = "logit_diff",
    html_out: Annotated[Path | None, typer.Option("--html", help="also write a self-contained heatmap")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="patched rows per forward pass")] = None,
    seed: Annotated[int, typer.Option(help="seed of the bootstrap")] = 0,
    path_to: Annotated[
        list[str] | None,
        typer.Option(
            "--path-to", help="path patching with --sweep heads|mlp: 'logits' or a receiver like layers.20.attn.q:3"
        ),
    ] = None,
) -> None:
    """Activation patching: patch every cell of a sweep and write the normalised effects (JSON, optional HTML).

    With --path-to, each sender's effect goes through that path only (path patching).
    """
    from modelrecon.counterfactual.sweep import DIRECTIONS, HEAD_SWEEPS, path_patch
    from modelrecon.counterfactual.sweep import sweep as run_sweep
    from modelrecon.files import write_text_atomic

    check_sweep(sweep)
    if direction not in DIRECTIONS:
        raise BadInputError(f"unknown --direction {direction!r}; use denoise or noise")
    if path_to and sweep not in ("heads", "mlp"):
        raise BadInputError(f"--path-to needs --sweep heads or --sweep mlp (the senders), not --sweep {sweep}")
    pair_list = read_pair_options(pairs, clean, corrupt, answer, wrong)
    loaded = load_model(model, device, dtype, truncate)
    options = dict(direction=direction, metric=metric, batch_size=batch_size, seed=seed, progress=True)
    if path_to:
        result = path_patch(loaded, pair_list, list(path_to), senders=sweep, **options)
    else:
        result = run_sweep(loaded, pair_list, sweep, **options)
    report = {"model": loaded.name, **result.to_dict()}
    write_text_atomic(json_out, json.dumps(report, indent=1))
    stdout.print(
        f"{result.metric}: clean {result.clean:.4f}, corrupt {result.corrupt:.4f} ({len(pair_list)} pair(s))",
        markup=False,
    )
    table = Table("site", "head" if sweep in HEAD_SWEEPS else "position", "effect", "95% CI", title="largest effects")
    for row in sorted(report["results"], key=lambda r: -abs(r["effect"] or 0.0))[:8]:
        if row["position"] is None:
            where = str(row.get("head", "all positions"))
        else:
            where = f"{row['position']} {result.tokens[row['position']]!r}"
        table.add_row(
            row["site"], escape(where), f"{row['effect']:.3f}", f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
        )
    stdout.print(table)
    stdout.print(f"wrote {json_out}", markup=False)
    if html_out is not None:
        stdout.print(f"wrote {_experiment_html('sweep', report, html_out)}", markup=False)


@app.command()
def experiment(
    pairs: Annotated[str, typer.Option("--pairs", help="JSONL file of pairs, or a shipped dataset name (capitals)")],
    components: Annotated[Path, typer.Option("--components", help='JSON file: {"name": [intervention, ...], ...}')],
    json_out: Annotated[Path, typer.Option("--json", help="the JSON result file to write")],
    model: ModelOption = DEFAULT_MODEL,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    truncate: TruncateOption = False,
    base: Annotated[str, typer.Option(help="the input the interventions apply to: clean or counterfactual")] = "clean",
    metric: Annotated[str, typer.Option(help="logit_diff, prob, logprob, rank, top1 or kl")] = "logit_diff",
    batch_size: Annotated[int, typer.Option(min=1, help="pairs per forward pass")] = 16,
    seed: Annotated[int, typer.Option(help="seed of the bootstrap, the tests and resampling")] = 0,
) -> None:
    """Run components (lists of interventions) over prompt pairs: effects, intervals, tests and sanity checks."""
    from modelrecon.counterfactual.experiment import experiment as run_experiment
    from modelrecon.counterfactual.interventions import components_from_json
    from modelrecon.counterfactual.pairs import read_pairs
    from modelrecon.files import read_text, write_text_atomic

    if not components.is_file():
        raise BadInputError(f"components file {components} does not exist; give a JSON file of named interventions")
    parsed = components_from_json(read_text(components, "components file"), str(components))
    pair_list = read_pairs(pairs)
    loaded = load_model(model, device, dtype, truncate)
    result = run_experiment(
        loaded, pair_list, parsed, metric=metric, base=base, batch_size=batch_size, seed=seed, progress=True
    )
    write_text_atomic(json_out, json.dumps({"model": loaded.name, **result.to_dict()}, indent=1))
    sanity = result.sanity
    stdout.print(
        f"{result.metric} over {len(pair_list)} pairs; sanity: no-op exact {sanity['noop_exact']}, "
        f"full patch exact {sanity['full_patch_exact']}",
        markup=False,
    )
    for note in sanity["notes"]:
        stdout.print(f"warning: {note}", markup=False)
    table = Table("component", "effect", "95% CI", "p", "p (Holm)")
    for c in result.components:
        table.add_row(
            escape(c.name), f"{c.effect:.3f}", f"[{c.ci_low:.3f}, {c.ci_high:.3f}]", f"{c.p_value:.3g}",
            f"{c.p_adjusted:.3g}",
        )  # fmt: skip
    stdout.print(table)
    stdout.print(f"wrote {json_out}", markup=False)


@app.command()
def lens(
    prompt: Annotated[str, typer.Argument(help="the prompt text")],
    model: ModelOption = DEFAULT_MODEL,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    truncate: TruncateOption = False,
    target: Annotated[str | None, typer.Option(help="a token to follow across layers, e.g. ' Paris'")] = None,
    top: Annotated[int, typer.Option("--top", "-k", min=1, help="tokens per cell")] = 5,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the lens as JSON")] = None,
    html_out: Annotated[Path | None, typer.Option("--html", help="write a self-contained HTML table")] = None,
) -> None:
    """Logit lens: the top next token after each layer at every position, and a target token's rank and probability."""
    from modelrecon.attribution.html import write_lens_html
    from modelrecon.attribution.lens import logit_lens
    from modelrecon.files import write_text_atomic
    from modelrecon.models.model import check_prompt

    check_prompt(prompt)
    loaded = load_model(model, device, dtype, truncate)
    result = logit_lens(loaded, prompt, k=top, target=target)
    columns = ["layer", "top at last position", "p"] + (["target p", "target rank"] if target else [])
    table = Table(*columns, title=f"{loaded.name}: logit lens on {prompt!r}")
    for r, name in enumerate(result.rows):
        row = [name, repr(result.top_tokens[r][-1][0]), f"{float(result.top_probs[r, -1, 0]):.3f}"]
        if target:
            row += [f"{float(result.target_probs[r, -1]):.3g}", str(int(result.target_ranks[r, -1]))]
        table.add_row(*(escape(c) for c in row))
    stdout.print(table)
    if json_out is not None:
        stdout.print(f"wrote {write_text_atomic(json_out, result.to_json())}", markup=False)
    if html_out is not None:
        stdout.print(f"wrote {write_lens_html(result, html_out)}", markup=False)


PROMPT_METHODS = ("dla", "grad-x-act", "ig")


@app.command()
def attribute(
    method: Annotated[
        str, typer.Option("--method", help="dla, grad-x-act, ig (a prompt) or atp, atp-ig, atp-gd, eap, eap-ig (pairs)")
    ],
    json_out: Annotated[Path, typer.Option("--json", help="the JSON result file to write")],
    prompt: Annotated[str | None, typer.Argument(help="the prompt (dla, grad-x-act, ig)")] = None,
    model: ModelOption = DEFAULT_MODEL,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    truncate: TruncateOption = False,
    answer: AnswerOption = None,
    wrong: WrongOption = None,
    site: Annotated[str, typer.Option(help="the site for grad-x-act and ig (embed = the input embeddings)")] = "embed",
    baseline: Annotated[
        str | None, typer.Option(help="ig baseline: a counterfactual prompt of the same length (default: zeros)")
    ] = None,
    steps: Annotated[int, typer.Option(min=1, help="ig / atp-ig / eap-ig steps")] = 32,
    neurons: Annotated[bool, typer.Option("--neurons", help="dla: split MLPs into neurons")] = False,
    pairs: PairsOption = None,
    clean: CleanOption = None,
    corrupt: CorruptOption = None,
    sweep: Annotated[str, typer.Option(help="atp family: the sweep to estimate")] = "resid_pre",
    direction: Annotated[str, typer.Option(help="denoise or noise")] = "denoise",
    level: Annotated[str, typer.Option(help="eap / eap-ig: edges between heads or between components")] = "head",
) -> None:
    """Correlational attributions: direct logit attribution, gradient x activation, integrated gradients, and
    attribution patching (nodes: atp, atp-ig, atp-gd; edges: eap, eap-ig)."""
    from modelrecon.attribution.edges import EDGE_METHODS
    from modelrecon.attribution.patching import METHODS
    from modelrecon.files import write_text_atomic

    known = (*PROMPT_METHODS, *METHODS, *EDGE_METHODS)
    if method not in known:
        raise BadInputError(f"unknown --method {method!r}; use one of {', '.join(known)}")
    if method in PROMPT_METHODS:
        if prompt is None or answer is None:
            raise BadInputError(f"--method {method} needs a PROMPT argument and --answer (and optionally --wrong)")
        loaded = load_model(model, device, dtype, truncate)
        text = _prompt_attribution(loaded, method, prompt, answer, wrong, site, baseline, steps, neurons)
    else:
        if prompt is not None:
            raise BadInputError(f"--method {method} works on pairs: give --pairs or --clean/--corrupt/--answer/--wrong")
        pair_list = read_pair_options(pairs, clean, corrupt, answer, wrong)
        loaded = load_model(model, device, dtype, truncate)
        text = _pair_attribution(loaded, method, pair_list, sweep, direction, steps, level)
    stdout.print(f"wrote {write_text_atomic(json_out, text)}", markup=False)


def _prompt_attribution(loaded, method, prompt, answer, wrong, site, baseline, steps, neurons) -> str:
    from modelrecon.attribution.dla import direct_logit_attribution
    from modelrecon.attribution.gradients import grad_x_act, integrated_gradients

    if method == "dla":
        result = direct_logit_attribution(loaded, prompt, answer, wrong, neurons=neurons)
        stdout.print(f"{result.direction}: {result.logit:.4f}; the terms sum to {result.total:.4f}", markup=False)
        table = Table("component", "direct effect", title="largest terms")
        for t in sorted(result.terms, key=lambda t: -abs(t.value))[:10]:
            table.add_row(escape(t.name), f"{t.value:+.4f}")
        stdout.print(table)
        return result.to_json()
    if method == "grad-x-act":
        result = grad_x_act(loaded, prompt, site, answer, wrong)
    else:
        result = integrated_gradients(loaded, prompt, site, answer, wrong, baseline=baseline, steps=steps)
        c = result.completeness
        stdout.print(
            f"completeness: attributions sum to {c['sum']:.4f}, the target changed by {c['delta']:.4f} "
            f"(relative error {c['relative_error']:.2%} with {c['steps']} steps)",
            markup=False,
        )
    table = Table("position", "token", "attribution", title=f"{method} at {result.site} for {result.target}")
    for p, (token, value) in enumerate(zip(result.tokens, result.per_position.tolist(), strict=True)):
        table.add_row(str(p), escape(repr(token)), f"{value:+.4f}")
    stdout.print(table)
    return result.to_json()


def _pair_attribution(loaded, method, pair_list, sweep, direction, steps, level) -> str:
    from modelrecon.attribution.edges import EDGE_METHODS, edge_attribution
    from modelrecon.attribution.patching import attribution_patching

    if method in EDGE_METHODS:
        result = edge_attribution(loaded, pair_list, method=method, direction=direction, steps=steps, level=level)
        table = Table("edge", "score", title="largest edges")
        for e in result.top(10):
            table.add_row(escape(f"{e['upstream']} -> {e['downstream']}"), f"{e['score']:+.4f}")
        stdout.print(table)
        return result.to_json()
    result = attribution_patching(
        loaded, pair_list, sweep, method=method, direction=direction, steps=steps, progress=True
    )
    stdout.print(f"{method} estimate of the {sweep} sweep over {len(pair_list)} pair(s)", markup=False)
    return result.to_json()


@app.command()
def verify(
    sweep: SweepOption,
    json_out: Annotated[Path, typer.Option("--json", help="the JSON report to write")],
    model: ModelOption = DEFAULT_MODEL,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    truncate: TruncateOption = False,
    method: Annotated[str, typer.Option(help="the estimate to check: atp, atp-ig, atp-gd or atpstar")] = "atp",
    pairs: PairsOption = None,
    clean: CleanOption = None,
    corrupt: CorruptOption = None,
    answer: AnswerOption = None,
    wrong: WrongOption = None,
    direction: Annotated[str, typer.Option(help="denoise or noise")] = "denoise",
    steps: Annotated[int, typer.Option(min=1, help="atp-ig steps")] = 16,
    html_out: Annotated[
        Path | None, typer.Option("--html", help="also write the report as a self-contained page")
    ] = None,
) -> None:
    """Causal vs correlational: an attribution estimate of every cell next to its exact patching effect."""
    from modelrecon.attribution.compare import compare
    from modelrecon.attribution.patching import METHODS, attribution_patching
    from modelrecon.counterfactual.sweep import sweep as run_sweep
    from modelrecon.files import write_text_atomic

    check_sweep(sweep)
    if method not in METHODS:
        raise BadInputError(f"unknown --method {method!r}; use one of {', '.join(METHODS)}")
    pair_list = read_pair_options(pairs, clean, corrupt, answer, wrong)
    loaded = load_model(model, device, dtype, truncate)
    estimate = attribution_patching(
        loaded, pair_list, sweep, method=method, direction=direction, steps=steps, progress=True
    )
    exact = run_sweep(loaded, pair_list, sweep, direction=direction, progress=True)
    report = compare(estimate, exact)
    write_text_atomic(
        json_out, json.dumps({"model": loaded.name, "n_pairs": len(pair_list), **report.to_dict()}, indent=1)
    )
    stdout.print(
        f"{method} vs exact {sweep} patching over {len(pair_list)} pair(s), {report.n_cells} cells: "
        f"Spearman {report.spearman:.3f}, Kendall {report.kendall:.3f}, Pearson {report.pearson:.3f}, "
        f"{len(report.disagreements)} disagreements",
        markup=False,
    )
    table = Table("site", "position", "head", "estimate", "exact", "kind", title="largest disagreements")
    for d in report.disagreements[:8]:
        table.add_row(
            d.site, "" if d.position is None else str(d.position), "" if d.head is None else str(d.head),
            f"{d.estimate:.3f}", f"{d.exact:.3f}", d.kind,
        )  # fmt: skip
    stdout.print(table)
    stdout.print(f"wrote {json_out}", markup=False)
    if html_out is not None:
        stdout.print(f"wrote {_experiment_html('verify', report.to_dict(), html_out)}", markup=False)


def _experiment_html(kind: str, data: dict, out: Path) -> Path:
    """The viewer's experiment view of a result, as a standalone page."""
    from modelrecon.web.notebook import View, experiment_page

    return View(experiment_page(kind, data, out.with_suffix(".json").name)).save(out)
