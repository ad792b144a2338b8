"""Causal vs correlational: an attribution estimate of every cell next to the exact patching effect of that cell.

Rank agreement (Spearman and Kendall tau-b, both over the cells where both are defined), and the cells where the two
disagree: sign flips (both clearly non-zero, opposite signs) and large gaps (|estimate - exact| above a threshold).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from modelrecon.counterfactual.sweep import SweepResult
from modelrecon.display import RichDisplay
from modelrecon.errors import BadInputError
from modelrecon.files import json_safe


def _agreement(statistic, x: np.ndarray, y: np.ndarray) -> float:
    """A scipy.stats correlation of two score vectors; NaN where it is undefined (under two cells, or a constant
    vector), without scipy's warning."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(statistic(x, y).statistic)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr  # imported when used: scipy.stats takes a second or more to import

    return _agreement(spearmanr, x, y)


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import kendalltau  # tau-b is its default variant

    return _agreement(kendalltau, x, y)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import pearsonr

    return _agreement(pearsonr, x, y)


@dataclass(frozen=True)
class Disagreement:
    site: str
    position: int | None
    head: int | None
    estimate: float
    exact: float
    kind: str  # "sign flip" or "large gap"


@dataclass
class Comparison(RichDisplay):
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
