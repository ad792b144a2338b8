"""The attribution graph: nodes (token embeddings, transcoder features, error terms, logits) and the direct effects
between them, kept sparse (edge lists), never a dense nodes x nodes matrix. A component-level graph (no transcoders)
has attention heads and MLPs as nodes instead of features and errors, and EAP-IG edge scores as weights
(`circuits.components`).

An edge `source -> target` with weight w means: in the replacement model (attention patterns and norm scales frozen,
every MLP replaced by its transcoder plus a frozen error term), the source's contribution moves the target's input
by w directly, i.e. with every other node held fixed. A feature target's input is its encoder pre-activation; a
logit target's is its logit minus the mean logit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from modelrecon.display import RichDisplay


@dataclass(frozen=True)
class NodeKind:
    """Everything that depends on a node's kind, in one place: the fields it uses and how it is named. The formats
    are filled from the Node's fields (`logit_layer` = n_layers + 1 in graph files)."""

    feature_type: str  # circuit-tracer's `feature_type`
    layered: bool  # has a layer (the transcoder's, or the head's / MLP's)
    indexed: bool  # has an index in `feature`: the latent, the token id, or the head
    positioned: bool  # has a token position (heads and MLPs span all positions)
    id: str  # Node.id, collision-free across kinds
    label: str  # Node.label
    json_id: str  # the graph file's circuit-tracer style `node_id` (graph_file's docstring)
    js_id: str  # the graph file's `jsNodeId`
    json_layer: str  # the graph file's `layer`


KINDS = {
    "embedding": NodeKind("embedding", False, True, True, "emb:{position}:{feature}", "{token!r}",
                          "E_{feature}_{position}", "E_{feature}-{position}", "E"),
    "feature": NodeKind("cross layer transcoder", True, True, True, "feat:{layer}:{feature}:{position}",
                        "L{layer}/F{feature}@{token!r}", "{layer}_{feature}_{position}", "{layer}_{feature}-0",
                        "{layer}"),
    "error": NodeKind("mlp reconstruction error", True, False, True, "err:{layer}:{position}",
                      "error L{layer}@{token!r}", "{layer}_-1_{position}", "{layer}_-1-{position}", "{layer}"),
    "logit": NodeKind("logit", False, True, True, "logit:{position}:{feature}", "{token!r}",
                      "{logit_layer}_{feature}_{position}", "L_{feature}-{position}", "{logit_layer}"),
    "head": NodeKind("attention head", True, True, False, "head:{layer}:{feature}", "L{layer}.H{feature}",
                     "{layer}_H{feature}", "{layer}_H{feature}", "{layer}"),
    "mlp": NodeKind("mlp", True, False, False, "mlp:{layer}", "L{layer}.MLP", "{layer}_M", "{layer}_M", "{layer}"),
}  # fmt: skip


@dataclass(frozen=True)
class Node:
    kind: str  # one of KINDS
    position: int | None  # the token position (logits: the last); None for heads and MLPs, which span all positions
    layer: int | None = None  # features and errors: the transcoder's layer; heads and MLPs: theirs
    feature: int | None = None  # features: the latent index; embeddings and logits: the token id; heads: the head
    activation: float | None = None  # features: the activation; logits: the probability
    token: str | None = None  # embeddings: the token at `position`; logits: the predicted token

    def name(self, form: str, **extra) -> str:
        """One of the kind's names (a NodeKind format field: id, label, json_id, ...) for this node."""
        return getattr(KINDS[self.kind], form).format(**vars(self), **extra)

    @property
    def id(self) -> str:
        """Collision-free across kinds: `emb:P:TOKEN_ID`, `feat:L:F:P`, `err:L:P`, `logit:P:TOKEN_ID`, `head:L:H`,
        `mlp:L`."""
        return self.name("id")

    @property
    def label(self) -> str:
        """A short human label: `L3/F12@' cat'`, `error L3@' cat'`, `L3.H2`, `L3.MLP`, or the token."""
        return self.name("label")


@dataclass
class Graph(RichDisplay):
    prompt: str
    tokens: list[str]  # the prompt's tokens as text
    token_ids: list[int]
    model: str
    nodes: list[Node]
    sources: torch.Tensor  # [edges] int64 node indices
    targets: torch.Tensor  # [edges] int64 node indices
    weights: torch.Tensor  # [edges] float32 direct effects
    metadata: dict = field(default_factory=dict)  # transcoders, targets, thresholds, timings, scores ...

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    def index(self, node_id: str) -> int:
        return {n.id: i for i, n in enumerate(self.nodes)}[node_id]

    def logit_nodes(self) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if n.kind == "logit"]

    def adjacency(self) -> torch.Tensor:
        """`A[target, source]` = weight, as a sparse COO tensor (the layout circuit-tracer uses, kept sparse)."""
        index = torch.stack([self.targets, self.sources])
        return torch.sparse_coo_tensor(index, self.weights, (self.n_nodes, self.n_nodes)).coalesce()

    def edge(self, source_id: str, target_id: str) -> float:
        """The weight of one edge (0 where there is none)."""
        s, t = self.index(source_id), self.index(target_id)
        hits = (self.sources == s) & (self.targets == t)
        return float(self.weights[hits].sum())

    def check_finite(self) -> None:
        """A NonFiniteError naming the first node whose value or incoming edge is NaN or infinite: such a graph
        (from an overflowing float16 run, or broken weights) would otherwise be written with its values as null."""
        from modelrecon.errors import NonFiniteError

        bad = (~torch.isfinite(self.weights)).nonzero()
        culprit = None
        if len(bad):
            edge = int(bad[0])
            culprit = (f"the edge {self.nodes[int(self.sources[edge])].label} -> "
                       f"{self.nodes[int(self.targets[edge])].label}")  # fmt: skip
        else:
            for node in self.nodes:
                if node.activation is not None and not math.isfinite(node.activation):
                    culprit = f"the {node.kind} node {node.label}"
                    break
        if culprit is not None:
            raise NonFiniteError(
                f"{culprit} of the graph of {self.prompt[:40]!r} is NaN or infinite: the "
                "model's pass overflowed; run it in float32 (--dtype float32) or check its weights"
            )

    def inputs_of(self, node: int, top: int = 10) -> list[tuple[int, float]]:
        """The strongest direct inputs of a node: (source index, weight), by |weight|."""
        mask = self.targets == node
        order = self.weights[mask].abs().argsort(descending=True)[:top]
        return list(zip(self.sources[mask][order].tolist(), self.weights[mask][order].tolist(), strict=True))
