"""Counterfactual tests: interventions as data applied through the one hook mechanism, experiments over prompt pairs
with statistics and sanity checks, and batched patching sweeps.
"""

from modelrecon.counterfactual.experiment import ComponentResult, ExperimentResult, experiment
from modelrecon.counterfactual.interventions import (
    AddDirection,
    Generation,
    Intervention,
    MeanAblate,
    Patch,
    ProjectOut,
    Resample,
    Scale,
    SetValue,
    Zero,
    edits_for,
    from_json,
    generate_with,
    resolve_positions,
    run_with,
    source_acts,
    to_json,
)
from modelrecon.counterfactual.pairs import Pair, pair_from_dict, read_pairs, tokenize_pairs
from modelrecon.counterfactual.sweep import SWEEPS, Cell, SweepResult, path_patch, sweep

__all__ = [
    "SWEEPS",
    "Cell",
    "ComponentResult",
    "ExperimentResult",
    "Pair",
    "SweepResult",
    "experiment",
    "pair_from_dict",
    "path_patch",
    "read_pairs",
    "sweep",
    "tokenize_pairs",
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
]
