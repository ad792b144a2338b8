"""Sparse dictionaries (SAEs, transcoders, skip and cross-layer transcoders): train, evaluate, save and load."""

from modelrecon._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "evaluate": ("EvalReport", "evaluate"),
        "formats": (
            "export_circuit_tracer",
            "export_saelens",
            "import_circuit_tracer",
            "import_saelens",
            "load_dictionaries",
            "load_dictionary",
            "save_dictionaries",
            "save_dictionary",
        ),
        "model": ("ACTIVATIONS", "KINDS", "Dictionary", "DictionaryConfig"),
        "options": ("TrainOptions",),
        "train": ("train", "train_on_model"),
    },
)
