"""`trace`: one prompt's attribution graph, pruned, with its causal check: what `modelrecon trace` prints and writes.

Feature graphs (given transcoders or a ReplacementModel built on them) compute the replacement model's clean run
once: the attribution pass and the causal check both read it. Without transcoders the graph is traced over heads and
MLPs (EAP-IG, `circuits.components`) and checked by patching components.
"""

from __future__ import annotations

from dataclasses import dataclass

from modelrecon.circuits.check import CausalCheck
from modelrecon.circuits.graph import Graph
from modelrecon.circuits.replacement import ReplacementModel
from modelrecon.display import RichDisplay
from modelrecon.errors import BadInputError
from modelrecon.models.model import Model


@dataclass
class TracedGraph(RichDisplay):
    """A traced prompt: `graph` (every node the attribution kept), `pruned` (what `save_graph` writes; its metadata
    carries the causal check as `causal_check`), the `check` itself, and the replacement model the graph was traced
    through (None for a component graph), for dashboards and interventions."""

    graph: Graph
    pruned: Graph
    check: CausalCheck
    rm: ReplacementModel | None = None

    @property
    def level(self) -> str:
        return "components" if self.rm is None else "features"


def trace(
    model: Model,
    prompt: str,
    transcoders: ReplacementModel | list | None = None,
    *,
    target: str | None = None,
    wrong: str | None = None,
    counterfactual: str | None = None,
    max_feature_nodes: int = 1000,
    batch_size: int = 32,
    check_features: int = 10,
    progress: bool = True,
) -> TracedGraph:
    """The attribution graph of `prompt`, pruned, checked by intervention.

    `transcoders`: the dictionaries (one per layer, or a cross-layer transcoder), or a ReplacementModel built on them
    (reused across prompts), for a feature graph (`attribute`, at most `max_feature_nodes` feature rows, `batch_size`
    rows per pass); None for a component graph (`component_graph`, against the blank prompt or `counterfactual`, a
    prompt of the same length). `target`: one target token (default: the top logits to 95%, or for a component graph
    the top one); with `wrong`, the target is logit(target) - logit(wrong). The causal check ablates the graph's
    `check_features` most influential features (components: at most one per layer) against as many random ones."""
    if transcoders is None:
        from modelrecon.circuits.components import component_check, component_graph

        graph = component_graph(model, prompt, target=target, wrong=wrong, counterfactual=counterfactual)
        check = component_check(model, graph, n_components=min(check_features, model.n_layers))
        rm = None
    else:
        from modelrecon.circuits.attribute import attribute, prompt_ids
        from modelrecon.circuits.check import causal_check

        if counterfactual is not None:
            raise BadInputError("a counterfactual prompt is for component graphs (no transcoders); feature graphs are "
                                "traced on the prompt alone")  # fmt: skip
        rm = transcoders if isinstance(transcoders, ReplacementModel) else ReplacementModel(model, transcoders)
        clean = rm.clean(prompt_ids(model, prompt))
        graph = attribute(model, prompt, rm, target=target, wrong=wrong, max_feature_nodes=max_feature_nodes,
                          batch_size=batch_size, progress=progress, clean=clean)  # fmt: skip
        check = causal_check(rm, clean, graph, n_features=check_features)
    from modelrecon.circuits.prune import prune_graph

    pruned = prune_graph(graph)
    pruned.metadata["causal_check"] = check.to_dict()
    return TracedGraph(graph, pruned, check, rm)
