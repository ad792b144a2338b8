"""The ground-truth runner: every applicable method on every task, scored against the known mechanism.

Methods give one signed score per unit: its contribution to the metric (logit of the answer minus the wrong
answer), averaged over the task's prompts; positive means it supports the answer.
- exact: zero-ablate the unit; contribution = metric(clean) - metric(ablated).
- grad-x-act: activation times gradient (also the AtP estimate of that zero ablation).
- ig: integrated gradients from the task's baseline at the site (zeros unless it names one), 32 steps.
- dla: direct logit attribution of the unit (MLP neurons; needs no post-norm on the MLP output).
- patching, atp, atp-ig (tasks with counterfactual prompts, head units): the normalised effect of patching each head
  from the clean into the counterfactual run (denoising), exactly or by attribution patching.

Circuit discovery over edges (tasks with an edge ground truth): each method scores every edge between heads, MLPs,
embeddings and logits by its contribution, metric(clean) - metric(the edge alone carrying the counterfactual):
- edge-patching: exactly, one patched edge per row of a batched forward pass;
- eap, eap-ig: estimated by edge attribution patching (one gradient per receiver; eap-ig along the input path).
Circuits are the top edges by |score| over MIB's edge budgets (0.1%..100%); CPR and CMD are the areas under their
normalised faithfulness, (m(circuit) - m(no edges)) / (m(all edges) - m(no edges)), every edge outside the circuit
carrying its counterfactual value (exact edge patching).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

from modelrecon.attribution.dla import direct_logit_attribution
from modelrecon.attribution.edges import all_edges, edge_attribution, patch_edges
from modelrecon.attribution.gradients import grad_x_act, integrated_gradients, target_fn
from modelrecon.attribution.patching import attribution_patching
from modelrecon.counterfactual.interventions import Zero, run_with
from modelrecon.counterfactual.metrics import ScoredItem, item_metric
from modelrecon.counterfactual.pairs import tokenize_pairs
from modelrecon.counterfactual.sweep import sweep
from modelrecon.errors import BadInputError
from modelrecon.groundtruth.scoring import direction_recovery, score_method, significant
from modelrecon.groundtruth.tasks import TASKS, Task
from modelrecon.hooks.run import run
from modelrecon.models.model import Model
from modelrecon.models.sites import parse_site


def _units(model: Model, task: Task) -> list[tuple[str, dict]]:
    """Every unit as (site, selection): `units=[u]` on one site, or `heads=[h]` on each layer's attn.heads."""
    sites = model.resolve_sites(task.site)
    if parse_site(sites[0]).kind == "attn.heads":
        return [(site, {"heads": [h]}) for site in sites for h in range(model.n_heads)]
    (site,) = sites
    return [(site, {"units": [u]}) for u in range(task.n_units)]


def _ablation(model: Model, task: Task, units: list[int]) -> list[Zero]:
    """Zero interventions for some of the task's units."""
    selections = _units(model, task)
    return [Zero(selections[u][0], **selections[u][1]) for u in units]


def faithfulness_curve(model: Model, task: Task, scores: np.ndarray) -> dict:
    """Circuits of growing size, the units ranked by |score| (ties against the method: later units first).

    For k = 0..n of the scored units kept (the rest zero-ablated), faithfulness = the circuit's metric / the full
    model's, over the task's prompts. CPR = the area under faithfulness over the kept fraction (higher is better),
    CMD = the area under |1 - faithfulness| (lower is better): MIB's two areas, over unit budgets.
    """
    kept_units = task.scored_units()
    order = sorted(kept_units, key=lambda u: (-abs(scores[u]), -u))
    full, curve = 0.0, []
    circuits = [order[:k] for k in range(len(order) + 1)]
    values = np.zeros(len(circuits))
    for prompt, answer, wrong in task.answer_pairs():
        _, fn = target_fn(model, answer, wrong)
        full += float(fn(run(model, prompt).logits[0][-1]))
        for k, circuit in enumerate(circuits):
            removed = [u for u in kept_units if u not in circuit]
            values[k] += float(fn(run_with(model, prompt, _ablation(model, task, removed)).logits[0][-1]))
    curve = (values / full).tolist() if full else [float("nan")] * len(circuits)
    fractions = np.linspace(0, 1, len(circuits))
    return {
        "faithfulness": curve,
        "cpr": float(np.trapezoid(curve, fractions)),
        "cmd": float(np.trapezoid(np.abs(1 - np.array(curve)), fractions)),
    }


