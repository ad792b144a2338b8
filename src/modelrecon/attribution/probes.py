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


def _standardise(train: np.ndarray, *others: np.ndarray):
    mean, std = train.mean(0), np.maximum(train.std(0, ddof=1), 1e-6)
    return [(x - mean) / std for x in (train, *others)], std


def _fit(task: str, x: np.ndarray, y: np.ndarray, l2: float, max_iter: int):
    """A scikit-learn probe minimising the mean loss + l2 * |weights|^2 (the intercept unpenalised), and its weight
    vector (the last class's for a softmax over several classes).

    scikit-learn, not a torch fit: the cube's activations are NumPy arrays on the CPU, and its L-BFGS fits a 6,000 x
    576 binary probe in 0.24 s where torch's took 0.96 s (accuracy equal, directions within 2e-3)."""
    from sklearn.dummy import DummyClassifier  # imported when used: scikit-learn takes seconds to import
    from sklearn.linear_model import LogisticRegression, Ridge

    n = len(x)
    if task == "regression":
        fitted = Ridge(alpha=l2 * n).fit(x, y)
        return fitted, fitted.coef_
    if len(np.unique(y)) < 2:  # a control split can hold a single class: predict it
        return DummyClassifier(strategy="most_frequent").fit(x, y), np.zeros(x.shape[1])
    # sklearn minimises C * summed cross-entropy + |W|^2 / 2. For two classes it fits one weight vector v, which
    # the softmax over both (the same as for more classes) splits as -v/2 and v/2, so its penalty is halved.
    binary = len(np.unique(y)) == 2
    fitted = LogisticRegression(C=1 / ((1 if binary else 2) * l2 * n), max_iter=max_iter).fit(x, y)
    return fitted, fitted.coef_[-1] / (2 if binary else 1)


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
        x = np.asarray(cube.get(kind, layers=[layer]), dtype=np.float64)[:, 0]
        (x_train, x_test), std = _standardise(x[train], x[test])
        scores = []
        for target in (labels, control):
            y = target if task == "classification" else target.astype(np.float64)
            fitted, w = _fit(task, x_train, y[train], l2, max_iter)
            scores.append((float(fitted.score(x_train, y[train])), float(fitted.score(x_test, y[test])), w))
        (train_score, test_score, w), (_, control_score, _) = scores
        chance = float(np.bincount(labels[test]).max() / len(test)) if task == "classification" else 0.0
        direction = (w / std).tolist()  # back to activation units
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
