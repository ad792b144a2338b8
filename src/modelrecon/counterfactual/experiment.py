"""Experiments: interventions run over a dataset of prompt pairs, with effect sizes, statistics and sanity checks.

Per item: the metric on the clean prompt, on the counterfactual, and under each component's interventions, and the
normalised effect `(m_intervened - m_counterfactual) / (m_clean - m_counterfactual)` (1: like clean, 0: like the
counterfactual). Across items: the mean effect with a bootstrap 95% interval, a paired sign-flip test of
"the intervention changes the metric" per component, and Holm's correction across components.

Every experiment checks itself: a no-op intervention at every site it touches must reproduce the clean metric
exactly, and patching all of `layers.0.resid_pre` from the counterfactual must reproduce the counterfactual.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from modelrecon.counterfactual.interventions import (
    Intervention,
    Patch,
    Resample,
    Scale,
    Sources,
    edits_for,
    sites_by_source,
)
from modelrecon.counterfactual.metrics import ItemMetric, ScoredItem, item_metric
from modelrecon.counterfactual.pairs import Pair, PairTokens, tokenize_pairs
from modelrecon.counterfactual.stats import bootstrap, holm, paired_sign_flip_p
from modelrecon.display import RichDisplay
from modelrecon.errors import BadInputError
from modelrecon.files import json_safe
from modelrecon.hooks.run import run
from modelrecon.models.model import Model
from modelrecon.models.sites import parse_site
from modelrecon.progress import token_progress

INPUTS = ("clean", "counterfactual")


@dataclass
class ComponentResult:
    name: str
    interventions: list[dict]
    value: float  # mean metric under the interventions
    effect: float  # mean normalised effect over the items where it is defined
    ci_low: float
    ci_high: float
    spread: float  # bootstrap standard deviation of the mean effect
    p_value: float  # paired sign-flip test: intervened vs the un-intervened input
    p_adjusted: float  # Holm-corrected across components
    values: list[float] = field(repr=False)  # per item
    effects: list[float] = field(repr=False)  # per item (NaN where clean == counterfactual)


@dataclass
class ExperimentResult(RichDisplay):
    metric: str
    base: str  # the input the interventions were applied to
    clean: list[float]  # metric per item
    counterfactual: list[float]
    components: list[ComponentResult]
    sanity: dict

    def component(self, name: str) -> ComponentResult:
        for c in self.components:
            if c.name == name:
                return c
        raise BadInputError(f"no component {name!r}; the components are {[c.name for c in self.components]}")

    def to_dict(self) -> dict:
        """Plain data for JSON; undefined effects (clean == counterfactual) are None."""
        return json_safe(asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def _batches(n: int, size: int) -> Iterator[list[int]]:
    for start in range(0, n, size):
        yield list(range(start, min(start + size, n)))


def _scores(logits: list[torch.Tensor], items: list[ScoredItem], fn: ItemMetric) -> list[float]:
    return [float(fn(row[-1], item)) for row, item in zip(logits, items, strict=True)]


def _max_diff(logits: list[torch.Tensor], reference: list[torch.Tensor], chunk: list[int]) -> float:
    return max(float((a - reference[j]).abs().max()) for a, j in zip(logits, chunk, strict=True))


def _left_batch(model: Model, ids: list[list[int]]):
    # Left padding puts every prompt's last token in the last column, so only that column is unembedded.
    return model.batch_from_ids(ids, padding_side="left")


def run_pairs(
    model: Model,
    tokens: list[PairTokens],
    which: str,
    record: Sequence[str] = (),
    interventions: Sequence[Intervention] | None = None,
    sources: Sources | None = None,
    items: list[int] | None = None,
) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]:
    """One batched run of the chosen items' clean or counterfactual prompts: last-token logits and recorded sites."""
    items = list(range(len(tokens))) if items is None else items
    batch = _left_batch(model, [getattr(tokens[j], which) for j in items])
    edits = edits_for(model, batch, interventions, sources) if interventions else None
    result = run(model, batch, record=record, edit=edits, last_only=True)
    return [x[-1] for x in result.logits], result.acts


