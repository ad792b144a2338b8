"""Sparse dictionaries (SAEs, transcoders, skip and cross-layer transcoders): train, evaluate, save and load."""

from modelrecon.dictionaries.evaluate import EvalReport, evaluate
from modelrecon.dictionaries.formats import (
    export_circuit_tracer,
    export_saelens,
    import_circuit_tracer,
    import_saelens,
    load_dictionaries,
    load_dictionary,
    save_dictionaries,
    save_dictionary,
)
from modelrecon.dictionaries.model import ACTIVATIONS, KINDS, Dictionary, DictionaryConfig
from modelrecon.dictionaries.train import TrainOptions, train, train_on_model

__all__ = [
    "ACTIVATIONS",
    "KINDS",
    "Dictionary",
    "DictionaryConfig",
    "EvalReport",
    "TrainOptions",
    "evaluate",
    "export_circuit_tracer",
    "export_saelens",
    "import_circuit_tracer",
    "import_saelens",
    "load_dictionaries",
    "load_dictionary",
    "save_dictionaries",
    "save_dictionary",
    "train",
    "train_on_model",
]
