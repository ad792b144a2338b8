"""Activation-patching sweeps: one patch per cell (layer x position, or layer x head), many cells per forward pass.

Denoising (the default) runs the counterfactual ("corrupt") prompt and patches in the clean value of one cell;
noising runs the clean prompt and patches in the counterfactual's. Each row of a batch is the same prompt with a
different cell patched (`edits_for` with one intervention list per row), and only the last token is unembedded, so
a sweep costs a few batched forward passes instead of one pass per cell.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from modelrecon.counterfactual.experiment import _batches, _scores, run_pairs
from modelrecon.counterfactual.interventions import Intervention, Patch, Sources, edits_for
from modelrecon.counterfactual.metrics import ItemMetric, ScoredItem, item_metric
from modelrecon.counterfactual.pairs import Pair, PairTokens, tokenize_pairs
from modelrecon.counterfactual.stats import bootstrap
from modelrecon.display import RichDisplay
from modelrecon.errors import BadInputError
from modelrecon.files import json_safe
from modelrecon.hooks.run import run
from modelrecon.models.model import Model
from modelrecon.models.sites import parse_site, site_name
from modelrecon.progress import token_progress

# sweep name -> site kind
SWEEPS = {
    "resid_pre": "resid_pre",
    "resid_post": "resid_post",
    "attn": "attn.out",
    "mlp": "mlp.out",
    "heads": "attn.heads",
    "q": "attn.q",
    "k": "attn.k",
    "v": "attn.v",
}
HEAD_SWEEPS = ("heads", "q", "k", "v")  # cells are (layer, head), every position patched
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


def _nanmean(effects: np.ndarray) -> np.ndarray:
    """Mean over pairs, leaving out undefined effects; NaN (quietly) where no pair defines one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(effects, axis=0)