def _per_unit(model: Model, site: str, values: torch.Tensor) -> np.ndarray:
    """A per-element attribution `[pos, ...]` summed into one number per unit (per head for attn.heads)."""
    values = values.double()
    if parse_site(site).kind == "attn.heads":
        return values.sum(dim=(0, 2)).numpy()
    return values.sum(0).numpy()


def _exact(model: Model, task: Task) -> np.ndarray:
    out = np.zeros(task.n_units)
    for prompt, answer, wrong in task.answer_pairs():
        _, fn = target_fn(model, answer, wrong)
        clean = float(fn(run(model, prompt).logits[0][-1]))
        for k, (site, selection) in enumerate(_units(model, task)):
            ablated = run_with(model, prompt, [Zero(site, **selection)]).logits[0][-1]
            out[k] += clean - float(fn(ablated))
    return out / len(task.prompts)


def _gradient_method(model: Model, task: Task, attribute) -> np.ndarray:
    sites = model.resolve_sites(task.site)
    total = np.zeros(task.n_units)
    for prompt, answer, wrong in task.answer_pairs():
        total += np.concatenate([_per_unit(model, s, attribute(prompt, s, answer, wrong).per_unit) for s in sites])
    return total / len(task.prompts)


def _grad_x_act(model: Model, task: Task) -> np.ndarray:
    return _gradient_method(model, task, lambda p, s, a, w: grad_x_act(model, p, s, a, w))


def _ig(model: Model, task: Task) -> np.ndarray:
    def attribute(prompt, site, answer, wrong):
        return integrated_gradients(model, prompt, site, answer, wrong, baseline=task.baseline, steps=32)

    return _gradient_method(model, task, attribute)


def _dla(model: Model, task: Task) -> np.ndarray:
    sites = model.resolve_sites(task.site)
    kind = parse_site(sites[0]).kind
    if kind not in ("mlp.neurons", "attn.heads"):
        raise BadInputError(f"dla scores MLP neurons and attention heads, not {task.site}")
    out = np.zeros(task.n_units)
    for prompt, answer, wrong in task.answer_pairs():
        for term in direct_logit_attribution(model, prompt, answer, wrong, neurons=kind == "mlp.neurons").terms:
            if term.site in sites:
                unit = term.neuron if kind == "mlp.neurons" else term.layer * model.n_heads + term.head
                out[unit] += term.value
    return out / len(task.prompts)


def _sweep_kind(model: Model, task: Task) -> str:
    if not task.corrupt:
        raise BadInputError(f"{task.name} has no counterfactual prompts to patch from")
    if parse_site(model.resolve_sites(task.site)[0]).kind != "attn.heads":
        raise BadInputError("patching methods score attention heads here; sweeps have no per-neuron kind")
    return "heads"


def _patching(model: Model, task: Task) -> np.ndarray:
    """Exact activation patching (denoising): each head's normalised effect, averaged over the pairs."""
    kind = _sweep_kind(model, task)  # first: it says why a task cannot be patched
    return sweep(model, task.pairs(), kind).effect.flatten().double().numpy()


def _atp(model: Model, task: Task, method: str = "atp") -> np.ndarray:
    kind = _sweep_kind(model, task)
    return attribution_patching(model, task.pairs(), kind, method=method).effect.flatten().numpy()


METHODS: dict[str, Callable[[Model, Task], np.ndarray]] = {
    "exact": _exact,
    "grad-x-act": _grad_x_act,
    "ig": _ig,
    "dla": _dla,
    "patching": _patching,
    "atp": _atp,
    "atp-ig": lambda model, task: _atp(model, task, "atp-ig"),
}


