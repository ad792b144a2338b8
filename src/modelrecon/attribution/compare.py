"""Causal vs correlational: an attribution estimate of every cell next to the exact patching effect of that cell.

Rank agreement (Spearman and Kendall tau-b, both over the cells where both are defined), and the cells where the two
disagree: sign flips (both clearly non-zero, opposite signs) and large gaps (|estimate - exact| above a threshold).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from modelrecon.counterfactual.sweep import SweepResult
from modelrecon.errors import BadInputError
from modelrecon.files import json_safe


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their mean rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = _ranks(np.asarray(x, float)), _ranks(np.asarray(y, float))
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    dx = np.sign(x[:, None] - x[None, :])
    dy = np.sign(y[:, None] - y[None, :])
    upper = np.triu_indices(len(x), k=1)
    dx, dy = dx[upper], dy[upper]
    concordance = float((dx * dy).sum())
    denominator = np.sqrt(float((dx != 0).sum()) * float((dy != 0).sum()))
    return concordance / denominator if denominator else float("nan")


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


@dataclass(frozen=True)
class Disagreement:
    site: str
    position: int | None
    head: int | None
    estimate: float
    exact: float
    kind: str  # "sign flip" or "large gap"


@dataclass
class Comparison:
    method: str
    kind: str
    spearman: float
    kendall: float
    pearson: float  # linear agreement of the values themselves (ranks inside a cluster of equal effects are noise)
    n_cells: int
    estimate: list[float]  # per cell, in the sweep's order
    exact: list[float]
    cells: list[dict]
    disagreements: list[Disagreement]
    gap_threshold: float

    def to_dict(self) -> dict:
        return json_safe(asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def compare(estimate: SweepResult, exact: SweepResult, gap: float = 0.1, floor: float = 0.05) -> Comparison:
    """Compare an attribution sweep with the exact one (same kind, cells and pairs).

    gap: a cell whose estimate and exact effect differ by more than this (in normalised-effect units) is a large gap.
    floor: a sign flip needs both values beyond it in size (near-zero cells flip signs by noise).
    """
    if [c.site for c in estimate.cells] != [c.site for c in exact.cells] or estimate.shape != exact.shape:
        raise BadInputError("the two sweeps cover different cells; run them with the same kind and pairs")
    est, ex = estimate.effect.flatten().numpy(), exact.effect.flatten().numpy()
    defined = np.isfinite(est) & np.isfinite(ex)
    found = []
    for k, cell in enumerate(exact.cells):
        if not defined[k]:
            continue
        if abs(est[k]) > floor and abs(ex[k]) > floor and np.sign(est[k]) != np.sign(ex[k]):
            found.append(Disagreement(cell.site, cell.position, cell.head, float(est[k]), float(ex[k]), "sign flip"))
        elif abs(est[k] - ex[k]) > gap:
            found.append(Disagreement(cell.site, cell.position, cell.head, float(est[k]), float(ex[k]), "large gap"))
    found.sort(key=lambda d: -abs(d.estimate - d.exact))
    return Comparison(
        method=estimate.method,
        kind=exact.kind,
        spearman=spearman(est[defined], ex[defined]),
        kendall=kendall_tau_b(est[defined], ex[defined]),
        pearson=_pearson(est[defined], ex[defined]),
        n_cells=int(defined.sum()),
        estimate=est.tolist(),
        exact=ex.tolist(),
        cells=[{"site": c.site, "layer": c.layer, "position": c.position, "head": c.head} for c in exact.cells],
        disagreements=found,
        gap_threshold=gap,
    )
