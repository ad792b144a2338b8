"""Counterfactual tests: interventions as data applied through the one hook mechanism, experiments over prompt pairs
with statistics and sanity checks, and batched patching sweeps.
"""

from modelrecon._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "experiment": ("ComponentResult", "ExperimentResult", "experiment"),
        "interventions": (
            "AddDirection",
            "Generation",
            "Intervention",
            "MeanAblate",
            "Patch",
            "ProjectOut",
            "Resample",
            "Scale",
            "SetValue",
            "Zero",
            "edits_for",
            "from_json",
            "generate_with",
            "resolve_positions",
            "run_with",
            "source_acts",
            "to_json",
        ),
        "pairs": ("Pair", "pair_from_dict", "read_pairs", "tokenize_pairs"),
        "sweep": ("SWEEPS", "Cell", "SweepResult", "path_patch", "sweep"),
    },
)