def _edge_patching(model: Model, task: Task) -> np.ndarray:
    """Each edge's exact contribution: the clean metric minus the metric with that edge alone patched."""
    edges = all_edges(model)
    total = np.zeros(len(edges))
    for pair, item, fn in _scored_pairs(model, task):
        values = patch_edges(model, pair, [set()] + [{e} for e in edges], item, fn)
        total += values[0] - values[1:]
    return total / len(task.prompts)


def _eap(model: Model, task: Task, method: str = "eap") -> np.ndarray:
    scores = edge_attribution(model, task.pairs(), method=method, direction="noise").scores()
    return -np.array([scores[e] for e in all_edges(model)])  # noising estimates m(patched) - m(clean)


def _scored_pairs(model: Model, task: Task):
    """(tokenised pair, item, metric function) for each of the task's pairs, with the logit-difference metric."""
    _, fn = item_metric("logit_diff")
    return [(pair, ScoredItem(pair.answer, pair.wrong, None), fn) for pair in tokenize_pairs(model, task.pairs())]


EDGE_METHODS: dict[str, Callable[[Model, Task], np.ndarray]] = {
    "edge-patching": _edge_patching,
    "eap": _eap,
    "eap-ig": lambda model, task: _eap(model, task, "eap-ig"),
}
# Sparse dictionaries on the superposition task: width twice the true feature count, trained from a cube of the
# task's own activations; k is the codes' mean size (2).
DICTIONARY_METHODS: dict[str, dict] = {
    "sae-topk": {"activation": "topk", "k": 2},
    "sae-batchtopk": {"activation": "batchtopk", "k": 2},
    "sae-jumprelu": {"activation": "jumprelu", "k": None},
    "sae-relu": {"activation": "relu", "k": None},
}
DICTIONARY_TRAINING = {"tokens": 400_000, "batch_size": 256, "lr": 1e-2, "l1": 3e-2, "l0": 3e-2}


def _dictionary_recovery(cube, task: Task, activation: str, k: int | None) -> dict:
    """Train an SAE on a cube of the task's site; how well its decoder recovers the true directions."""
    from modelrecon.dictionaries import DictionaryConfig
    from modelrecon.dictionaries.sources import CubeSource
    from modelrecon.dictionaries.train import TrainOptions, train

    site = task.site
    options = TrainOptions(**DICTIONARY_TRAINING)
    kind, layer = site.split(".", 2)[2], int(site.split(".")[1])
    source = CubeSource(cube, kind, kind, [layer], options.batch_size, seed=options.seed)
    acts = torch.from_numpy(cube.get(kind, layers=layer)[:, 0])
    config = DictionaryConfig("sae", acts.shape[-1], acts.shape[-1], 2 * len(task.directions), activation, k,
                              (site,), (site,))  # fmt: skip
    start = time.perf_counter()
    (sae,) = train(source, [config], options, progress=False)
    seconds = time.perf_counter() - start
    folded = sae.fold_normalisation()
    with torch.no_grad():
        prediction, latents = folded(acts)
    decoder = folded.W_dec[0][:, 0].detach().numpy()
    centred = (acts - acts.mean(0)).pow(2).sum()
    return {
        **direction_recovery(task.directions.numpy(), decoder),
        "fvu": float((prediction - acts).pow(2).sum() / centred),
        "l0": float((latents > 0).sum(-1).float().mean()),
        "seconds": seconds,
        "tokens": options.tokens,
    }


def _dictionary_entry(model: Model, twin: Model, task: Task, names: list[str]) -> dict:
    """Each dictionary method trained on the model's and on the twin's activations (one cube of each)."""
    import tempfile

    from modelrecon.cube.capture import capture
    from modelrecon.cube.reader import Cube

    out = {}
    with tempfile.TemporaryDirectory() as folder:
        cubes = []
        for name, source_model in (("model", model), ("twin", twin)):
            path = f"{folder}/{name}.zarr"
            capture(source_model, task.prompts, path, sites=[task.site], dtype="float32", progress=False)
            cubes.append(Cube(path))
        for name in names:
            spec = DICTIONARY_METHODS[name]
            result = _dictionary_recovery(cubes[0], task, spec["activation"], spec["k"])
            twin_result = _dictionary_recovery(cubes[1], task, spec["activation"], spec["k"])
            out[name] = {**result, "twin_mean_max_cosine": twin_result["mean_max_cosine"]}
    return out


