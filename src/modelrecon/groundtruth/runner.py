"""The ground-truth runner: every applicable method on every task, scored against the known mechanism.

Methods give one signed score per unit: its contribution to the metric (logit of the answer minus the wrong
answer), averaged over the task's prompts; positive means it supports the answer.
- exact: zero-ablate the unit; contribution = metric(clean) - metric(ablated).
- grad-x-act: activation times gradient (also the AtP estimate of that zero ablation).
- ig: integrated gradients from the task's baseline at the site (zeros unless it names one), 32 steps.
- dla: direct logit attribution of the unit (MLP neurons; needs no post-norm on the MLP output).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import numpy as np
import torch

from modelrecon.attribution.dla import direct_logit_attribution
from modelrecon.attribution.gradients import grad_x_act, integrated_gradients, target_fn
from modelrecon.counterfactual.interventions import Zero, run_with
from modelrecon.errors import BadInputError
from modelrecon.groundtruth.scoring import score_method
from modelrecon.groundtruth.tasks import TASKS, Task
from modelrecon.hooks.run import run
from modelrecon.models.model import Model
from modelrecon.models.sites import parse_site


def _exact(model: Model, task: Task) -> np.ndarray:
    _, fn = target_fn(model, task.answer, task.wrong)
    out = np.zeros(task.n_units)
    for prompt in task.prompts:
        clean = float(fn(run(model, prompt).logits[0][-1]))
        for unit in range(task.n_units):
            ablated = run_with(model, prompt, [Zero(task.site, units=[unit])]).logits[0][-1]
            out[unit] += clean - float(fn(ablated))
    return out / len(task.prompts)


def _per_unit(result) -> np.ndarray:
    return result.per_unit.double().sum(0).numpy()  # summed over positions


def _grad_x_act(model: Model, task: Task) -> np.ndarray:
    return np.mean([_per_unit(grad_x_act(model, p, task.site, task.answer, task.wrong)) for p in task.prompts], 0)


def _ig(model: Model, task: Task) -> np.ndarray:
    results = [
        integrated_gradients(model, p, task.site, task.answer, task.wrong, baseline=task.baseline, steps=32)
        for p in task.prompts
    ]
    return np.mean([_per_unit(r) for r in results], 0)


def _dla(model: Model, task: Task) -> np.ndarray:
    if parse_site(task.site).kind != "mlp.neurons":
        raise BadInputError(f"dla scores MLP neurons, not {task.site}")
    out = np.zeros(task.n_units)
    for prompt in task.prompts:
        for term in direct_logit_attribution(model, prompt, task.answer, task.wrong, neurons=True).terms:
            if term.site == task.site:
                out[term.neuron] += term.value
    return out / len(task.prompts)


METHODS: dict[str, Callable[[Model, Task], np.ndarray]] = {
    "exact": _exact,
    "grad-x-act": _grad_x_act,
    "ig": _ig,
    "dla": _dla,
}


def run_suite(task_names: list[str] | None = None, method_names: list[str] | None = None) -> dict:
    """Scores of every method on every task, with the model's and the randomised twin's scores and the time taken."""
    tasks = [TASKS[n] for n in _known(task_names, TASKS, "task")]
    methods = _known(method_names, METHODS, "method")
    report = {"tasks": []}
    for task in tasks:
        model, twin = task.model(), task.model(twin=True)
        with torch.no_grad():
            exact = _exact(model, task)
        entry = {"task": task.name, "description": task.description, "site": task.site, "truth": task.truth,
                 "methods": {}}  # fmt: skip
        for name in methods:
            start = time.perf_counter()
            try:
                scores = METHODS[name](model, task)
            except BadInputError as exc:  # the method does not apply to this task's site
                entry["methods"][name] = {"applicable": False, "reason": str(exc)}
                continue
            seconds = time.perf_counter() - start
            twin_scores = METHODS[name](twin, task)
            kept = task.scored_units()
            truth = {kept.index(u): sign for u, sign in task.truth.items()}
            entry["methods"][name] = {
                "applicable": True,
                "scores": scores.tolist(),
                "seconds": seconds,
                **score_method(scores[kept], truth, exact[kept], twin_scores[kept]),
            }
        report["tasks"].append(entry)
    return report


def _known(names: list[str] | None, table: dict, what: str) -> list[str]:
    if not names:
        return list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise BadInputError(f"unknown {what}(s) {', '.join(unknown)}; choose from {', '.join(table)}")
    return names


def markdown(report: dict) -> str:
    """The results table (generated, never typed by hand)."""
    lines = [
        "| task | method | ROC-AUC | pessimistic AUC | AP | sign acc. | Kendall vs exact | twin Spearman | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(x):
        return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.2f}"

    for entry in report["tasks"]:
        for name, m in entry["methods"].items():
            if not m["applicable"]:
                lines.append(f"| {entry['task']} | {name} | n/a | | | | | | |")
                continue
            lines.append(
                f"| {entry['task']} | {name} | {cell(m['roc_auc'])} | {cell(m['pessimistic_auc'])} | "
                f"{cell(m['average_precision'])} | {cell(m['sign_accuracy'])} | {cell(m['kendall_vs_exact'])} | "
                f"{cell(m['twin_spearman'])} | {m['seconds']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def to_json(report: dict) -> str:
    from modelrecon.files import json_safe

    return json.dumps(json_safe(report), indent=1)
