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
from modelrecon.circuits.prune import influence
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


def _seeds(targets: list[Target], logits: torch.Tensor, mlp_in: list[torch.Tensor], rm: ReplacementModel):
    """(outputs, gradient seeds) whose backward pass gives every target row its own gradient: a logit row seeds
    `d(logit - mean logit)` (or `- wrong logit`) on the logits, a feature row its encoder vector on its layer's MLP
    input. Seeding the tensors directly (rather than summing selected scalars) keeps the backward pass from building
    a full-size zero gradient per row."""
    outputs, seeds = [], []
    logit_seed = torch.zeros_like(logits)
    by_layer: dict[int, list[tuple[int, int, int]]] = {}
    for row, t in enumerate(targets):
        if t.kind == "logit":
            if t.wrong is None:
                logit_seed[row] -= 1.0 / logits.shape[-1]
            else:
                logit_seed[row, t.wrong] -= 1.0
            logit_seed[row, t.token] += 1.0
        else:
            by_layer.setdefault(t.layer, []).append((row, t.position, t.feature))
    layer_seeds = {}
    for layer, picks in by_layer.items():
        rows, positions, features = torch.tensor(picks).T
        seed = torch.zeros_like(mlp_in[layer])
        vectors = rm.encoder_vector(layer, features).T.to(seed.dtype)  # [targets, d]
        layer_seeds[layer] = seed.index_put_((rows, positions), vectors, accumulate=True)
    if logit_seed.any():
        outputs.append(logits)
        seeds.append(logit_seed)
    for layer, seed in layer_seeds.items():
        outputs.append(mlp_in[layer])
        seeds.append(seed)
    return outputs, seeds


