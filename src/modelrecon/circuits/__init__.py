"""Circuit tracing: the replacement model, attribution graphs, pruning, feature interventions, graph files.

`trace` (one prompt: graph, pruned graph and causal check) and `trace_batch` (many prompts, a graph file each and a
summary) are imported on first use, so that importing this package (the CLI does, at start) stays cheap."""

__all__ = ["BatchPrompt", "TraceOptions", "TraceSource", "TracedGraph", "read_batch_prompts", "trace", "trace_batch"]

_WHERE = {"trace": "tracing", "TracedGraph": "tracing", "BatchPrompt": "batch", "TraceOptions": "batch",
          "TraceSource": "batch", "read_batch_prompts": "batch", "trace_batch": "batch"}  # fmt: skip


def __getattr__(name: str):
    if name in _WHERE:
        from importlib import import_module

        return getattr(import_module(f"modelrecon.circuits.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'modelrecon.circuits' has no attribute {name!r}")
