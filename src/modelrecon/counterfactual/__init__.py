"""Counterfactual tests: interventions as data, applied through the one hook mechanism.

Experiments over prompt pairs, metrics with confidence intervals and patching sweeps build on these (issue 4).
"""

from modelrecon.counterfactual.interventions import (
    AddDirection,
    Intervention,
    MeanAblate,
    Patch,
    ProjectOut,
    Scale,
    SetValue,
    Zero,
    edits_for,
    from_json,
    resolve_positions,
    run_with,
    to_json,
)

__all__ = [
    "AddDirection",
    "Intervention",
    "MeanAblate",
    "Patch",
    "ProjectOut",
    "Scale",
    "SetValue",
    "Zero",
    "edits_for",
    "from_json",
    "resolve_positions",
    "run_with",
    "to_json",
]
