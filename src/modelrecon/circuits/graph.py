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

from dataclasses import dataclass, field

import torch

NODE_KINDS = ("embedding", "feature", "error", "logit", "head", "mlp")


@dataclass(frozen=True)
class Node:
    kind: str  # one of NODE_KINDS
    position: int | None  # the token position (logits: the last); None for heads and MLPs, which span all positions
    layer: int | None = None  # features and errors: the transcoder's layer; heads and MLPs: theirs
    feature: int | None = None  # features: the latent index; embeddings and logits: the token id; heads: the head
    activation: float | None = None  # features: the activation; logits: the probability
    token: str | None = None  # embeddings: the token at `position`; logits: the predicted token

    @property
    def id(self) -> str:
        """Collision-free across kinds: `emb:P:TOKEN_ID`, `feat:L:F:P`, `err:L:P`, `logit:P:TOKEN_ID`, `head:L:H`,
        `mlp:L`."""
        if self.kind == "embedding":
            return f"emb:{self.position}:{self.feature}"
        if self.kind == "feature":
            return f"feat:{self.layer}:{self.feature}:{self.position}"
        if self.kind == "error":
            return f"err:{self.layer}:{self.position}"
        if self.kind == "head":
            return f"head:{self.layer}:{self.feature}"
        if self.kind == "mlp":
            return f"mlp:{self.layer}"
        return f"logit:{self.position}:{self.feature}"

    @property
    def label(self) -> str:
        """A short human label: `L3/F12@' cat'`, `error L3@' cat'`, `L3.H2`, `L3.MLP`, or the token."""
        if self.kind == "feature":
            return f"L{self.layer}/F{self.feature}@{self.token!r}"
        if self.kind == "error":
            return f"error L{self.layer}@{self.token!r}"
        if self.kind == "head":
            return f"L{self.layer}.H{self.feature}"
        if self.kind == "mlp":
            return f"L{self.layer}.MLP"
        return repr(self.token)


@dataclass
class Graph:
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

    def inputs_of(self, node: int, top: int = 10) -> list[tuple[int, float]]:
        """The strongest direct inputs of a node: (source index, weight), by |weight|."""
        mask = self.targets == node
        order = self.weights[mask].abs().argsort(descending=True)[:top]
        return list(zip(self.sources[mask][order].tolist(), self.weights[mask][order].tolist(), strict=True))
