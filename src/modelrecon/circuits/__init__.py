"""Circuit tracing: the replacement model, attribution graphs, pruning, feature interventions, graph files.
`trace` (one prompt: graph, pruned graph and causal check) and `trace_batch` (many prompts, a graph file each and a
summary) are the entry points. Names are imported on first use, so importing this package stays cheap."""

from modelrecon._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "tracing": ("TracedGraph", "trace"),
        "batch": ("BatchPrompt", "TraceOptions", "TraceSource", "read_batch_prompts", "trace_batch"),
        "attribute": ("attribute",),
        "replacement": ("ReplacementModel",),
        "graph": ("Graph", "Node"),
        "graph_file": ("load_graph", "save_graph"),
        "prune": ("prune_graph",),
        "check": ("CausalCheck", "causal_check"),
        "components": ("component_graph",),
        "evaluate": ("evaluate_graphs",),
    },
)