EDGE_BUDGETS = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def edge_faithfulness(model: Model, task: Task, scores: np.ndarray) -> dict:
    """Circuits of the top edges by |score| at each budget (ties against the method: later edges first), every
    other edge patched; CPR / CMD = the areas under the normalised faithfulness / under |1 - it| over the budgets."""
    edges = all_edges(model)
    order = sorted(range(len(edges)), key=lambda i: (-abs(scores[i]), -i))
    kept = [{edges[i] for i in order[: int(np.ceil(b * len(edges)))]} for b in EDGE_BUDGETS]
    values = np.zeros(len(kept))
    for pair, item, fn in _scored_pairs(model, task):
        values += patch_edges(model, pair, [set(edges) - circuit for circuit in kept], item, fn)
    span = values[-1] - values[0]  # all edges kept minus none kept
    curve = (values - values[0]) / span if span else np.full(len(kept), np.nan)
    return {
        "edge_budgets": list(EDGE_BUDGETS),
        "edges_kept": [len(c) for c in kept],
        "faithfulness": curve.tolist(),
        "cpr": float(np.trapezoid(curve, EDGE_BUDGETS)),
        "cmd": float(np.trapezoid(np.abs(1 - curve), EDGE_BUDGETS)),
    }


@contextmanager
def count_passes(model: Model) -> Iterator[dict]:
    """Counts the model's forward passes and the backward passes through its logits while the context is open."""
    counts = {"forward": 0, "backward": 0}

    def backward(_grad):
        counts["backward"] += 1

    def forward(module, args, output):
        counts["forward"] += 1
        logits = getattr(output, "logits", None)
        if logits is not None and logits.requires_grad:
            logits.register_hook(backward)

    handle = model.hf.register_forward_hook(forward)
    try:
        yield counts
    finally:
        handle.remove()


def _measure(method: Callable[[Model, Task], np.ndarray], model: Model, task: Task) -> tuple[np.ndarray, float, dict]:
    """A method's scores on a task, with its wall time and the passes it used."""
    start = time.perf_counter()
    with count_passes(model) as passes:
        scores = method(model, task)
    return scores, time.perf_counter() - start, passes


def _figures(scores: np.ndarray, seconds: float, passes: dict) -> dict:
    return {"scores": scores.tolist(), "seconds": seconds, "forward_passes": passes["forward"],
            "backward_passes": passes["backward"]}  # fmt: skip


def _edge_entry(model: Model, twin: Model, task: Task, names: list[str]) -> dict:
    """Every edge method's figures on a task with an edge ground truth (edges in `all_edges` order)."""
    edges = all_edges(model)
    truth = {edges.index(edge): sign for edge, sign in task.edge_truth.items()}
    exact_run = _measure(_edge_patching, model, task)
    out = {}
    for name in names:
        scores, seconds, passes = exact_run if name == "edge-patching" else _measure(EDGE_METHODS[name], model, task)
        out[name] = {**edge_faithfulness(model, task, scores), **_figures(scores, seconds, passes),
                     **score_method(scores, truth, exact_run[0], EDGE_METHODS[name](twin, task))}  # fmt: skip
    return out