class BackwardRows:
    """One forward pass of `rows` copies of the prompt through the replacement model, kept for every batch of targets:
    the linearised model does not depend on the targets, so each batch costs one backward pass only."""

    def __init__(self, rm: ReplacementModel, clean: CleanRun, rows: int) -> None:
        self.rm, self.clean, self.rows = rm, clean, rows
        self._stack = ExitStack()
        self._stack.enter_context(torch.enable_grad())
        self.leaves = self._stack.enter_context(rm.linearised(clean, rows, active_only=True))
        batch = rm.model.batch_from_ids([clean.ids] * rows)
        self.logits = rm.model.forward(batch, last_only=True)[:, -1]

    def __enter__(self) -> BackwardRows:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def effects(self, targets: list[Target], index: NodeIndex) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The direct inputs of each target (at most `rows`), as (row, source node, weight) tensors in `index`'s
        numbering (sources at position 0, a BOS or attention sink, are held constant and left out)."""
        rm, clean, leaves = self.rm, self.clean, self.leaves
        with torch.enable_grad():
            outputs, seeds = _seeds(targets, self.logits, leaves["mlp_in"], rm)
            inputs = [leaves["embed"], *leaves["features"], *leaves["errors"]]
            grads = torch.autograd.grad(outputs, inputs, seeds, allow_unused=True, retain_graph=True)
        n, rows = rm.n_layers, len(targets)
        pieces = [((grads[0][:rows] * clean.embed).sum(-1), index.embeddings)]  # [rows, pos] effects, [pos] nodes
        for layer in range(n):
            if grads[1 + layer] is not None:
                positions, latents, nodes = index.active[layer]
                valid = leaves["active"][layer][1]  # the leaf holds the active features per position, padded
                pieces.append((grads[1 + layer][:rows][:, valid] * clean.features[layer][positions, latents], nodes))
            if grads[1 + n + layer] is not None:
                pieces.append(((grads[1 + n + layer][:rows] * clean.errors[layer]).sum(-1), index.errors[layer]))
        out_rows, out_sources, out_weights = [], [], []
        for effect, nodes in pieces:
            mask = (effect != 0) & (nodes >= 0)[None]
            where = mask.nonzero(as_tuple=True)
            out_rows.append(where[0])
            out_sources.append(nodes.expand_as(effect)[where])
            out_weights.append(effect[where].float())
        return torch.cat(out_rows), torch.cat(out_sources), torch.cat(out_weights)


@dataclass
class NodeIndex:
    """Every candidate node of a prompt's graph, numbered: active features (per layer, their positions, latents and
    node numbers, -1 at position 0), error nodes (per layer `[pos]`, -1 at position 0), embeddings `[pos]`, then the
    logits."""

    active: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    errors: list[torch.Tensor]
    embeddings: torch.Tensor
    keys: list[
        tuple
    ]  # per node: ("feature", layer, pos, f) | ("error", layer, pos) | ("embedding", pos) | ("logit", t)

    @classmethod
    def build(cls, clean: CleanRun, logit_tokens: list[int]) -> NodeIndex:
        keys: list[tuple] = []

        def number(mask: torch.Tensor, key) -> torch.Tensor:
            out = torch.full(mask.shape, -1, dtype=torch.int64)
            where = mask.nonzero()
            out[tuple(where.T)] = torch.arange(len(keys), len(keys) + len(where))
            keys.extend(key(*w) for w in where.tolist())
            return out

        active = []
        for layer, acts in enumerate(clean.features):
            mask = acts > 0
            positions, latents = mask.nonzero(as_tuple=True)  # the order of the replacement model's sparse leaf
            mask[0] = False  # position 0 (BOS, an attention sink) is held constant: no node
            numbers = number(mask, lambda p, f, layer=layer: ("feature", layer, p, f))
            active.append((positions, latents, numbers[positions, latents]))
        positions = torch.ones(len(clean.ids), dtype=torch.bool)
        errors = []
        for layer in range(len(clean.errors)):
            mask = positions.clone()
            mask[0] = False
            errors.append(number(mask, lambda p, layer=layer: ("error", layer, p)))
        embeddings = number(positions, lambda p: ("embedding", p))
        keys.extend(("logit", t) for t in logit_tokens)
        return cls(active, errors, embeddings, keys)

    def logit(self, token: int) -> int:
        return self.keys.index(("logit", token))


def attribute(
    model: Model,
    prompt: str,
    transcoders: list | ReplacementModel,
    *,
    target: str | None = None,
    wrong: str | None = None,
    max_logits: int = 10,
    cumulative: float = 0.95,
    max_feature_nodes: int = 1000,
    batch_size: int = 32,
    rank_every: int = 4,
    progress: bool = True,
) -> Graph:
    """The attribution graph of `prompt` (see the module docstring). `target`: one target token instead of the top
    logits; with `wrong` too, the target is the logit difference logit(target) - logit(wrong). `transcoders`: the
    dictionaries, or a ReplacementModel already built on them (which the caller can then reuse). Under a budget
    smaller than the active features, the pending features are re-ranked by influence every `rank_every` batches
    (circuit-tracer's `update_interval`, 4)."""
    if wrong is not None and target is None:
        raise BadInputError("a logit-difference target needs --target as well as --wrong")
    start = time.perf_counter()
    rm = transcoders if isinstance(transcoders, ReplacementModel) else ReplacementModel(model, transcoders)
    ids = model.encode(prompt)
    clean = rm.clean(ids)
    logits = logit_targets(model, clean, target, max_logits, cumulative)
    wrong_id = None if wrong is None else single_token(model, wrong)
    index = NodeIndex.build(clean, [t for t, _ in logits])
    features = [i for i, key in enumerate(index.keys) if key[0] == "feature"]
    logit_weights = torch.zeros(len(index.keys), dtype=torch.float64)
    for token, probability in logits:
        logit_weights[index.logit(token)] = probability
    edges: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (targets, sources, weights) per batch
    expanded = torch.zeros(len(index.keys), dtype=torch.bool)
    budget = min(max_feature_nodes, len(features))

    def run_rows(nodes: list[int], chunk: list[Target]) -> None:
        rows, sources, weights = backward.effects(chunk, index)
        edges.append((torch.tensor(nodes)[rows], sources, weights))
        expanded[nodes] = True

    with (
        BackwardRows(rm, clean, batch_size) as backward,
        token_progress(budget, enabled=progress, label="attribution", unit="features", rate_unit="row") as advance,
    ):
        for chunk in _chunks([(index.logit(t), Target("logit", token=t, wrong=wrong_id)) for t, _ in logits],
                             batch_size):  # fmt: skip
            run_rows([n for n, _ in chunk], [t for _, t in chunk])
        ranked, batches = torch.tensor(features, dtype=torch.int64), 0
        while int(expanded[features].sum()) < budget:
            # rank by influence only when not every feature gets a row, and every `rank_every` batches
            if budget < len(features) and batches % rank_every == 0:
                targets, sources, weights = (torch.cat(x) for x in zip(*edges, strict=True))
                scores = influence(len(index.keys), sources, targets, weights, logit_weights)
                ranked = ranked[scores[ranked].argsort(descending=True, stable=True)]
            pending = ranked[~expanded[ranked]]
            batches += 1
            chosen = pending[: min(batch_size, budget - int(expanded[features].sum()))].tolist()
            run_rows(chosen, [Target("feature", layer=k[1], position=k[2], feature=k[3])
                              for k in (index.keys[n] for n in chosen)])  # fmt: skip
            advance(len(chosen))
    targets, sources, weights = (torch.cat(x) for x in zip(*edges, strict=True))
    kept = expanded | torch.tensor([key[0] != "feature" for key in index.keys])
    graph = _assemble(model, prompt, ids, clean, index, kept, (sources, targets, weights), logits)
    if wrong is not None:  # the logit node stands for the difference
        i = graph.logit_nodes()[0]
        node = graph.nodes[i]
        graph.nodes[i] = Node(node.kind, node.position, feature=node.feature, activation=node.activation,
                              token=f"{node.token} - {model.tokenizer.decode([wrong_id])}")  # fmt: skip
    graph.metadata |= {
        "targets": [{"token": model.tokenizer.decode([t]), "token_id": t, "probability": p} for t, p in logits],
        "logit_difference_against": None if wrong is None else {"token": wrong, "token_id": wrong_id},
        "active_features": len(features),
        "n_layers": model.n_layers,
        "max_feature_nodes": max_feature_nodes,
        "transcoders": [d.config.provenance for d in rm.dictionaries[:1]],
        "seconds": time.perf_counter() - start,
    }
    return graph


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _assemble(model, prompt, ids, clean: CleanRun, index: NodeIndex, kept: torch.Tensor, edges, logits) -> Graph:
    """The graph of the kept nodes (features in (layer, position, feature) order, then errors, embeddings, logits)
    and the edges between them."""
    tokens = [model.tokenizer.decode([i]) for i in ids]
    probability = dict(logits)
    nodes, new_index = [], torch.full((len(index.keys),), -1, dtype=torch.int64)
    for n, key in enumerate(index.keys):
        if not kept[n]:
            continue
        new_index[n] = len(nodes)
        if key[0] == "feature":
            _, layer, p, f = key
            nodes.append(Node("feature", p, layer, f, float(clean.features[layer][p, f]), tokens[p]))
        elif key[0] == "error":
            nodes.append(Node("error", key[2], key[1], token=tokens[key[2]]))
        elif key[0] == "embedding":
            nodes.append(Node("embedding", key[1], feature=ids[key[1]], token=tokens[key[1]]))
        else:
            nodes.append(Node("logit", len(ids) - 1, feature=key[1], activation=probability[key[1]],
                              token=model.tokenizer.decode([key[1]])))  # fmt: skip
    sources, targets, weights = edges
    keep = kept[sources] & kept[targets]
    return Graph(prompt, tokens, list(ids), model.name, nodes, new_index[sources[keep]], new_index[targets[keep]],
                 weights[keep].float())  # fmt: skip
