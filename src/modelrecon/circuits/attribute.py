"""Attribution graphs: the direct effects between a prompt's active transcoder features, error terms, token
embeddings and target logits, computed with batched backward passes through the replacement model.

Each backward pass has one row per target node (a logit, or a feature's encoder pre-activation); the gradient at
every source leaf times the source's value is the source's direct effect on that target. Logit rows come first,
then feature rows in order of their influence on the logits so far (up to `max_feature_nodes`), so the budget goes
to the features that matter. Only edges between kept nodes are stored, as edge lists.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from modelrecon.circuits.graph import Graph, Node
from modelrecon.circuits.replacement import CleanRun, ReplacementModel
from modelrecon.errors import BadInputError
from modelrecon.models.model import Model
from modelrecon.progress import token_progress


@dataclass(frozen=True)
class Target:
    """A row of the graph: a logit (`token` id) or a feature's pre-activation (`layer`, `position`, `feature`)."""

    kind: str  # "logit" | "feature"
    token: int | None = None
    wrong: int | None = None  # a logit-difference target: logit(token) - logit(wrong)
    layer: int | None = None
    position: int | None = None
    feature: int | None = None


def single_token(model: Model, text: str) -> int:
    ids = [i for i in model.encode(text) if i not in _special(model)]
    if len(ids) != 1:
        raise BadInputError(f"target {text!r} is {len(ids)} tokens; give one token (with its leading space)")
    return ids[0]


def logit_targets(model: Model, clean: CleanRun, target: str | None, max_logits: int, cumulative: float) -> list:
    """(token id, probability) of the target logits: the given token, or the most likely tokens until their
    probabilities add up to `cumulative` (at most `max_logits`)."""
    probs = torch.softmax(clean.logits.double(), -1)
    if target is not None:
        token = single_token(model, target)
        return [(token, float(probs[token]))]
    order = probs.argsort(descending=True)[:max_logits]
    chosen, total = [], 0.0
    for token in order.tolist():
        chosen.append((token, float(probs[token])))
        total += float(probs[token])
        if total >= cumulative:
            break
    return chosen


def _special(model: Model) -> set[int]:
    return set(getattr(model.tokenizer, "all_special_ids", []) or [])


def _scalar(target: Target, logits: torch.Tensor, mlp_in: list[torch.Tensor], rm: ReplacementModel, row: int):
    if target.kind == "logit":
        baseline = logits[row].mean() if target.wrong is None else logits[row, target.wrong]
        return logits[row, target.token] - baseline
    encoder = rm.transcoders[target.layer].W_enc[0][:, target.feature]
    return mlp_in[target.layer][row, target.position] @ encoder


class BackwardRows:
    """One forward pass of `rows` copies of the prompt through the replacement model, kept for every batch of targets:
    the linearised model does not depend on the targets, so each batch costs one backward pass only."""

    def __init__(self, rm: ReplacementModel, clean: CleanRun, rows: int) -> None:
        self.rm, self.clean, self.rows = rm, clean, rows
        self._stack = ExitStack()
        self._stack.enter_context(torch.enable_grad())
        self.leaves = self._stack.enter_context(rm.linearised(clean, rows))
        batch = rm.model.batch_from_ids([clean.ids] * rows)
        self.logits = rm.model.forward(batch, last_only=True)[:, -1]

    def __enter__(self) -> BackwardRows:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def effects(self, targets: list[Target]) -> list[dict]:
        """For each target (at most `rows`), its direct inputs: {("feature", layer, pos, f) | ("error", layer, pos) |
        ("embedding", pos): weight} (sources at position 0, a BOS or attention sink, are held constant)."""
        rm, clean, leaves = self.rm, self.clean, self.leaves
        with torch.enable_grad():
            total = sum(_scalar(t, self.logits, leaves["mlp_in"], rm, r) for r, t in enumerate(targets))
            inputs = [leaves["embed"], *leaves["features"], *leaves["errors"]]
            grads = torch.autograd.grad(total, inputs, allow_unused=True, retain_graph=True)
        n, rows = rm.n_layers, len(targets)
        g_embed, g_features, g_errors = grads[0], grads[1 : 1 + n], grads[1 + n :]
        out: list[dict] = [{} for _ in range(rows)]
        embed_effect = (g_embed[:rows] * clean.embed).sum(-1)  # [rows, pos]
        for r, p in (embed_effect != 0).nonzero().tolist():
            out[r][("embedding", p)] = float(embed_effect[r, p])
        for layer in range(n):
            if g_features[layer] is not None:
                effect = g_features[layer][:rows] * clean.features[layer]
                effect[:, 0] = 0
                for r, p, f in (effect != 0).nonzero().tolist():
                    out[r][("feature", layer, p, f)] = float(effect[r, p, f])
            if g_errors[layer] is not None:
                effect = (g_errors[layer][:rows] * clean.errors[layer]).sum(-1)
                effect[:, 0] = 0
                for r, p in (effect != 0).nonzero().tolist():
                    out[r][("error", layer, p)] = float(effect[r, p])
        return out


