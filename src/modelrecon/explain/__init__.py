"""Explaining features: top examples, dashboards, automatic explanations and their scores."""

from modelrecon._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "examples": ("FeatureExamples", "feature_activations"),
        "dashboards": ("feature_dashboards", "save_dashboards"),
        "explainers": ("explain_features",),
        "scoring": ("score_explanation",),
    },
)
