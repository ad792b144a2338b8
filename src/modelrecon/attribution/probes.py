"""Linear probes on cube activations, per layer, with a held-out split and a control task.

A probe's accuracy alone does not show that the model uses the information: a linear probe can memorise token
identities. The control task (Hewitt & Liang 2019) gives every token type a random label (drawn from the real
labels' distribution) and trains the same probe on it; selectivity = real test score - control test score. A probe
is evidence only when it is selective; and the causal check is an intervention along its direction
(`counterfactual.ProjectOut` / `AddDirection` with `probe.direction`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from modelrecon.cube.reader import Cube
from modelrecon.errors import BadInputError


@dataclass
class ProbeResult:
    kind: str
    layer: int
    task: str  # "classification" (score = accuracy) or "regression" (score = R^2)
    n_train: int
    n_test: int
    train_score: float
    test_score: float
    control_score: float  # test score of the same probe trained on the control task
    selectivity: float  # test_score - control_score
    chance: float  # majority-class accuracy (classification) or 0 (regression)
    direction: list[float] = field(repr=False)  # the probe's weight vector in activation space (class 1, or the fit)

    def to_dict(self) -> dict:
        return asdict(self)


def _standardise(train: torch.Tensor, *others: torch.Tensor):
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    return [(x - mean) / std for x in (train, *others)], std


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, max_iter: int) -> torch.Tensor:
    w = torch.zeros(x.shape[1] + 1, n_classes, dtype=torch.float64, requires_grad=True)
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    optimiser = torch.optim.LBFGS([w], max_iter=max_iter, line_search_fn="strong_wolfe")

    def loss():
        optimiser.zero_grad()
        value = torch.nn.functional.cross_entropy(xb @ w, y) + l2 * (w[:-1] ** 2).sum()
        value.backward()
        return value

    optimiser.step(loss)
    return w.detach()


def _predict(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) @ w


def _fit_ridge(x: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    penalty = l2 * len(x) * torch.eye(xb.shape[1], dtype=x.dtype)
    penalty[-1, -1] = 0.0
    return torch.linalg.solve(xb.T @ xb + penalty, xb.T @ y)[:, None]


def _score(task: str, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> float:
    pred = _predict(x, w)
    if task == "classification":
        return float((pred.argmax(1) == y).double().mean())
    residual = ((pred[:, 0] - y) ** 2).sum()
    total = ((y - y.mean()) ** 2).sum()
    return float(1 - residual / total) if total > 0 else float("nan")


def control_labels(token_ids: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    """A random label per token type, drawn from the labels' own distribution, the same for every occurrence."""
    rng = np.random.default_rng(seed)
    types = np.unique(token_ids)
    drawn = dict(zip(types.tolist(), rng.choice(labels, size=len(types)).tolist(), strict=True))
    return np.array([drawn[t] for t in token_ids.tolist()], dtype=labels.dtype)


def train_probes(
    cube: Cube,
    kind: str,
    labels,
    *,
    layers: list[int] | None = None,
    task: str = "classification",
    test_fraction: float = 0.25,
    seed: int = 0,
    l2: float = 1e-3,
    max_iter: int = 100,
) -> list[ProbeResult]:
    """One linear probe per layer of `kind`, predicting a label per token of the cube (all prompts, in order)."""
    if task not in ("classification", "regression"):
        raise BadInputError(f"task must be 'classification' or 'regression', not {task!r}")
    labels = np.asarray(labels)
    if labels.shape != (cube.n_tokens,):
        raise BadInputError(f"{len(labels)} labels for a cube of {cube.n_tokens} tokens; give one label per token")
    if not 0 < test_fraction < 1:
        raise BadInputError(f"test_fraction must be between 0 and 1, not {test_fraction}")
    if task == "classification":
        classes, labels = np.unique(labels, return_inverse=True)
        if len(classes) < 2:
            raise BadInputError("all labels are the same; a probe needs at least two classes")
    control = control_labels(cube.token_ids(), labels, seed)
    order = np.random.default_rng(seed).permutation(cube.n_tokens)
    n_test = max(1, int(round(test_fraction * cube.n_tokens)))
    test, train = order[:n_test], order[n_test:]
    results = []
    for layer in layers if layers is not None else cube.layers(kind):
        x = torch.as_tensor(np.asarray(cube.get(kind, layers=[layer]))[:, 0], dtype=torch.float64)
        (x_train, x_test), std = _standardise(x[train], x[test])
        scores = []
        for target in (labels, control):
            y = torch.as_tensor(target)
            if task == "classification":
                w = _fit_logistic(x_train, y[train].long(), int(labels.max()) + 1, l2, max_iter)
                y_train, y_test = y[train].long(), y[test].long()
            else:
                w = _fit_ridge(x_train, y[train].double(), l2)
                y_train, y_test = y[train].double(), y[test].double()
            scores.append((_score(task, x_train, y_train, w), _score(task, x_test, y_test, w), w))
        (train_score, test_score, w), (_, control_score, _) = scores
        chance = float(np.bincount(labels[test]).max() / len(test)) if task == "classification" else 0.0
        direction = (w[:-1, -1] / std).tolist()  # back to activation units
        results.append(
            ProbeResult(
                kind,
                int(layer),
                task,
                len(train),
                len(test),
                train_score,
                test_score,
                control_score,
                test_score - control_score,
                chance,
                direction,
            )  # fmt: skip
        )
    return results


def probes_json(results: list[ProbeResult]) -> str:
    return json.dumps([r.to_dict() for r in results], indent=1)
