"""Component-level attribution graphs, for models without transcoders: token embeddings, attention heads, MLPs and
the target logit as nodes; EAP-IG edge scores (`attribution.edges`) as weights. Same `Graph` type and file format as
the feature graphs, so `trace` always gives a graph and the viewer shows both.

An edge's weight estimates how much the target metric moves when that edge alone is patched from the baseline run
to the clean run. Heads and MLPs span every position (their node has no position); each token embedding is its own
node. The baseline is a counterfactual prompt of the same length, or, without one, the "blank" prompt: every token
replaced by the end-of-text token (a leading special token is kept).

Under grouped-query attention one key/value input serves a group of heads; its edges are split equally among them
(the head-level list from `edge_attribution` keeps them apart).
"""

from __future__ import annotations

import time

import torch

from modelrecon.attribution.edges import edge_scores, receivers, senders
from modelrecon.circuits.check import CausalCheck, predicted_change
from modelrecon.circuits.graph import Graph, Node
from modelrecon.circuits.prune import node_influence
from modelrecon.counterfactual.interventions import Patch, run_with
from modelrecon.counterfactual.pairs import PairTokens
from modelrecon.errors import BadInputError
from modelrecon.hooks.run import run
from modelrecon.models.model import Model, single_token
from modelrecon.models.sites import site_name


def blank_baseline(model: Model, ids: list[int]) -> list[int]:
    """The prompt with every token replaced by the end-of-text token (a leading special token, e.g. BOS, is kept)."""
    tokenizer = model.tokenizer
    blank = next((t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None), 0)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return [ids[0] if ids[0] in special else blank] + [blank] * (len(ids) - 1)


def _metric(wrong: int | None):
    """The target's logit minus the mean logit (as feature graphs), or minus the wrong token's logit."""

    def metric(logits, item):
        return logits[item.answer] - (logits.mean() if wrong is None else logits[item.wrong])

    return metric


def component_graph(
    model: Model,
    prompt: str,
    *,
    target: str | None = None,
    wrong: str | None = None,
    counterfactual: str | None = None,
    steps: int = 16,
) -> Graph:
    """The component-level graph of `prompt` for one target logit (the most likely next token unless given)."""
    start = time.perf_counter()
    ids = model.encode(prompt)
    if not prompt.strip() or not ids:
        raise BadInputError("the prompt is empty; give some text to trace")
    logits = run(model, model.batch_from_ids([ids]), last_only=True).logits[0][-1].float()
    probs = torch.softmax(logits.double(), -1)
    answer = single_token(model, target, "target") if target is not None else int(logits.argmax())
    wrong_id = single_token(model, wrong, "target") if wrong is not None else None
    if counterfactual is None:
        baseline = blank_baseline(model, ids)
    else:
        baseline = model.encode(counterfactual)
        if len(baseline) != len(ids):
            raise BadInputError(
                f"the counterfactual is {len(baseline)} tokens and the prompt {len(ids)}; reword it to the same length"
            )
    pair = PairTokens(ids, baseline, answer, wrong_id if wrong_id is not None else answer)
    raw = edge_scores(model, [pair], "eap-ig", "denoise", _metric(wrong_id), steps)

    tokens = model.str_tokens(ids)
    nodes = [Node("embedding", p, feature=t, token=tokens[p]) for p, t in enumerate(ids)]
    for layer in range(model.n_layers):
        nodes += [*(Node("head", None, layer, h) for h in range(model.n_heads)), Node("mlp", None, layer)]
    target_token = model.str_tokens([answer])[0]
    nodes.append(Node("logit", len(ids) - 1, feature=answer, activation=float(probs[answer]), token=target_token))
    index = {n.id: i for i, n in enumerate(nodes)}
    logit = len(nodes) - 1

    def sender_node(s) -> int:
        return index[f"head:{s.layer}:{s.head}" if s.kind == "head" else f"mlp:{s.layer}"]

    group = model.n_heads // model.n_kv_heads
    weights: dict[tuple[int, int], float] = {}

    def add(source: int, receiver, value: float) -> None:
        if receiver.kind == "logits":
            shares = [(logit, value)]
        elif receiver.kind == "mlp":
            shares = [(index[f"mlp:{receiver.layer}"], value)]
        elif receiver.kind == "q":
            shares = [(index[f"head:{receiver.layer}:{receiver.head}"], value)]
        else:  # a key/value head: split among the query heads that read it
            heads = range(receiver.head * group, (receiver.head + 1) * group)
            shares = [(index[f"head:{receiver.layer}:{h}"], value / group) for h in heads]
        for t, v in shares:
            weights[source, t] = weights.get((source, t), 0.0) + v

    recv = receivers(model)
    for s, row in zip(senders(model), raw.scores.tolist(), strict=True):
        if s.kind == "embed":
            continue  # split by position below
        for r, value in zip(recv, row, strict=True):
            if value == value:  # not NaN: the sender writes before the receiver reads
                add(sender_node(s), r, value)
    for p, row in enumerate(raw.embedding.tolist()):
        for r, value in zip(recv, row, strict=True):
            add(p, r, value)
    edges = [(s, t, w) for (s, t), w in weights.items() if w != 0.0 and s != t]
    graph = Graph(
        prompt=prompt,
        tokens=tokens,
        token_ids=list(ids),
        model=model.name,
        nodes=nodes,
        sources=torch.tensor([e[0] for e in edges], dtype=torch.int64),
        targets=torch.tensor([e[1] for e in edges], dtype=torch.int64),
        weights=torch.tensor([e[2] for e in edges], dtype=torch.float32),
        metadata={
            "level": "component",
            "method": "eap-ig",
            "steps": steps,
            "n_layers": model.n_layers,
            "baseline": "counterfactual" if counterfactual is not None else "blank",
            "baseline_ids": baseline,
            "metric": f"logit({target_token!r}) - " + ("mean logit" if wrong_id is None else f"logit({wrong!r})"),
            "wrong": wrong_id,
            "metric_span": raw.span,
            "seconds": time.perf_counter() - start,
        },
    )
    return graph