def experiment(
    model: Model,
    pairs: Sequence[Pair],
    components: dict[str, Sequence[Intervention]] | Sequence[Intervention],
    *,
    metric: str | ItemMetric = "logit_diff",
    base: str = "clean",
    batch_size: int = 16,
    seed: int = 0,
    n_boot: int = 1000,
    progress: bool = False,
) -> ExperimentResult:
    """Run each component's interventions on the `base` input of every pair and measure the metric.

    components: name -> interventions (or one list, named "intervention"). `Patch(source="clean")` and
    `Patch(source="counterfactual")` read the pair's other prompt; `Resample` without a pool draws (seeded) another
    item's clean prompt of the same length.
    """
    if base not in INPUTS:
        raise BadInputError(f"base must be 'clean' or 'counterfactual', not {base!r}")
    if not isinstance(components, dict):
        components = {"intervention": list(components)}
    if not components:
        raise BadInputError("no components given: pass {name: [interventions]}")
    metric_name, fn = item_metric(metric)
    tokens = tokenize_pairs(model, pairs)
    n = len(tokens)
    needed, resampled = _source_sites(model, components)
    needed["counterfactual"].add("layers.0.resid_pre")  # for the full-patch sanity check
    touched = sorted({s for ivs in components.values() for iv in ivs for s in model.resolve_sites(iv.site)})

    clean_logits: list[torch.Tensor] = []
    cf_logits: list[torch.Tensor] = []
    acts: dict[str, dict[str, list[torch.Tensor]]] = {name: {s: [] for s in needed[name]} for name in INPUTS}
    n_runs = len(list(_batches(n, batch_size))) * (3 + len(components))
    with token_progress(n_runs, enabled=progress, label="experiment", unit="runs", rate_unit="run") as advance:
        for chunk in _batches(n, batch_size):
            for name, logits_out in (("clean", clean_logits), ("counterfactual", cf_logits)):
                logits, recorded = run_pairs(model, tokens, name, sorted(needed[name]), items=chunk)
                logits_out.extend(logits)
                for s in needed[name]:
                    acts[name][s].extend(recorded[s])
                advance(1)
        items = [ScoredItem(t.answer, t.wrong, c) for t, c in zip(tokens, clean_logits, strict=True)]
        m_clean = _scores([x[None] for x in clean_logits], items, fn)
        m_cf = _scores([x[None] for x in cf_logits], items, fn)
        resample = _resample_sources(tokens, resampled, acts["clean"], seed)

        values: dict[str, list[float]] = {name: [] for name in components}
        noop_diff, full_patch_diff, noop_metric_equal = 0.0, 0.0, True
        noop = [Scale(s, factor=1.0) for s in touched]
        for chunk in _batches(n, batch_size):
            sources = {
                name: {s: [v[j] for j in chunk] for s, v in site_values.items()} for name, site_values in acts.items()
            }
            sources["resample"] = {s: [v[j] for j in chunk] for s, v in resample.items()}
            chunk_items = [items[j] for j in chunk]
            for name, ivs in components.items():
                logits, _ = run_pairs(model, tokens, base, interventions=ivs, sources=sources, items=chunk)
                values[name].extend(_scores([x[None] for x in logits], chunk_items, fn))
                advance(1)
            # Sanity: the no-op reproduces the clean run, the full resid_pre.0 patch reproduces the counterfactual.
            logits, _ = run_pairs(model, tokens, "clean", interventions=noop or None, sources=sources, items=chunk)
            noop_diff = max(noop_diff, _max_diff(logits, clean_logits, chunk))
            noop_scores = _scores([x[None] for x in logits], chunk_items, fn)
            noop_metric_equal &= noop_scores == [m_clean[j] for j in chunk]
            full = [Patch("layers.0.resid_pre", source="counterfactual")]
            logits, _ = run_pairs(model, tokens, "clean", interventions=full, sources=sources, items=chunk)
            full_patch_diff = max(full_patch_diff, _max_diff(logits, cf_logits, chunk))
            advance(1)

    base_metric = np.array(m_clean if base == "clean" else m_cf)
    denominator = np.array(m_clean) - np.array(m_cf)
    results = []
    effects_all = {}
    for name in components:
        v = np.array(values[name])
        with np.errstate(invalid="ignore", divide="ignore"):
            effects_all[name] = np.where(denominator != 0, (v - np.array(m_cf)) / denominator, np.nan)
    estimates = bootstrap(np.stack(list(effects_all.values()), axis=1), n_boot=n_boot, seed=seed)
    p_values = [paired_sign_flip_p(np.array(values[name]) - base_metric, seed=seed) for name in components]
    for (name, ivs), est, p, p_adj in zip(components.items(), estimates, p_values, holm(p_values), strict=True):
        results.append(
            ComponentResult(
                name=name,
                interventions=[iv.to_dict() for iv in ivs],
                value=float(np.mean(values[name])),
                effect=est.mean,
                ci_low=est.ci_low,
                ci_high=est.ci_high,
                spread=est.spread,
                p_value=p,
                p_adjusted=p_adj,
                values=values[name],
                effects=effects_all[name].tolist(),
            )
        )
    sanity = {
        "noop_exact": noop_diff == 0.0 and noop_metric_equal,
        "noop_max_abs_logit_diff": noop_diff,
        "full_patch_exact": full_patch_diff == 0.0,
        "full_patch_max_abs_logit_diff": full_patch_diff,
        "items_without_effect": int(np.sum(denominator == 0)),
        "notes": _sanity_notes(noop_diff, full_patch_diff, touched),
    }
    return ExperimentResult(metric_name, base, m_clean, m_cf, results, sanity)


