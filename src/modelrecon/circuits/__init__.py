"""Circuit tracing: the replacement model, attribution graphs, pruning, feature interventions, graph files."""
