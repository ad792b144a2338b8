"""Attribution patching: a first-order estimate of every cell of a patching sweep from one forward and one backward
pass. The estimate of patching cell c is (a_source[c] - a_base[c]) . dm/da[c], taken on the base run.

It returns the same `SweepResult` layout as `counterfactual.sweep`, so the two compare cell by cell
(`verify`). Methods:
- `atp`: plain AtP, the gradient taken on the base run.
- `atp-ig`: the gradient averaged along the straight path from the base run's input (`layers.0.resid_pre`) to the
  source run's, in `steps` points (the node form of EAP-IG, Hanna et al. 2024). Large patches (a whole residual
  vector) move far from the base run, where its gradient alone misleads; averaging along the path follows them.
- `atpstar`: AtP with the AtP* QK fix (Kramár et al. 2024), for `q` and `k` sweeps: patching a head's query or key
  changes only its attention pattern, through a softmax that is often saturated, so the pattern is recomputed
  exactly (the layer's attention module alone, re-run on the base run's inputs with the query or key patched, one
  row per head) and only the step from the pattern to the metric is linear. Other sweeps get plain AtP.
- `atp-gd`: AtP with GradDrop (Kramár et al. 2024): the estimate repeated with the gradient through each layer's
  attention and MLP output dropped in turn, the mean of their magnitudes times the AtP sign, which keeps cells whose
  paths cancel in the plain gradient from looking unimportant.
"""

from __future__ import annotations

import numpy as np
import torch

from modelrecon.counterfactual.experiment import run_pairs
from modelrecon.counterfactual.interventions import Patch, edits_for
from modelrecon.counterfactual.metrics import ScoredItem, item_metric
from modelrecon.counterfactual.pairs import Pair, tokenize_pairs
from modelrecon.counterfactual.sweep import DIRECTIONS, HEAD_SWEEPS, SweepResult, sweep_cells, sweep_result
from modelrecon.errors import BadInputError
from modelrecon.hooks.run import run
from modelrecon.hooks.trace import hooked
from modelrecon.models.model import Model
from modelrecon.models.sites import site_name
from modelrecon.progress import token_progress

METHODS = ("atp", "atp-ig", "atp-gd", "atpstar")
DIFFERENTIABLE = ("logit_diff", "logprob", "prob", "kl")


def check_options(method: str, methods: tuple[str, ...], direction: str, metric):
    """Validate the options (before any model work) and return the metric's (name, function). A callable metric
    `fn(logits, item) -> scalar` is taken as given (it must be differentiable)."""
    if method not in methods:
        raise BadInputError(f"unknown method {method!r}; use one of {', '.join(methods)}")
    if direction not in DIRECTIONS:
        raise BadInputError(f"direction must be 'denoise' or 'noise', not {direction!r}")
    if not callable(metric) and metric not in DIFFERENTIABLE:
        raise BadInputError(f"metric {metric!r} is not differentiable; use one of {', '.join(DIFFERENTIABLE)}")
    return item_metric(metric)


def attribution_patching(
    model: Model,
    pairs: list[Pair],
    kind: str = "resid_pre",
    *,
    direction: str = "denoise",
    metric: str = "logit_diff",
    method: str = "atp",
    steps: int = 16,
    seed: int = 0,
    n_boot: int = 1000,
    progress: bool = False,
) -> SweepResult:
    """Estimate a whole patching sweep (`kind` as in `counterfactual.sweep`) by attribution patching.

    steps: points on the path for `atp-ig`.
    """
    metric_name, fn = check_options(method, METHODS, direction, metric)
    tokens = tokenize_pairs(model, pairs)
    if kind not in HEAD_SWEEPS and len({t.length for t in tokens}) > 1:
        raise BadInputError("a position sweep needs pairs of one token length; use --sweep heads for mixed lengths")
    cells, shape = sweep_cells(model, kind, tokens[0].length)
    site_kind = cells[0].site.split(".", 2)[2]
    sites = [site_name(site_kind, layer) for layer in range(model.n_layers)]
    base, source = ("counterfactual", "clean") if direction == "denoise" else ("clean", "counterfactual")

    values = np.zeros((len(tokens), len(cells)))
    m_clean, m_corrupt = [], []
    with token_progress(len(tokens), enabled=progress, label=method, unit="pairs", rate_unit="pair") as advance:
        for j, pair in enumerate(tokens):
            values[j], clean_value, corrupt_value = _estimate_pair(
                model, tokens, j, pair, kind, sites, base, source, method, steps, fn
            )
            m_clean.append(clean_value)
            m_corrupt.append(corrupt_value)
            advance(1)
    return sweep_result(
        model, tokens, kind, direction, metric_name, cells, shape, values, m_clean, m_corrupt, seed, n_boot, method
    )


def _estimate_pair(model, tokens, j, pair, kind, sites, base, source, method, steps, fn):
    """(the estimated metric of every cell, the clean metric, the corrupt metric) for pair j."""
    clean_logits, clean_acts = run_pairs(model, tokens, "clean", sites if source == "clean" else (), items=[j])
    cf_logits, cf_acts = run_pairs(model, tokens, "counterfactual", sites if source != "clean" else (), items=[j])
    item = ScoredItem(pair.answer, pair.wrong, clean_logits[0])
    m_clean, m_corrupt = float(fn(clean_logits[0], item)), float(fn(cf_logits[0], item))
    source_acts = clean_acts if source == "clean" else cf_acts
    base_ids = getattr(pair, base)
    if method == "atpstar" and kind in ("q", "k"):
        estimate = _qk_fixed(model, base_ids, sites, source_acts, item, fn, kind)
    elif method == "atp-ig":
        source_ids = getattr(pair, source)
        estimate = _path_averaged(model, base_ids, source_ids, sites, source_acts, item, fn, kind, steps)
    else:
        estimate = _first_order(model, base_ids, sites, source_acts, item, fn, kind)
    if method == "atp-gd":
        dropped = [_first_order(model, base_ids, sites, source_acts, item, fn, kind, drop=layer)
                   for layer in range(model.n_layers)]  # fmt: skip
        magnitude = torch.stack(dropped).abs().sum(0) / max(1, model.n_layers - 1)
        estimate = torch.sign(estimate) * magnitude
    values = (m_clean if base == "clean" else m_corrupt) + estimate.flatten().numpy()
    return values, m_clean, m_corrupt