def component_check(model: Model, graph: Graph, n_components: int = 5, draws: int = 5, seed: int = 0) -> CausalCheck:
    """Patch the graph's `n_components` most influential heads/MLPs to their values in the baseline run (everything
    downstream recomputed) and measure the traced metric's change; then as many random components."""
    influence = node_influence(graph)
    components = [i for i, node in enumerate(graph.nodes) if node.kind in ("head", "mlp")]
    top = sorted(components, key=lambda i: -float(influence[i]))[:n_components]
    logit = graph.logit_nodes()[0]
    answer, wrong = graph.nodes[logit].feature, graph.metadata.get("wrong")
    sites = [site_name("attn.heads", layer) for layer in range(model.n_layers)]
    sites += [site_name("mlp.out", layer) for layer in range(model.n_layers)]
    baseline = run(model, model.batch_from_ids([graph.metadata["baseline_ids"]]), record=sites).acts

    def metric(logits: torch.Tensor) -> float:
        return float(logits[answer] - (logits.mean() if wrong is None else logits[wrong]))

    def patched(chosen: list[int]) -> float:
        interventions = []
        for i in chosen:
            node = graph.nodes[i]
            if node.kind == "head":
                interventions.append(Patch(site_name("attn.heads", node.layer), heads=[node.feature]))
            else:
                interventions.append(Patch(site_name("mlp.out", node.layer)))
        out = run_with(model, graph.prompt, interventions, sources={"counterfactual": baseline}, last_only=True)
        return metric(out.logits[0][-1].float())

    clean = patched([])
    generator = torch.Generator().manual_seed(seed)
    picks = [[components[j] for j in torch.randperm(len(components), generator=generator)[: len(top)].tolist()]
             for _ in range(draws)]  # fmt: skip
    return CausalCheck(graph.nodes[logit].token, "components", len(top), graph.metadata["metric"],
                       patched(top) - clean, [patched(p) - clean for p in picks],
                       predicted_change(graph, logit, top),
                       [predicted_change(graph, logit, p) for p in picks])  # fmt: skip
