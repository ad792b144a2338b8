"""Activation-patching sweeps: one patch per cell (layer x position, or layer x head), many cells per forward pass.

Denoising (the default) runs the counterfactual ("corrupt") prompt and patches in the clean value of one cell;
noising runs the clean prompt and patches in the counterfactual's. Each row of a batch is the same prompt with a
different cell patched (`edits_for` with one intervention list per row), and only the last token is unembedded, so
a sweep costs a few batched forward passes instead of one pass per cell.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from modelrecon.counterfactual.experiment import _batches, _scores, run_pairs
from modelrecon.counterfactual.interventions import Patch, edits_for
from modelrecon.counterfactual.metrics import ItemMetric, ScoredItem, item_metric
from modelrecon.counterfactual.pairs import Pair, PairTokens, tokenize_pairs
from modelrecon.counterfactual.stats import bootstrap
from modelrecon.errors import BadInputError
from modelrecon.hooks.run import run
from modelrecon.models.model import Model
from modelrecon.models.sites import site_name
from modelrecon.progress import token_progress

# sweep name -> site kind
SWEEPS = {
    "resid_pre": "resid_pre",
    "resid_post": "resid_post",
    "attn": "attn.out",
    "mlp": "mlp.out",
    "heads": "attn.heads",
}
DIRECTIONS = ("denoise", "noise")


@dataclass(frozen=True)
class Cell:
    site: str
    layer: int
    position: int | None  # None: every position (head sweeps)
    head: int | None = None

    def intervention(self) -> Patch:
        return Patch(
            self.site,
            positions=None if self.position is None else [self.position],
            heads=None if self.head is None else [self.head],
            source="source",
        )


@dataclass
class SweepResult:
    kind: str
    direction: str
    metric: str
    tokens: list[str]  # the first pair's clean prompt, for the position axis
    clean: float  # mean metric over pairs
    corrupt: float
    cells: list[Cell]
    values: np.ndarray  # [pairs, cells] metric of the patched run
    effects: np.ndarray  # [pairs, cells] normalised effect
    ci_low: np.ndarray  # [cells]
    ci_high: np.ndarray
    shape: tuple[int, int]  # (layers, positions) or (layers, heads)

    @property
    def effect(self) -> torch.Tensor:
        """Mean normalised effect as a grid `[layer, position]` (or `[layer, head]`)."""
        return torch.tensor(np.nanmean(self.effects, axis=0)).reshape(self.shape)

    def to_dict(self) -> dict:
        mean_value = self.values.mean(axis=0)
        mean_effect = np.nanmean(self.effects, axis=0)
        results = []
        for k, cell in enumerate(self.cells):
            row = {"site": cell.site, "layer": cell.layer, "position": cell.position}
            if cell.head is not None:
                row["head"] = cell.head
            row |= {
                "value": _number(mean_value[k]),
                "effect": _number(mean_effect[k]),
                "ci_low": _number(self.ci_low[k]),
                "ci_high": _number(self.ci_high[k]),
            }
            results.append(row)
        return {
            "kind": self.kind,
            "direction": self.direction,
            "metric": self.metric,
            "clean": self.clean,
            "corrupt": self.corrupt,
            "n_pairs": int(self.values.shape[0]),
            "tokens": self.tokens,
            "shape": list(self.shape),
            "results": results,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def _number(x: float) -> float | None:
    """JSON has no NaN: an effect that is undefined (clean == corrupt) is written as null."""
    return float(x) if np.isfinite(x) else None


def sweep_cells(model: Model, kind: str, n_positions: int) -> tuple[list[Cell], tuple[int, int]]:
    if kind not in SWEEPS:
        raise BadInputError(f"unknown sweep {kind!r}; use one of {', '.join(SWEEPS)}")
    site_kind = SWEEPS[kind]
    layers = range(model.n_layers)
    if kind == "heads":
        cells = [Cell(site_name(site_kind, lay), lay, None, h) for lay in layers for h in range(model.n_heads)]
        return cells, (model.n_layers, model.n_heads)
    cells = [Cell(site_name(site_kind, lay), lay, p) for lay in layers for p in range(n_positions)]
    return cells, (model.n_layers, n_positions)


def sweep(
    model: Model,
    pairs: list[Pair],
    kind: str = "resid_pre",
    *,
    direction: str = "denoise",
    metric: str | ItemMetric = "logit_diff",
    batch_size: int | None = None,
    seed: int = 0,
    n_boot: int = 1000,
    progress: bool = False,
) -> SweepResult:
    """Patch every cell of a sweep, one at a time, for every pair; effects averaged over pairs with bootstrap CIs.

    batch_size: patched rows per forward pass (default: about 512 tokens per pass).
    """
    if direction not in DIRECTIONS:
        raise BadInputError(f"direction must be 'denoise' or 'noise', not {direction!r}")
    metric_name, fn = item_metric(metric)
    tokens = tokenize_pairs(model, pairs)
    lengths = {t.length for t in tokens}
    if kind != "heads" and len(lengths) > 1:
        raise BadInputError(
            f"a position sweep needs pairs of one token length; these have lengths {sorted(lengths)}: "
            "sweep each length separately or use --sweep heads"
        )
    cells, shape = sweep_cells(model, kind, tokens[0].length)
    rows = batch_size or max(1, 512 // max(lengths))
    base, source = ("counterfactual", "clean") if direction == "denoise" else ("clean", "counterfactual")
    sites = sorted({c.site for c in cells})

    values = np.zeros((len(tokens), len(cells)))
    m_clean, m_corrupt = [], []
    n_runs = len(tokens) * (1 + len(list(_batches(len(cells), rows))))
    with token_progress(n_runs, enabled=progress, label=f"sweep {kind}", unit="runs", rate_unit="run") as advance:
        for j, pair in enumerate(tokens):
            clean_logits, clean_acts = run_pairs(model, tokens, "clean", sites if source == "clean" else (), items=[j])
            cf_logits, cf_acts = run_pairs(
                model, tokens, "counterfactual", sites if source != "clean" else (), items=[j]
            )
            item = ScoredItem(pair.answer, pair.wrong, clean_logits[0])
            m_clean.append(_scores([x[None] for x in clean_logits], [item], fn)[0])
            m_corrupt.append(_scores([x[None] for x in cf_logits], [item], fn)[0])
            acts = clean_acts if source == "clean" else cf_acts
            advance(1)
            for chunk in _batches(len(cells), rows):
                values[j, chunk] = _patched_scores(model, pair, base, [cells[k] for k in chunk], acts, item, fn)
                advance(1)

    clean, corrupt = np.array(m_clean)[:, None], np.array(m_corrupt)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        effects = np.where(clean != corrupt, (values - corrupt) / (clean - corrupt), np.nan)
    if np.all(clean == corrupt):
        raise BadInputError(
            f"{metric_name} is the same on the clean and the corrupt prompt for every pair, so no effect is defined; "
            "choose pairs where the answer changes"
        )
    with warnings.catch_warnings():  # cells whose effect is undefined for every pair are NaN, by design
        warnings.simplefilter("ignore", RuntimeWarning)
        estimates = bootstrap(effects, n_boot=n_boot, seed=seed)
    return SweepResult(
        kind=kind,
        direction=direction,
        metric=metric_name,
        tokens=model.str_tokens(tokens[0].clean),
        clean=float(np.mean(m_clean)),
        corrupt=float(np.mean(m_corrupt)),
        cells=cells,
        values=values,
        effects=effects,
        ci_low=np.array([e.ci_low for e in estimates]),
        ci_high=np.array([e.ci_high for e in estimates]),
        shape=shape,
    )


def _patched_scores(
    model: Model,
    pair: PairTokens,
    base: str,
    cells: list[Cell],
    source_acts: dict[str, list[torch.Tensor]],
    item: ScoredItem,
    fn: ItemMetric,
) -> list[float]:
    """The metric with each cell patched, one cell per row of one batch of the base prompt."""
    batch = model.batch_from_ids([getattr(pair, base)] * len(cells))
    sources = {"source": {site: values * len(cells) for site, values in source_acts.items()}}
    edits = edits_for(model, batch, [[cell.intervention()] for cell in cells], sources)
    logits = run(model, batch, edit=edits, last_only=True).logits
    return _scores(logits, [item] * len(cells), fn)