def attribute(
    model: Model,
    prompt: str,
    transcoders: list,
    *,
    target: str | None = None,
    wrong: str | None = None,
    max_logits: int = 10,
    cumulative: float = 0.95,
    max_feature_nodes: int = 1000,
    batch_size: int = 32,
    progress: bool = True,
) -> Graph:
    """The attribution graph of `prompt` (see the module docstring). `target`: one target token instead of the top
    logits; with `wrong` too, the target is the logit difference logit(target) - logit(wrong)."""
    if wrong is not None and target is None:
        raise BadInputError("a logit-difference target needs --target as well as --wrong")
    start = time.perf_counter()
    rm = ReplacementModel(model, transcoders)
    ids = model.encode(prompt)
    clean = rm.clean(ids)
    logits = logit_targets(model, clean, target, max_logits, cumulative)
    wrong_id = None if wrong is None else single_token(model, wrong)
    active = [(layer, p, f) for layer, acts in enumerate(clean.features)
              for p, f in (acts[1:] > 0).nonzero().tolist() for p in [p + 1]]  # fmt: skip
    rows: dict[tuple, dict] = {}  # target key -> its direct inputs
    logit_keys = [("logit", token) for token, _ in logits]
    budget = min(max_feature_nodes, len(active))
    with (
        BackwardRows(rm, clean, batch_size) as backward,
        token_progress(budget, enabled=progress, label="attribution", unit="features", rate_unit="row") as advance,
    ):
        for chunk in _chunks([Target("logit", token=t, wrong=wrong_id) for t, _ in logits], batch_size):
            for t, inputs in zip(chunk, backward.effects(chunk), strict=True):
                rows[("logit", t.token)] = inputs
        while sum(1 for k in rows if k[0] == "feature") < budget:
            pending = [("feature", *a) for a in active if ("feature", *a) not in rows]
            if budget < len(active):  # rank by influence only when not every feature gets a row
                influence = _influence(rows, dict(zip(logit_keys, [p for _, p in logits], strict=True)))
                pending.sort(key=lambda k: -influence.get(k, 0.0))
            room = budget - sum(1 for k in rows if k[0] == "feature")
            chunk = [
                Target("feature", layer=k[1], position=k[2], feature=k[3]) for k in pending[: min(batch_size, room)]
            ]
            for t, inputs in zip(chunk, backward.effects(chunk), strict=True):
                rows[("feature", t.layer, t.position, t.feature)] = inputs
            advance(len(chunk))
    graph = _assemble(model, prompt, ids, clean, rows, logits)
    if wrong is not None:  # the logit node stands for the difference
        i = graph.logit_nodes()[0]
        node = graph.nodes[i]
        graph.nodes[i] = Node(node.kind, node.position, feature=node.feature, activation=node.activation,
                              token=f"{node.token} - {model.tokenizer.decode([wrong_id])}")  # fmt: skip
    graph.metadata |= {
        "targets": [{"token": model.tokenizer.decode([t]), "token_id": t, "probability": p} for t, p in logits],
        "logit_difference_against": None if wrong is None else {"token": wrong, "token_id": wrong_id},
        "active_features": len(active),
        "n_layers": model.n_layers,
        "max_feature_nodes": max_feature_nodes,
        "transcoders": [d.config.provenance for d in rm.transcoders[:1]],
        "seconds": time.perf_counter() - start,
    }
    return graph


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _influence(rows: dict[tuple, dict], logit_weights: dict[tuple, float]) -> dict[tuple, float]:
    """Each source's influence on the logits through the rows computed so far: logit weights pushed backwards along
    row-normalised |direct effects| (sum over paths of every length), as circuit-tracer orders its rows."""
    influence: dict[tuple, float] = {}
    frontier = dict(logit_weights)
    for _ in range(len(rows) + 1):
        nxt: dict[tuple, float] = {}
        for key, weight in frontier.items():
            inputs = rows.get(key)
            if not inputs or weight == 0:
                continue
            norm = sum(abs(v) for v in inputs.values())
            for source, value in inputs.items():
                nxt[source] = nxt.get(source, 0.0) + weight * abs(value) / norm
        for key, value in nxt.items():
            influence[key] = influence.get(key, 0.0) + value
        if not nxt:
            break
        frontier = nxt
    return influence


def _assemble(model, prompt, ids, clean: CleanRun, rows: dict, logits: list) -> Graph:
    tokens = [model.tokenizer.decode([i]) for i in ids]
    last = len(ids) - 1
    nodes: list[Node] = []
    index: dict[tuple, int] = {}

    def add(key, node):
        index[key] = len(nodes)
        nodes.append(node)

    for key in sorted(k for k in rows if k[0] == "feature"):
        _, layer, p, f = key
        add(key, Node("feature", p, layer, f, float(clean.features[layer][p, f]), tokens[p]))
    for layer in range(len(clean.errors)):
        for p in range(1, len(ids)):
            add(("error", layer, p), Node("error", p, layer, token=tokens[p]))
    for p, token_id in enumerate(ids):
        add(("embedding", p), Node("embedding", p, feature=token_id, token=tokens[p]))
    for token_id, prob in logits:
        add(("logit", token_id), Node("logit", last, feature=token_id, activation=prob,
                                      token=model.tokenizer.decode([token_id])))  # fmt: skip
    sources, targets, weights = [], [], []
    for target_key, inputs in rows.items():
        for source_key, weight in inputs.items():
            if source_key in index:
                sources.append(index[source_key])
                targets.append(index[target_key])
                weights.append(weight)
    return Graph(prompt, tokens, list(ids), model.name, nodes, torch.tensor(sources, dtype=torch.int64),
                 torch.tensor(targets, dtype=torch.int64), torch.tensor(weights, dtype=torch.float32))  # fmt: skip
