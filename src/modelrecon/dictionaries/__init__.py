"""Sparse dictionaries (SAEs, transcoders, skip and cross-layer transcoders): train, evaluate, save and load."""

from modelrecon.dictionaries.model import ACTIVATIONS, KINDS, Dictionary, DictionaryConfig

__all__ = ["ACTIVATIONS", "KINDS", "Dictionary", "DictionaryConfig"]
