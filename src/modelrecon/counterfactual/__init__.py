"""Counterfactual tests: interventions as data, applied through the one hook mechanism.

Experiments over prompt pairs, metrics with confidence intervals and patching sweeps build on these (issue 4).
"""

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

__all__ = [
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