@dataclass
class SweepResult(RichDisplay):
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
    receivers: list[str] | None = None  # path patching: what the senders' paths end in
    method: str = "patching"  # or an attribution estimate of it ("atp", "atp-gd")

    @property
    def effect(self) -> torch.Tensor:
        """Mean normalised effect as a grid `[layer, position]` (or `[layer, head]`)."""
        return torch.tensor(_nanmean(self.effects)).reshape(self.shape)

    def to_dict(self) -> dict:
        mean_value = self.values.mean(axis=0)
        mean_effect = _nanmean(self.effects)
        results = []
        for k, cell in enumerate(self.cells):
            row = {"site": cell.site, "layer": cell.layer, "position": cell.position}
            if cell.head is not None:
                row["head"] = cell.head
            row |= {
                "value": float(mean_value[k]),
                "effect": float(mean_effect[k]),
                "ci_low": float(self.ci_low[k]),
                "ci_high": float(self.ci_high[k]),
            }
            results.append(row)
        return json_safe(
            {  # an effect that is undefined (clean == corrupt) becomes null
                "kind": self.kind,
                "direction": self.direction,
                "metric": self.metric,
                "clean": self.clean,
                "corrupt": self.corrupt,
                "n_pairs": int(self.values.shape[0]),
                "tokens": self.tokens,
                "shape": list(self.shape),
                **({"receivers": self.receivers} if self.receivers else {}),
                "results": results,
            }
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def sweep_cells(model: Model, kind: str, n_positions: int) -> tuple[list[Cell], tuple[int, int]]:
    if kind not in SWEEPS:
        raise BadInputError(f"unknown sweep {kind!r}; use one of {', '.join(SWEEPS)}")
    site_kind = SWEEPS[kind]
    layers = range(model.n_layers)
    if kind in HEAD_SWEEPS:
        n_heads = model.n_kv_heads if kind in ("k", "v") else model.n_heads
        cells = [Cell(site_name(site_kind, lay), lay, None, h) for lay in layers for h in range(n_heads)]
        return cells, (model.n_layers, n_heads)
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
    _check_options(direction, metric)
    tokens = tokenize_pairs(model, pairs)
    lengths = {t.length for t in tokens}
    if kind not in HEAD_SWEEPS and len(lengths) > 1:
        raise BadInputError(
            f"a position sweep needs pairs of one token length; these have lengths {sorted(lengths)}: "
            "sweep each length separately or use --sweep heads"
        )
    cells, shape = sweep_cells(model, kind, tokens[0].length)

    def score(pair, base, chunk, acts, item, fn):
        rows = [[cell.intervention()] for cell in chunk]
        return _scores_with(model, pair, base, rows, {"source": acts["source"]}, item, fn)

    sites = sorted({c.site for c in cells})
    return _run_sweep(
        model, tokens, kind, cells, shape, score, {"source": sites, "base": sites}, direction, metric, batch_size,
        seed, n_boot, progress, skip_unchanged=True,
    )  # fmt: skip


def path_patch(
    model: Model,
    pairs: list[Pair],
    receivers: str | list[str] = "logits",
    *,
    senders: str = "heads",
    direction: str = "denoise",
    metric: str | ItemMetric = "logit_diff",
    batch_size: int | None = None,
    seed: int = 0,
    n_boot: int = 1000,
    progress: bool = False,
) -> SweepResult:
    """Path patching: the effect of each sender (every head, or every MLP) through one path only.

    receivers: "logits" (the sender's direct effect: every attention and MLP output after it is frozen to the base
    run), or receiver heads' inputs as "layers.L.attn.q:H" (also attn.k / attn.v). For receiver inputs the sender is
    patched with everything after it frozen, the receivers' q/k/v are recorded from that run, and a clean run of the
    base prompt with only those receiver inputs patched gives the metric. Senders are the heads (or MLPs) of the
    layers before the first receiver. The path is the residual stream only: MLPs on it are frozen too.
    """
    _check_options(direction, metric)
    if senders not in ("heads", "mlp"):
        raise BadInputError(f"senders must be 'heads' or 'mlp', not {senders!r}")
    targets = _parse_receivers(model, receivers)
    tokens = tokenize_pairs(model, pairs)
    last = model.n_layers if not targets else min(parse_site(site).layer for site, _ in targets)
    if last == 0:
        raise BadInputError("receivers in layer 0 have no earlier senders; choose receivers in a later layer")
    if senders == "heads":
        cells = [c for c in sweep_cells(model, "heads", 0)[0] if c.layer < last]
    else:  # every position of each MLP's output
        cells = [Cell(site_name("mlp.out", layer), layer, None) for layer in range(last)]
    shape = (last, model.n_heads if senders == "heads" else 1)
    frozen = [site_name(k, layer) for layer in range(model.n_layers) for k in ("attn.out", "mlp.out")]

    def score(pair, base, chunk, acts, item, fn):
        first = [[cell.intervention(), *_freeze_after(cell, model)] for cell in chunk]
        sources = {"source": acts["source"], "base": acts["base"]}
        if not targets:
            return _scores_with(model, pair, base, first, sources, item, fn)
        sites = sorted({site for site, _ in targets})
        batch = model.batch_from_ids([getattr(pair, base)] * len(chunk))
        edits = edits_for(model, batch, first, _repeat(sources, len(chunk)))
        recorded = run(model, batch, record=sites, edit=edits, last_only=True).acts
        second = [[Patch(site, heads=[head], source="path") for site, head in targets]] * len(chunk)
        return _scores_with(model, pair, base, second, {"path": recorded}, item, fn, repeat=False)

    sender_sites = sorted({c.site for c in cells})
    label = "path " + ("logits" if not targets else ",".join(f"{s}:{h}" for s, h in targets))
    result = _run_sweep(
        model, tokens, label, cells, shape, score, {"source": sender_sites, "base": frozen}, direction, metric,
        batch_size, seed, n_boot, progress,
    )  # fmt: skip
    result.receivers = ["logits"] if not targets else [f"{s}:{h}" for s, h in targets]
    return result


def _unchanged(cell: Cell, acts: dict) -> bool:
    """Whether patching this cell writes the value it already has."""
    source, base = acts["source"][cell.site][0], acts["base"][cell.site][0]
    if cell.head is not None:
        return torch.equal(source[:, cell.head], base[:, cell.head])
    if cell.position is not None:
        return torch.equal(source[cell.position], base[cell.position])
    return torch.equal(source, base)


def _check_options(direction: str, metric: str | ItemMetric) -> None:
    """Fail on a bad option before any model work starts."""
    if direction not in DIRECTIONS:
        raise BadInputError(f"direction must be 'denoise' or 'noise', not {direction!r}")
    item_metric(metric)


def _parse_receivers(model: Model, receivers: str | list[str]) -> list[tuple[str, int]]:
    """[] for the logits, else (site, head) per receiver "layers.L.attn.q:H"."""
    if receivers in ("logits", ["logits"]):
        return []
    out = []
    for spec in [receivers] if isinstance(receivers, str) else receivers:
        site, _, head = spec.partition(":")
        kinds = ("attn.q", "attn.k", "attn.v")
        if not head.isdigit() or site not in model.site_names() or parse_site(site).kind not in kinds:
            raise BadInputError(
                f"bad receiver {spec!r}: use 'logits' or a head's input like 'layers.5.attn.q:3' (attn.q, .k, .v)"
            )
        limit = model.n_heads if parse_site(site).kind == "attn.q" else model.n_kv_heads
        if int(head) >= limit:
            raise BadInputError(f"receiver {spec!r}: head {head} is out of range; {site} has heads 0..{limit - 1}")
        out.append((site, int(head)))
    return out


def _freeze_after(cell: Cell, model: Model) -> list[Patch]:
    """Patches that hold every attention and MLP output after the sender at its base-run value."""
    first_attn = cell.layer + 1
    first_mlp = cell.layer + (1 if parse_site(cell.site).kind == "mlp.out" else 0)
    return [Patch(site_name("attn.out", i), source="base") for i in range(first_attn, model.n_layers)] + [
        Patch(site_name("mlp.out", i), source="base") for i in range(first_mlp, model.n_layers)
    ]


def _repeat(sources: Sources, n: int) -> Sources:
    """Sources recorded on one prompt, repeated for the n rows of a sweep batch."""
    return {name: {site: values * n for site, values in by_site.items()} for name, by_site in sources.items()}


def _scores_with(
    model: Model,
    pair: PairTokens,
    base: str,
    rows: list[list[Intervention]],
    sources: Sources,
    item: ScoredItem,
    fn: ItemMetric,
    repeat: bool = True,
) -> list[float]:
    """The metric on one batch of the base prompt, row r carrying the interventions rows[r]."""
    batch = model.batch_from_ids([getattr(pair, base)] * len(rows))
    edits = edits_for(model, batch, rows, _repeat(sources, len(rows)) if repeat else sources)
    logits = run(model, batch, edit=edits, last_only=True).logits
    return _scores(logits, [item] * len(rows), fn)


def _run_sweep(
    model: Model,
    tokens: list[PairTokens],
    kind: str,
    cells: list[Cell],
    shape: tuple[int, int],
    score: Callable,
    record: dict[str, list[str]],
    direction: str,
    metric: str | ItemMetric,
    batch_size: int | None,
    seed: int,
    n_boot: int,
    progress: bool,
    skip_unchanged: bool = False,
) -> SweepResult:
    """The loop every sweep shares: per pair, record the source and base runs, score the cells in batches.

    record: "source" / "base" -> sites to record on that run. score(pair, base_name, cells, acts, item, fn) gives
    the metric of each cell. skip_unchanged: a cell whose source and base values are equal is a no-op patch: its
    value is the base run's metric, exactly, without a forward pass (e.g. positions before the first token that
    differs between the prompts).
    """
    metric_name, fn = item_metric(metric)
    rows = batch_size or max(1, 512 // max(t.length for t in tokens))
    base, source = ("counterfactual", "clean") if direction == "denoise" else ("clean", "counterfactual")
    values = np.zeros((len(tokens), len(cells)))
    m_clean, m_corrupt = [], []
    n_runs = len(tokens) * (1 + len(list(_batches(len(cells), rows))))
    with token_progress(n_runs, enabled=progress, label=f"sweep {kind}", unit="runs", rate_unit="run") as advance:
        for j, pair in enumerate(tokens):
            runs = {}
            for name, role in ((source, "source"), (base, "base")):
                runs[name] = run_pairs(model, tokens, name, record.get(role, ()), items=[j])
            item = ScoredItem(pair.answer, pair.wrong, runs["clean"][0][0])
            m_clean.append(_scores([runs["clean"][0][0][None]], [item], fn)[0])
            m_corrupt.append(_scores([runs["counterfactual"][0][0][None]], [item], fn)[0])
            acts = {"source": runs[source][1], "base": runs[base][1]}
            advance(1)
            active = [k for k, cell in enumerate(cells) if not (skip_unchanged and _unchanged(cell, acts))]
            values[j] = m_clean[-1] if base == "clean" else m_corrupt[-1]
            done = 0
            for chunk in _batches(len(active), rows):
                ks = [active[i] for i in chunk]
                values[j, ks] = score(pair, base, [cells[k] for k in ks], acts, item, fn)
                advance(1)
                done += 1
            advance(len(list(_batches(len(cells), rows))) - done)  # batches saved by skipped cells

    return sweep_result(
        model, tokens, kind, direction, metric_name, cells, shape, values, m_clean, m_corrupt, seed, n_boot
    )


def sweep_result(
    model: Model,
    tokens: list[PairTokens],
    kind: str,
    direction: str,
    metric_name: str,
    cells: list[Cell],
    shape: tuple[int, int],
    values: np.ndarray,
    m_clean: list[float],
    m_corrupt: list[float],
    seed: int,
    n_boot: int,
    method: str = "patching",
) -> SweepResult:
    """Normalised effects and bootstrap intervals from the metric of every (pair, cell): exact or estimated."""
    clean, corrupt = np.array(m_clean)[:, None], np.array(m_corrupt)[:, None]
    if np.all(clean == corrupt):
        raise BadInputError(
            f"{metric_name} is the same on the clean and the corrupt prompt for every pair, so no effect is defined; "
            "choose pairs where the answer changes"
        )
    with np.errstate(invalid="ignore", divide="ignore"):
        effects = np.where(clean != corrupt, (values - corrupt) / (clean - corrupt), np.nan)
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
        method=method,
    )