def run_suite(task_names: list[str] | None = None, method_names: list[str] | None = None) -> dict:
    """Scores of every method on every task, with the model's and the randomised twin's scores and the time taken."""
    tasks = [TASKS[n] for n in _known(task_names, TASKS, "task")]
    chosen = _known(method_names, {**METHODS, **EDGE_METHODS, **DICTIONARY_METHODS}, "method")
    methods = [m for m in chosen if m in METHODS]
    edge_methods = [m for m in chosen if m in EDGE_METHODS]
    dictionary_methods = [m for m in chosen if m in DICTIONARY_METHODS]
    report = {"tasks": []}
    for task in tasks:
        model, twin = task.model(), task.model(twin=True)
        if task.directions is not None:  # a dictionary task: scored by direction recovery
            report["tasks"].append({"task": task.name, "description": task.description, "site": task.site,
                                    "methods": {}, "dictionaries": _dictionary_entry(model, twin, task,
                                                                                     dictionary_methods)})  # fmt: skip
            continue
        exact_run = _measure(_exact, model, task)  # the reference every method is compared with, and its own row
        exact = exact_run[0]
        kept = task.scored_units()
        truth = {kept.index(u): sign for u, sign in task.truth.items()}
        floor = float(np.abs(exact[kept]).max()) if kept else 0.0  # noise-level scores rank as ties, on any CPU
        entry = {"task": task.name, "description": task.description, "site": task.site, "truth": task.truth,
                 "methods": {}}  # fmt: skip
        for name in methods:
            try:
                scores, seconds, passes = exact_run if name == "exact" else _measure(METHODS[name], model, task)
            except BadInputError as exc:  # the method does not apply to this task's site
                entry["methods"][name] = {"applicable": False, "reason": str(exc)}
                continue
            twin_scores = METHODS[name](twin, task)
            entry["methods"][name] = {
                "applicable": True,
                **faithfulness_curve(model, task, significant(scores, floor)),
                **_figures(scores, seconds, passes),
                **score_method(scores[kept], truth, exact[kept], twin_scores[kept]),
            }
        if task.edge_truth and edge_methods:
            entry["edge_truth"] = [[up, down, sign] for (up, down), sign in task.edge_truth.items()]
            entry["edges"] = _edge_entry(model, twin, task, edge_methods)
        report["tasks"].append(entry)
    return report


def _known(names: list[str] | None, table: dict, what: str) -> list[str]:
    if not names:
        return list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise BadInputError(f"unknown {what}(s) {', '.join(unknown)}; choose from {', '.join(table)}")
    return names


HEADER = (
    "| task | method | ROC-AUC | pessimistic AUC | AP | sign acc. | Kendall vs exact | CPR | CMD | twin Spearman "
    "| passes (f/b) | s |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
)
FIGURES = ("roc_auc", "pessimistic_auc", "average_precision", "sign_accuracy", "kendall_vs_exact", "cpr", "cmd",
           "twin_spearman")  # fmt: skip


def _row(task: str, method: str, m: dict) -> str:
    def cell(x):
        return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.2f}"

    passes = f"{m['forward_passes']}/{m['backward_passes']}"
    return f"| {task} | {method} | " + " | ".join(cell(m[k]) for k in FIGURES) + f" | {passes} | {m['seconds']:.2f} |"


def markdown(report: dict) -> str:
    """The results tables, units then edges (generated, never typed by hand)."""
    lines = [HEADER]
    for entry in report["tasks"]:
        for name, m in entry["methods"].items():
            if m["applicable"]:  # not e.g. DLA on input features, patching without counterfactual prompts
                lines.append(_row(entry["task"], name, m))
    edge_rows = [
        _row(entry["task"], name, m) for entry in report["tasks"] for name, m in entry.get("edges", {}).items()
    ]
    if edge_rows:
        lines += ["", "Circuit discovery over edges (CPR and CMD over edge budgets 0.1%..100%):", "", HEADER]
        lines += edge_rows
    dictionary_rows = [(entry["task"], name, m) for entry in report["tasks"]
                       for name, m in entry.get("dictionaries", {}).items()]  # fmt: skip
    if dictionary_rows:
        lines += ["", "Dictionaries: recovery of the true feature directions by each SAE's decoder:", "",
                  "| task | dictionary | mean max cosine | fraction matched (> 0.9) | FVU | L0 | twin mean max cosine "
                  "| tokens | s |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for task_name, name, m in dictionary_rows:
            figures = (m["mean_max_cosine"], m["fraction_matched"], m["fvu"], m["l0"], m["twin_mean_max_cosine"])
            lines.append(f"| {task_name} | {name} | " + " | ".join(f"{x:.2f}" for x in figures) +
                         f" | {m['tokens']:,} | {m['seconds']:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def to_json(report: dict) -> str:
    from modelrecon.files import json_safe

    return json.dumps(json_safe(report), indent=1)