def _cells(kind: str, delta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """delta . grad summed per cell: per position `[pos]`, or per head `[head]` for head sweeps."""
    product = delta * grad
    return product.sum(dim=(0, 2)) if kind in HEAD_SWEEPS else product.flatten(1).sum(1)


def _path_averaged(model, base_ids, source_ids, sites, source_acts, item, fn, kind, steps, batch_size=8):
    """(a_source - a_base) . the gradient averaged over `steps` points from the base input to the source input."""
    start_site = "layers.0.resid_pre"
    ends = run(model, model.batch_from_ids([base_ids, source_ids]), record=[start_site, *sites]).acts
    base_in, source_in = ends[start_site]
    alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps
    total = {site: torch.zeros_like(ends[site][0]) for site in sites}
    for begin in range(0, steps, batch_size):
        chunk = alphas[begin : begin + batch_size]
        points = base_in[None] + chunk.view(-1, 1, 1) * (source_in - base_in)[None]

        def along(value, ctx, points=points):
            return points.to(value)

        def summed(logits):
            return sum(fn(row[-1], item) for row in logits)

        result = run(model, model.batch_from_ids([base_ids] * len(chunk)), edit={start_site: along}, grad=sites,
                     grad_of=summed)  # fmt: skip
        for site in sites:
            total[site] += torch.stack(result.grads[site]).sum(0)
    rows = [_cells(kind, source_acts[site][0] - ends[site][0], total[site] / steps) for site in sites]
    return torch.stack(rows).detach()


def _expand_rows(value, rows: int):
    """The base run's call arguments repeated for `rows` rows (tensors with a leading batch axis of 1)."""
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == 1:
        return value.expand(rows, *value.shape[1:]).contiguous()
    if isinstance(value, (tuple, list)):
        return type(value)(_expand_rows(v, rows) for v in value)
    if isinstance(value, dict):
        return {k: _expand_rows(v, rows) for k, v in value.items()}
    return value


def _qk_fixed(model, base_ids, sites, source_acts, item, fn, kind) -> torch.Tensor:
    """AtP* for query/key cells: the exact new attention pattern, then (A_new - A_base) . dm/dA, per (layer, head)."""
    patterns = [site_name("attn.pattern", layer) for layer in range(model.n_layers)]
    calls: dict[int, tuple] = {}
    handles = []
    for layer in range(model.n_layers):

        def keep(module, args, kwargs, layer=layer):
            calls[layer] = (args, kwargs)

        attention = model.layer_module(layer, model.adapter.attn)
        handles.append(attention.register_forward_pre_hook(keep, with_kwargs=True))
    try:
        base = run(model, model.batch_from_ids([base_ids]), record=patterns, grad=patterns,
                   grad_of=lambda logits: fn(logits[0][-1], item))  # fmt: skip
    finally:
        for handle in handles:
            handle.remove()
    group = model.n_heads // model.n_kv_heads
    n_cells = model.n_heads if kind == "q" else model.n_kv_heads
    rows = []
    with torch.no_grad():
        for layer, (site, pattern) in enumerate(zip(sites, patterns, strict=True)):
            batch = model.batch_from_ids([base_ids] * n_cells)
            cells = [[Patch(site, heads=[h], source="source")] for h in range(n_cells)]
            edits = edits_for(model, batch, cells, {"source": {site: source_acts[site] * n_cells}})
            args, kwargs = _expand_rows(calls[layer], n_cells)
            with hooked(model, batch, record=[pattern], edit=edits) as trace:
                model.layer_module(layer, model.adapter.attn)(*args, **kwargs)
            new = torch.stack(trace.acts[pattern])  # [cell, head, q, k]
            change = (new - base.acts[pattern][0][None]) * base.grads[pattern][0][None]
            per_head = change.flatten(2).sum(-1)  # [cell, head]: only the patched head(s) changed
            if kind == "q":
                rows.append(per_head.diagonal())
            else:  # a key/value head serves `group` query heads
                rows.append(torch.stack([per_head[g, g * group : (g + 1) * group].sum() for g in range(n_cells)]))
    return torch.stack(rows)


def _first_order(model, base_ids, sites, source_acts, item, fn, kind, drop: int | None = None) -> torch.Tensor:
    """(a_source - a_base) . grad on the base run, per cell: `[layer, position]` or `[layer, head]`."""
    edit = {}
    if drop is not None:  # GradDrop: the same forward values, no gradient through this layer's sublayer outputs
        for k in ("attn.out", "mlp.out"):
            edit[site_name(k, drop)] = lambda v, ctx: v.detach()
    result = run(model, model.batch_from_ids([base_ids]), record=sites, grad=sites,
                 edit=edit or None, grad_of=lambda logits: fn(logits[0][-1], item))  # fmt: skip
    rows = [_cells(kind, source_acts[site][0] - result.acts[site][0], result.grads[site][0]) for site in sites]
    return torch.stack(rows).detach()
