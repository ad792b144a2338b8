"""How well a method's unit scores recover a known ground truth."""

from __future__ import annotations

import numpy as np

from modelrecon.attribution.compare import kendall_tau_b, spearman
from modelrecon.counterfactual.stats import roc_auc


def pessimistic_auc(scores: np.ndarray, is_true: np.ndarray) -> float:
    """ROC AUC where every tie between a true and an inert unit counts against the method (InterpBench's reading:
    a method that gives everything the same score found nothing). Written here: scikit-learn's AUC counts ties half."""
    pos, neg = scores[is_true], scores[~is_true]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    return float((pos[:, None] > neg[None, :]).sum() / (len(pos) * len(neg)))


def average_precision(scores: np.ndarray, is_true: np.ndarray) -> float:
    """Mean precision at the rank of each true unit, ranking by score (ties broken against the method; not
    sklearn's average_precision_score, which gives tied units their group's precision)."""
    order = np.lexsort((is_true.astype(int), -scores))  # higher score first; among ties, inert units first
    hits = is_true[order]
    if not hits.any():
        return float("nan")
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


def sign_accuracy(scores: np.ndarray, truth: dict[int, int]) -> float:
    """Fraction of true units whose score has the true sign (a zero score is wrong)."""
    return float(np.mean([np.sign(scores[u]) == s for u, s in truth.items()]))


# Scores smaller than this fraction of the larger of a method's largest score and the largest exact effect are
# numerical noise (the anchor keeps norms exact to ~1e-6, not to the bit): they count as zero, so noise cannot rank a
# missed unit above the inert ones. The exact effects set the floor: a method whose every score is float noise (a
# saturated gradient) found nothing, whatever the noise of this CPU's kernels says.
NOISE = 1e-3


def significant(scores: np.ndarray, scale: float = 0.0) -> np.ndarray:
    """The scores with noise-level values set to 0 (`scale`: another magnitude the noise is measured against)."""
    top = max(np.abs(scores).max() if len(scores) else 0.0, scale)
    return np.where(np.abs(scores) > NOISE * top, scores, 0.0)


def score_method(scores: np.ndarray, truth: dict[int, int], exact: np.ndarray, twin_scores: np.ndarray | None) -> dict:
    """Every figure the suite reports for one method's signed unit scores."""
    is_true = np.zeros(len(scores), dtype=bool)
    is_true[list(truth)] = True
    scores = significant(scores, float(np.abs(exact).max()) if len(exact) else 0.0)
    magnitude = np.abs(scores)
    return {
        "roc_auc": roc_auc(magnitude, is_true),
        "pessimistic_auc": pessimistic_auc(magnitude, is_true),
        "average_precision": average_precision(magnitude, is_true),
        "sign_accuracy": sign_accuracy(scores, truth),
        "kendall_vs_exact": kendall_tau_b(scores, significant(exact)),
        "twin_spearman": None if twin_scores is None else spearman(scores, twin_scores),
    }


def direction_recovery(true: np.ndarray, learned: np.ndarray, threshold: float = 0.9) -> dict:
    """How well learned directions (e.g. a dictionary's decoder rows) recover the true feature directions.

    mean_max_cosine: for each true direction, its best |cosine| with any learned one, averaged; fraction_matched: the
    share of true directions whose best |cosine| exceeds `threshold`.
    """
    t = true / np.linalg.norm(true, axis=1, keepdims=True)
    lrn = learned / np.maximum(np.linalg.norm(learned, axis=1, keepdims=True), 1e-12)
    best = np.abs(t @ lrn.T).max(axis=1)
    return {"mean_max_cosine": float(best.mean()), "fraction_matched": float((best > threshold).mean())}
