"""modelrecon: record, share, test causally and trace what happens inside language models.

The main entry point of every area is importable from here; each area is also a documented sub-package
(`modelrecon.circuits`, `modelrecon.dictionaries`, ...). Everything is imported on first use: `import modelrecon` does
not import torch (docs/python-api.md lists the whole public API).
"""

from modelrecon._lazy import lazy_exports

__version__ = "0.1.0"

AREAS = ("models", "hooks", "cube", "counterfactual", "attribution", "corpus", "dictionaries", "circuits", "explain",
         "groundtruth", "web", "scale")  # fmt: skip

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "modelrecon.errors": ("ModelreconError",),
        # models: load one (embedded name, local folder, GGUF, hub id) and name its sites
        "modelrecon.models": ("DEFAULT_MODEL", "EMBEDDED", "Batch", "Model", "load"),
        # hooks: read and edit sites on the model's own forward pass
        "modelrecon.hooks": ("HookContext", "RunResult", "Trace", "hooked", "run"),
        # cube: record activations to share, read them without the model
        "modelrecon.cube": ("Cube", "capture", "open_cube"),
        # counterfactual: interventions as data, experiments over pairs, patching sweeps
        "modelrecon.counterfactual": (
            "AddDirection",
            "Intervention",
            "MeanAblate",
            "Pair",
            "Patch",
            "ProjectOut",
            "Resample",
            "Scale",
            "SetValue",
            "Zero",
            "experiment",
            "generate_with",
            "path_patch",
            "read_pairs",
            "run_with",
            "sweep",
        ),
        # attribution: correlational estimates, each next to its causal check
        "modelrecon.attribution": (
            "attribution_patching",
            "compare",
            "direct_logit_attribution",
            "edge_attribution",
            "grad_x_act",
            "integrated_gradients",
            "logit_lens",
            "train_probes",
        ),
        # corpus and dictionaries: training text; SAEs and transcoders
        "modelrecon.corpus": ("read_texts",),
        "modelrecon.dictionaries": ("Dictionary", "load_dictionaries", "save_dictionaries", "train"),
        # circuits: attribution graphs through transcoders, pruned and checked by intervention
        "modelrecon.circuits": (
            "Graph",
            "ReplacementModel",
            "TracedGraph",
            "load_graph",
            "save_graph",
            "trace",
            "trace_batch",
        ),
        # explain: feature dashboards and explanations; groundtruth: methods scored on known circuits
        "modelrecon.explain": ("explain_features", "feature_dashboards"),
        "modelrecon.groundtruth": ("run_suite",),
        # web: the viewer inline in a notebook or as a standalone page
        "modelrecon.web": ("show",),
    },
)
_area_getattr = __getattr__


def __getattr__(name: str):  # noqa: F811 - the areas themselves are attributes too, imported on first use
    if name in AREAS:
        from importlib import import_module

        return import_module(f"modelrecon.{name}")
    return _area_getattr(name)
