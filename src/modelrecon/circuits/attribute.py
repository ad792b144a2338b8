"""Attribution graphs: the direct effects between a prompt's active transcoder features, error terms, token
embeddings and target logits, computed with batched backward passes through the frozen replacement model.

Each backward pass (`jacobian.Jacobian`) has one row per target node (a logit, or a feature's encoder
pre-activation); the gradient at every source times the source's value is the source's direct effect on that target.
Logit rows come first, then feature rows in order of their influence on the logits so far (up to
`max_feature_nodes`), so the budget goes to the features that matter; the features chosen between two rankings are
batched by position, because a batch only runs over the positions up to its last target's. Only edges between kept
nodes are stored, as edge lists, and every graph's edges are checked against an exact intervention on the
unmodified model (`jacobian.check_edges`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from modelrecon.circuits.graph import Graph, Node
from modelrecon.circuits.jacobian import Jacobian, Target, active_per_position, check_edges
from modelrecon.circuits.prune import influence
from modelrecon.circuits.replacement import CleanRun, ReplacementModel
from modelrecon.errors import BadInputError
from modelrecon.models.model import Model, single_token
from modelrecon.progress import token_progress


def logit_targets(model: Model, clean: CleanRun, target: str | None, max_logits: int, cumulative: float) -> list:
    """(token id, probability) of the target logits: the given token, or the most likely tokens until their
    probabilities add up to `cumulative` (at most `max_logits`)."""
    probs = torch.softmax(clean.logits.double(), -1)
    if target is not None:
        token = single_token(model, target, "target")
        return [(token, float(probs[token]))]
    order = probs.argsort(descending=True)[:max_logits]
    chosen, total = [], 0.0
    for token in order.tolist():
        chosen.append((token, float(probs[token])))
        total += float(probs[token])
        if total >= cumulative:
            break
    return chosen


@dataclass
class NodeIndex:
    """Every candidate node of a prompt's graph, numbered: active features (per layer, their positions, latents and
    node numbers, -1 at position 0; and the same numbers per position padded as the Jacobian's features, `grid`
    `[pos, k]`, -1 in the padding), error nodes (per layer `[pos]`, -1 at position 0), embeddings `[pos]`, then the
    logits."""

    active: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    grid: list[torch.Tensor]
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

        active, grid = [], []
        for layer, acts in enumerate(clean.features):
            acts = acts.cpu()  # node numbering is bookkeeping: on the host, once per prompt
            mask = acts > 0
            positions, latents = mask.nonzero(as_tuple=True)
            mask[0] = False  # position 0 (BOS, an attention sink) is held constant: no node
            numbers = number(mask, lambda p, f, layer=layer: ("feature", layer, p, f))
            active.append((positions, latents, numbers[positions, latents]))
            _, valid = active_per_position(acts)
            grid.append(torch.full(valid.shape, -1, dtype=torch.int64).masked_scatter_(valid, active[-1][2]))
        positions = torch.ones(len(clean.ids), dtype=torch.bool)
        errors = []
        for layer in range(len(clean.errors)):
            mask = positions.clone()
            mask[0] = False
            errors.append(number(mask, lambda p, layer=layer: ("error", layer, p)))
        embeddings = number(positions, lambda p: ("embedding", p))
        keys.extend(("logit", t) for t in logit_tokens)
        return cls(active, grid, errors, embeddings, keys)

    def logit(self, token: int) -> int:
        return self.keys.index(("logit", token))


def prompt_ids(model: Model, prompt: str) -> list[int]:
    """The prompt's token ids, refused in one line when it is longer than the positions the model was trained on
    (`Model.encode` checks the context)."""
    return model.encode(prompt)


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
    clean: CleanRun | None = None,
) -> Graph:
    """The attribution graph of `prompt` (see the module docstring). `target`: one target token instead of the top
    logits; with `wrong` too, the target is the logit difference logit(target) - logit(wrong). `transcoders`: the
    dictionaries, or a ReplacementModel already built on them (which the caller can then reuse). Under a budget
    smaller than the active features, the pending features are re-ranked by influence every `rank_every` batches
    (circuit-tracer's `update_interval`, 4). `batch_size`: rows per pass over the whole prompt (a pass over fewer
    positions takes proportionally more rows, the same memory). `clean`: the replacement model's clean run of the
    prompt (`rm.clean(prompt_ids(model, prompt))`) when the caller has it already and needs it again afterwards
    (the causal check does): it is read, never changed."""
    if wrong is not None and target is None:
        raise BadInputError("a logit-difference target needs --target as well as --wrong")
    start = time.perf_counter()
    rm = transcoders if isinstance(transcoders, ReplacementModel) else ReplacementModel(model, transcoders)
    ids = prompt_ids(model, prompt)
    if clean is None:
        clean = rm.clean(ids)  # O(pos) memory: what the rest needs is estimated from it before any row is computed
    elif list(clean.ids) != ids:
        raise ValueError("the clean run given to attribute() is not of this prompt")
    logits = logit_targets(model, clean, target, max_logits, cumulative)
    wrong_id = None if wrong is None else single_token(model, wrong, "target")
    index = NodeIndex.build(clean, [t for t, _ in logits])
    features = [i for i, key in enumerate(index.keys) if key[0] == "feature"]
    check_memory(estimate_memory(rm, clean, min(max_feature_nodes, len(features)) + len(logits), batch_size),
                 model.device, len(ids))  # fmt: skip
    logit_weights = torch.zeros(len(index.keys), dtype=torch.float64)
    for token, probability in logits:
        logit_weights[index.logit(token)] = probability
    edges: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (targets, sources, weights) per batch
    expanded = torch.zeros(len(index.keys), dtype=torch.bool)
    budget = min(max_feature_nodes, len(features))

    jacobian = Jacobian(rm, clean)

    computed: list[tuple[int, Target]] = []  # every (node, row) computed, in order: what the edge check checks

    def run_rows(chunk: list[tuple[int, Target]]) -> None:
        rows, sources, weights = jacobian.effects([t for _, t in chunk], index)
        nodes = [n for n, _ in chunk]
        edges.append((torch.tensor(nodes, dtype=torch.int32)[rows], sources.int(), weights))  # int32: memory
        expanded[nodes] = True
        computed.extend(chunk)

    def feature_row(node: int) -> tuple[int, Target]:
        _, layer, position, feature = index.keys[node]
        return node, Target("feature", layer=layer, position=position, feature=feature)

    def position(row: tuple[int, Target]) -> int:
        return len(ids) - 1 if row[1].kind == "logit" else row[1].position

    def by_position(rows: list[tuple[int, Target]]):
        """A pass runs over the positions up to its last target's, so rows of nearby positions go together, and a
        pass over the first n positions takes `batch_size x length / n` rows: the memory of `batch_size` rows over
        the whole prompt, in fewer passes."""
        chunk: list[tuple[int, Target]] = []
        for row in sorted(rows, key=position):
            if chunk and len(chunk) + 1 > batch_size * len(ids) // (position(row) + 1):
                yield chunk
                chunk = []
            chunk.append(row)
        if chunk:
            yield chunk

    logit_rows = [(index.logit(t), Target("logit", token=t, wrong=wrong_id)) for t, _ in logits]
    with token_progress(budget, enabled=progress, label="attribution", unit="features", rate_unit="row") as advance:
        if budget == len(features):  # every feature gets a row, no ranking needed: the logits' rows join theirs
            for chunk in by_position(logit_rows + [feature_row(n) for n in features]):
                run_rows(chunk)
                advance(sum(t.kind == "feature" for _, t in chunk))
        else:
            for chunk in _chunks(logit_rows, batch_size):
                run_rows(chunk)
            ranked, done = torch.tensor(features, dtype=torch.int64), 0
            while done < budget:  # the next `rank_every` batches go to the most influential features so far
                targets, sources, weights = (torch.cat(x) for x in zip(*edges, strict=True))
                scores = influence(len(index.keys), sources, targets, weights, logit_weights)
                ranked = ranked[scores[ranked].argsort(descending=True, stable=True)]
                chosen = ranked[~expanded[ranked]][: min(rank_every * batch_size, budget - done)].tolist()
                for chunk in by_position([feature_row(n) for n in chosen]):
                    run_rows(chunk)
                    advance(len(chunk))
                done += len(chosen)
    targets, sources, weights = (torch.cat(x) for x in zip(*edges, strict=True))
    check_error = check_edges(rm, clean, index, (targets, sources, weights), [t for _, t in computed],
                              [n for n, _ in computed])  # fmt: skip
    if check_error > (1e-3 if clean.embed.dtype == torch.float32 else 0.1):
        raise BadInputError(f"the attribution pass disagrees with the model's own forward pass (relative error "
                            f"{check_error:.1e}): this architecture is outside what the replacement model "
                            f"supports")  # fmt: skip
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
        "edge_check_error": check_error,
        "seconds": time.perf_counter() - start,
    }
    graph.check_finite()
    return graph


def estimate_memory(rm: ReplacementModel, clean: CleanRun, rows: int, batch_size: int) -> dict[str, int]:
    """Bytes the attribution of `rows` target rows will add to the clean run, by part (an estimate: the edges part
    assumes a target's sources sit, on average, at half its positions and, for a feature, in half of the layers).

    - edges: int32 target, int32 source, float32 weight per edge (what the graph keeps);
    - pass: one batch of the transposed pass: gradients `[rows, n, d]` and effects `[rows, sources]`, with
      `rows x n` about `batch_size x pos` (`by_position`);
    - patterns: every layer's `[heads, pos, pos]` when kept (up to a quarter of the free memory), else one block
      of rows at a time;
    - check: the edge check's forward pass of two rows (each layer's pattern, its scores and softmax, transient)."""
    model, pos = rm.model, len(clean.ids)
    k = max(int((f > 0).sum(-1).max()) for f in clean.features)  # active features at the busiest position
    per_position = 1 + rm.n_layers * (k + 1)  # sources: embedding, then features and error per layer
    return {
        "edges": int(rows * (pos / 2) * (1 + rm.n_layers / 2 * (k + 1)) * 12),
        "pass": batch_size * pos * (model.d_model + per_position) * 4,
        # all kept where they fit in a quarter of the free memory (Jacobian), else a block of rows at a time
        "patterns": min(rm.n_layers * model.n_heads * pos * pos * 4, 1 << 26),
        "check": 3 * 2 * model.n_heads * pos * pos * 4,
    }


def check_memory(parts: dict[str, int], device, n_tokens: int) -> None:
    """A one-line refusal, before the long part starts, when the estimate does not fit in the memory free on the
    device (never on a device whose free memory cannot be read)."""
    from modelrecon.memory import available_bytes

    free = available_bytes(device)
    need = sum(parts.values())
    if free is None or need <= free:
        return
    largest = max(parts, key=parts.get)
    bound = {"edges": "lower --max-features", "pass": "lower --batch-size"}.get(largest, "trace a shorter prompt")
    raise BadInputError(f"attributing {n_tokens:,} tokens needs about {need / 2**30:.1f} GiB ({largest}: "
                        f"{parts[largest] / 2**30:.1f} GiB), {free / 2**30:.1f} GiB free on {device}: {bound} "
                        f"(it bounds the {largest})")  # fmt: skip


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _assemble(model, prompt, ids, clean: CleanRun, index: NodeIndex, kept: torch.Tensor, edges, logits) -> Graph:
    """The graph of the kept nodes (features in (layer, position, feature) order, then errors, embeddings, logits)
    and the edges between them."""
    tokens = [model.tokenizer.decode([i]) for i in ids]
    probability = dict(logits)
    activation = {}  # node number -> feature activation
    for layer, (positions, latents, numbers) in enumerate(index.active):
        activation.update(zip(numbers.tolist(), clean.features[layer][positions, latents].tolist(), strict=True))
    nodes = []
    for n, key, keep in zip(range(len(index.keys)), index.keys, kept.tolist(), strict=True):
        if not keep:
            continue
        if key[0] == "feature":
            _, layer, p, f = key
            nodes.append(Node("feature", p, layer, f, activation[n], tokens[p]))
        elif key[0] == "error":
            nodes.append(Node("error", key[2], key[1], token=tokens[key[2]]))
        elif key[0] == "embedding":
            nodes.append(Node("embedding", key[1], feature=ids[key[1]], token=tokens[key[1]]))
        else:
            nodes.append(Node("logit", len(ids) - 1, feature=key[1], activation=probability[key[1]],
                              token=model.tokenizer.decode([key[1]])))  # fmt: skip
    new_index = torch.where(kept, kept.cumsum(0) - 1, -1)
    sources, targets, weights = edges
    keep = kept[sources] & kept[targets]
    return Graph(prompt, tokens, list(ids), model.name, nodes, new_index[sources[keep]], new_index[targets[keep]],
                 weights[keep].float())  # fmt: skip
