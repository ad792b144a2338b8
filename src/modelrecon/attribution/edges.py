"""Edges between the model's components: edge attribution patching (EAP, EAP-IG) and exact edge patching.

The residual stream is a sum of what the *senders* wrote: the embeddings, every attention head and every MLP. Each
*receiver* reads that sum: every head's query, key and value input, every MLP's input, and the logits. An edge is a
(sender, receiver) pair with the sender earlier in the stream. Names:

- senders: `embed`, `layers.L.attn.heads:H`, `layers.L.mlp`;
- receivers: `layers.L.attn.q:H`, `layers.L.attn.k:G`, `layers.L.attn.v:G` (G a key/value head), `layers.L.mlp`,
  `logits`.

At `level="component"` the heads of a layer are summed into `layers.L.attn` on both sides.

EAP scores an edge by (a_source - a_base) of the sender, dotted with the gradient of the metric with respect to the
receiver's own input. A receiver's own gradient is a vector-Jacobian product from the receiver's output back to the
residual vector it reads, taken on the unmodified model's autograd graph, so it works for every architecture the hooks
support. Exact edge patching (`patch_edges`) gives a receiver its input with some senders' contributions swapped for
their counterfactual ones, and is the ground truth EAP estimates.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from modelrecon.attribution.dla import _is_identity, head_output_weights
from modelrecon.attribution.patching import check_options
from modelrecon.counterfactual.experiment import run_pairs
from modelrecon.counterfactual.metrics import ScoredItem
from modelrecon.counterfactual.pairs import Pair, PairTokens, tokenize_pairs
from modelrecon.errors import BadInputError
from modelrecon.hooks.run import run
from modelrecon.hooks.trace import hooked
from modelrecon.models.model import Model
from modelrecon.models.sites import site_name

EDGE_METHODS = ("eap", "eap-ig")
LEVELS = ("head", "component")


@dataclass(frozen=True)
class Sender:
    name: str
    layer: int  # -1 for the embeddings
    kind: str  # embed | head | mlp
    head: int | None
    writes_at: int  # position in the residual stream: it is read by receivers that read later


@dataclass(frozen=True)
class Receiver:
    name: str
    layer: int  # n_layers for the logits
    kind: str  # q | k | v | mlp | logits
    head: int | None
    reads_at: int


def senders(model: Model) -> list[Sender]:
    out = [Sender("embed", -1, "embed", None, 0)]
    for layer in range(model.n_layers):
        out += [Sender(f"layers.{layer}.attn.heads:{h}", layer, "head", h, 2 * layer + 1) for h in range(model.n_heads)]
        out.append(Sender(f"layers.{layer}.mlp", layer, "mlp", None, 2 * layer + 1 + model.has_resid_mid))
    return out


def receivers(model: Model) -> list[Receiver]:
    out = []
    for layer in range(model.n_layers):
        for kind, count in (("q", model.n_heads), ("k", model.n_kv_heads), ("v", model.n_kv_heads)):
            out += [Receiver(f"layers.{layer}.attn.{kind}:{h}", layer, kind, h, 2 * layer + 1) for h in range(count)]
        out.append(Receiver(f"layers.{layer}.mlp", layer, "mlp", None, 2 * layer + 1 + model.has_resid_mid))
    out.append(Receiver("logits", model.n_layers, "logits", None, 2 * model.n_layers + 1))
    return out


def all_edges(model: Model) -> list[tuple[str, str]]:
    """Every head-level edge, senders in stream order."""
    return [(s.name, r.name) for s in senders(model) for r in receivers(model) if s.writes_at < r.reads_at]


def component_of(name: str) -> str:
    """`layers.L.attn.heads:H` and `layers.L.attn.q:H` -> `layers.L.attn`; other names are components already."""
    return name.split(".attn.")[0] + ".attn" if ".attn." in name else name


# --- the residual-stream pieces of one run --------------------------------------------------------------------------
def _sender_sites(model: Model) -> list[str]:
    sites = ["layers.0.resid_pre"]
    for layer in range(model.n_layers):
        sites += [site_name("attn.heads", layer), site_name("mlp.out", layer)]
    return sites


def _writes(model: Model, acts: dict[str, torch.Tensor]) -> torch.Tensor:
    """What each sender wrote into the residual stream, `[sender, ..., pos, d_model]`, from its sites' values.

    A head's write is its output through its slice of the output projection. Where a norm follows attention (Gemma
    2/3), a head's write is the norm's output change when the head's term is added to the rest of the layer's output.
    """
    out = [acts["layers.0.resid_pre"]]
    for layer in range(model.n_layers):
        heads = acts[site_name("attn.heads", layer)]  # [..., pos, head, d_head]
        w_o = head_output_weights(model, layer).to(heads)
        per_head = torch.einsum("...phd,hdm->h...pm", heads, w_o)
        post = _post_norm(model, layer)
        if post is not None:
            total = per_head.sum(0)
            per_head = post(total)[None] - post(total[None] - per_head)
        out += [*per_head, acts[site_name("mlp.out", layer)]]
    return torch.stack(out)


def _post_norm(model: Model, layer: int):
    attention = model.layer_module(layer, model.adapter.attn)
    module = model.layer_module(layer, model.adapter.attn_out)
    return None if _is_identity(module, attention) else module


# --- EAP ------------------------------------------------------------------------------------------------------------
@dataclass
class EdgeResult:
    """Edge attribution scores, mean over pairs: the estimated change of the metric when only the edge is patched.

    `effect` is the score normalised like a sweep's effect (score / (m_clean - m_corrupt), the change it explains).
    """

    method: str
    direction: str
    metric: str
    level: str
    edges: list[dict]  # {"upstream", "downstream", "score", "effect"}

    def top(self, n: int = 10) -> list[dict]:
        return sorted(self.edges, key=lambda e: -abs(e["score"]))[:n]

    def scores(self) -> dict[tuple[str, str], float]:
        return {(e["upstream"], e["downstream"]): e["score"] for e in self.edges}

    def to_json(self) -> str:
        return json.dumps({"method": self.method, "direction": self.direction, "metric": self.metric,
                           "level": self.level, "edges": self.edges}, indent=1)  # fmt: skip


def _check(method: str, direction: str, metric: str, level: str):
    if level not in LEVELS:
        raise BadInputError(f"level must be 'head' or 'component', not {level!r}")
    return check_options(method, EDGE_METHODS, direction, metric)


@dataclass
class EdgeScores:
    """Raw EAP scores, mean over pairs: `scores[sender, receiver]` (NaN where the sender writes after the receiver
    reads), `embedding[position, receiver]` (the embedding sender's row split by token position) and `span` (the
    metric's mean source - base difference)."""

    scores: torch.Tensor
    embedding: torch.Tensor
    span: float


def edge_scores(model: Model, tokens: Sequence[PairTokens], method: str, direction: str, fn, steps: int) -> EdgeScores:
    """EAP (`method="eap"`) or EAP-IG scores of every head-level edge for tokenised pairs (`edge_attribution`)."""
    send, recv = senders(model), receivers(model)
    valid = torch.tensor([[s.writes_at < r.reads_at for r in recv] for s in send])
    base, source = ("counterfactual", "clean") if direction == "denoise" else ("clean", "counterfactual")
    total = torch.zeros(len(send), len(recv), dtype=torch.float64)
    embedding = torch.zeros(tokens[0].length, len(recv), dtype=torch.float64)
    spans = []
    for j, pair in enumerate(tokens):
        clean_logits, clean_acts = run_pairs(model, tokens, "clean", _sender_sites(model), items=[j])
        cf_logits, cf_acts = run_pairs(model, tokens, "counterfactual", _sender_sites(model), items=[j])
        item = ScoredItem(pair.answer, pair.wrong, clean_logits[0])
        spans.append(float(fn(clean_logits[0], item)) - float(fn(cf_logits[0], item)))
        src, dst = (clean_acts, cf_acts) if source == "clean" else (cf_acts, clean_acts)
        delta = _writes(model, {s: src[s][0] for s in src}) - _writes(model, {s: dst[s][0] for s in dst})
        grads = receiver_grads(model, getattr(pair, base), getattr(pair, source), item, fn,
                               steps if method == "eap-ig" else 0)  # fmt: skip
        total += torch.einsum("spd,rpd->sr", delta.double(), grads.double())
        if pair.length == len(embedding):
            embedding += torch.einsum("pd,rpd->pr", delta[0].double(), grads.double())
    n = len(tokens)
    return EdgeScores((total / n).where(valid, torch.nan), embedding / n, float(np.mean(spans)))


def edge_attribution(
    model: Model,
    pairs: list[Pair | PairTokens],
    *,
    method: str = "eap",
    direction: str = "denoise",
    metric: str = "logit_diff",
    steps: int = 16,
    level: str = "head",
) -> EdgeResult:
    """Edge attribution patching (EAP) between heads and MLPs; `eap-ig` averages each receiver's gradient along the
    straight path from the base run's input embeddings to the source run's, in `steps` points (Hanna et al. 2024)."""
    metric_name, fn = _check(method, direction, metric, level)
    raw = edge_scores(model, tokenize_pairs(model, pairs), method, direction, fn, steps)
    scores = raw.scores
    names = ([s.name for s in senders(model)], [r.name for r in receivers(model)])
    if level == "component":
        scores, names = _components(scores, names)
    span = raw.span
    edges = [
        {"upstream": up, "downstream": down, "score": float(value), "effect": float(value) / span if span else None}
        for up, row in zip(names[0], scores, strict=True)
        for down, value in zip(names[1], row, strict=True)
        if not torch.isnan(value)
    ]
    return EdgeResult(method, direction, metric_name, level, edges)


def _components(scores: torch.Tensor, names: tuple[list[str], list[str]]):
    """Head-level scores summed into components (an edge is valid when any of its head edges is)."""
    groups = [list(dict.fromkeys(component_of(n) for n in side)) for side in names]
    out = torch.full((len(groups[0]), len(groups[1])), torch.nan, dtype=scores.dtype)
    rows = [groups[0].index(component_of(n)) for n in names[0]]
    cols = [groups[1].index(component_of(n)) for n in names[1]]
    for i, a in enumerate(rows):
        for k, b in enumerate(cols):
            if not torch.isnan(scores[i, k]):
                out[a, b] = scores[i, k] if torch.isnan(out[a, b]) else out[a, b] + scores[i, k]
    return out, (groups[0], groups[1])


def receiver_grads(model: Model, base_ids, source_ids, item, fn, steps: int = 0) -> torch.Tensor:
    """The metric's gradient with respect to each receiver's own input, `[receiver, pos, d_model]`, on the base run
    (or averaged over `steps` points on the path from its input embeddings to the source's)."""
    n = model.n_layers
    resid_pre = [site_name("resid_pre", i) for i in range(n)]
    mlp_in = [site_name("resid_mid" if model.has_resid_mid else "resid_pre", i) for i in range(n)]
    qkv = {kind: [site_name(f"attn.{kind}", i) for i in range(n)] for kind in ("q", "k", "v")}
    mlp_out = [site_name("mlp.out", i) for i in range(n)]
    last = site_name("resid_post", n - 1)
    sites = list(dict.fromkeys([*resid_pre, *mlp_in, *qkv["q"], *qkv["k"], *qkv["v"], *mlp_out, last]))
    rows = max(1, steps)
    batch = model.batch_from_ids([base_ids] * rows)
    live: dict[str, torch.Tensor] = {}

    def keep(value, ctx):
        live[ctx.site] = value

    edit = {site: keep for site in sites}
    if steps:
        ends = [_recorded(model, ids, ["layers.0.resid_pre"])["layers.0.resid_pre"] for ids in (base_ids, source_ids)]
        alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps
        points = ends[0][None] + alphas.view(-1, 1, 1) * (ends[1] - ends[0])[None]

        def along(value, ctx):
            live[ctx.site] = points.to(value).requires_grad_(True)
            return live[ctx.site]

        edit["layers.0.resid_pre"] = along
    out = []
    with torch.enable_grad(), hooked(model, batch, edit=edit, grad=sites):
        logits = model.forward(batch, last_only=True)
        metric = sum(fn(logits[i, -1], item) for i in range(rows))
        targets = [live[s] for s in (*qkv["q"], *qkv["k"], *qkv["v"], *mlp_out, last)]
        grads = dict(zip((*qkv["q"], *qkv["k"], *qkv["v"], *mlp_out, last),
                         torch.autograd.grad(metric, targets, retain_graph=True), strict=True))  # fmt: skip
        for receiver in receivers(model):
            layer = receiver.layer
            if receiver.kind == "logits":
                g = grads[last]
            elif receiver.kind == "mlp":
                (g,) = torch.autograd.grad(live[mlp_out[layer]], live[mlp_in[layer]], grads[mlp_out[layer]],
                                           retain_graph=True)  # fmt: skip
            else:
                site = qkv[receiver.kind][layer]
                h = receiver.head
                (g,) = torch.autograd.grad(live[site][:, :, h], live[resid_pre[layer]], grads[site][:, :, h],
                                           retain_graph=True, allow_unused=True)  # fmt: skip
                g = torch.zeros_like(live[resid_pre[layer]]) if g is None else g
            out.append(g.detach().mean(0))
    return torch.stack(out)


def _recorded(model: Model, ids: list[int], sites: list[str]) -> dict[str, torch.Tensor]:
    """The sites' values on one prompt's run, `[pos, ...]` each."""
    acts = run(model, model.batch_from_ids([ids]), record=sites).acts
    return {site: values[0] for site, values in acts.items()}


# --- exact edge patching ----------------------------------------------------------------------------------------------
def patch_edges(model: Model, pair: PairTokens, patched: Sequence[set[tuple[str, str]]], item, fn) -> np.ndarray:
    """The metric on the clean run where, in each row, the edges in `patched[row]` carry the counterfactual run's
    sender output instead of the clean one (MIB's edge patching); one batched forward pass for all rows.

    A receiver's input becomes its clean-run residual plus, for each of its patched edges, (the sender's
    counterfactual output - the sender's output in this run). Needs separate q/k/v projections and no norm after
    attention (Llama, Mistral, Qwen, Gemma 1).
    """
    post_norm = any(_post_norm(model, i) is not None for i in range(model.n_layers))
    if model.adapter.qkv_layout != "separate" or post_norm or not model.has_resid_mid:
        raise BadInputError(
            f"exact edge patching needs separate q/k/v projections, a sequential residual and no post-attention "
            f"norm, which {model.adapter.family} models lack; use edge_attribution for estimates"
        )
    send, recv = senders(model), receivers(model)
    sender_index = {s.name: i for i, s in enumerate(send)}
    rows = len(patched)
    masks = torch.zeros(len(recv), rows, len(send))
    for row, edges in enumerate(patched):
        for up, down in edges:
            masks[[r.name for r in recv].index(down), row, sender_index[up]] = 1.0
    cf = _recorded(model, pair.counterfactual, _sender_sites(model))
    cf_writes = _writes(model, cf)  # [sender, pos, d]
    batch = model.batch_from_ids([pair.clean] * rows)
    live: dict[str, torch.Tensor] = {}
    n = model.n_layers
    written: list[torch.Tensor] = []  # this run's sender outputs so far, [rows, pos, d] each

    def diffs(upto: int) -> torch.Tensor:
        return torch.stack([cf_writes[i][None] - written[i] for i in range(upto)], 1)  # [rows, sender, pos, d]

    def patched_input(receiver_index: int, resid: torch.Tensor) -> torch.Tensor | None:
        mask = masks[receiver_index, :, : len(written)]
        if not mask.any():
            return None
        return resid + torch.einsum("rs,rspd->rpd", mask.to(resid), diffs(len(written)).to(resid))

    recv_index = {r.name: i for i, r in enumerate(recv)}
    busy = []  # set while a receiver's input is recomputed through the model's own modules (their hooks stay out)

    def through(module, x):
        busy.append(True)
        try:
            return module(x)
        finally:
            busy.pop()

    def unless_busy(edit_fn):
        return lambda value, ctx: None if busy else edit_fn(value, ctx)

    def on_resid_pre(value, ctx):
        live[ctx.site] = value
        if ctx.layer == 0:
            written.append(value)

    def on_heads(value, ctx):  # [rows, pos, head, d_head]: the layer's head writes join the stream
        w_o = head_output_weights(model, ctx.layer).to(value)
        written.extend(torch.einsum("rphd,hdm->hrpm", value, w_o).unbind(0))

    def on_qkv(value, ctx):
        kind = ctx.site.rsplit(".", 1)[1]
        resid = live[site_name("resid_pre", ctx.layer)]
        norm = model.layer_module(ctx.layer, model.adapter.attn_norm)
        projection = model.layer_module(ctx.layer, model.adapter.qkv["qkv".index(kind)])
        new = value
        for h in range(value.shape[2]):
            x = patched_input(recv_index[f"layers.{ctx.layer}.attn.{kind}:{h}"], resid)
            if x is not None:
                head = through(projection, through(norm, x)).reshape(value.shape)[:, :, h]
                new = torch.cat([new[:, :, :h], head[:, :, None], new[:, :, h + 1 :]], 2)
        return new

    def on_resid_mid(value, ctx):
        live[ctx.site] = value

    def on_mlp_in(value, ctx):
        x = patched_input(recv_index[f"layers.{ctx.layer}.mlp"], live[site_name("resid_mid", ctx.layer)])
        return None if x is None else through(model.layer_module(ctx.layer, model.adapter.mlp_norm), x)

    def on_mlp_out(value, ctx):
        written.append(value)

    def on_last(value, ctx):
        return patched_input(recv_index["logits"], value)

    edit = {"layers.0.resid_pre": on_resid_pre}
    for layer in range(n):
        edit[site_name("resid_pre", layer)] = on_resid_pre
        edit[site_name("attn.heads", layer)] = on_heads
        for kind in ("q", "k", "v"):
            edit[site_name(f"attn.{kind}", layer)] = on_qkv
        edit[site_name("resid_mid", layer)] = on_resid_mid
        edit[site_name("mlp.in", layer)] = on_mlp_in
        edit[site_name("mlp.out", layer)] = on_mlp_out
    edit[site_name("resid_post", n - 1)] = on_last
    with torch.no_grad(), hooked(model, batch, edit={site: unless_busy(e) for site, e in edit.items()}):
        logits = model.forward(batch, last_only=True)
    return np.array([float(fn(logits[i, -1], item)) for i in range(rows)])
