"""Correlational attributions, each with its causal check: logit lens, direct logit attribution, gradient x
activation, integrated gradients, attribution patching (nodes and edges), probes, and the comparison of an estimate
with exact patching."""

from modelrecon._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "lens": ("LensResult", "logit_lens"),
        "dla": ("DLAResult", "direct_logit_attribution"),
        "gradients": ("GradientAttribution", "grad_x_act", "integrated_gradients"),
        "patching": ("attribution_patching",),
        "edges": ("EdgeResult", "edge_attribution"),
        "probes": ("ProbeResult", "train_probes"),
        "compare": ("Comparison", "compare"),
    },
)