def _sanity_notes(noop_diff: float, full_patch_diff: float, touched: list[str]) -> list[str]:
    notes = []
    if noop_diff != 0.0:
        why = (
            " (attention-pattern edits recompute attention in eager form; differences of ~1e-6 are expected)"
            if any(parse_site(s).kind == "attn.pattern" for s in touched)
            else ""
        )
        notes.append(f"the no-op intervention moved the logits by up to {noop_diff:.3g}{why}")
    if full_patch_diff != 0.0:
        notes.append(f"patching all of layers.0.resid_pre missed the counterfactual by up to {full_patch_diff:.3g}")
    return notes


def _source_sites(model: Model, components: dict[str, Sequence[Intervention]]) -> tuple[dict[str, set[str]], set[str]]:
    """Per input, the sites the components' patches read; and the resampled sites (pool-less: read the clean runs)."""
    interventions = [iv for ivs in components.values() for iv in ivs]
    for iv in interventions:
        if not isinstance(iv, Intervention):
            raise BadInputError(f"{iv!r} is not an Intervention")
        if isinstance(iv, Resample) and iv.pool is not None:
            raise BadInputError("in an experiment, Resample draws from the other items: leave pool unset")
    by_source = sites_by_source(model, interventions)
    resampled = by_source.pop("resample", set())
    for source in by_source:
        if source not in INPUTS:
            raise BadInputError(f"patch source {source!r}: an experiment has the sources {', '.join(INPUTS)}")
    needed = {name: set(by_source.get(name, ())) for name in INPUTS}
    needed["clean"] |= resampled
    return needed, resampled


def _resample_sources(
    tokens: list[PairTokens], sites: set[str], clean_acts: dict[str, list[torch.Tensor]], seed: int
) -> dict[str, list[torch.Tensor]]:
    """Per resampled site, per item, the clean values of another item of the same length.

    One seeded draw per item serves every resampled site, so their values come from one prompt.
    """
    if not sites:
        return {}
    by_length: dict[int, list[int]] = {}
    for j, t in enumerate(tokens):
        by_length.setdefault(t.length, []).append(j)
    rng = np.random.default_rng(seed)
    draws = []
    for j, t in enumerate(tokens):
        others = [k for k in by_length[t.length] if k != j]
        if not others:
            raise BadInputError(
                f"resample ablation: item {j} has no other item of its length ({t.length} tokens) to draw from"
            )
        draws.append(int(rng.choice(others)))
    return {site: [clean_acts[site][k] for k in draws] for site in sites}
