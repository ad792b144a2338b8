"""Loading models, naming their internals (sites) and batching prompts."""

from modelrecon.models.adapters import ADAPTERS, Adapter
from modelrecon.models.embedded import DEFAULT_MODEL, EMBEDDED
from modelrecon.models.loading import cache_root, load
from modelrecon.models.model import Batch, Model, SiteInfo
from modelrecon.models.sites import LAYER_SITE_KINDS, parse_site

__all__ = [
    "ADAPTERS",
    "Adapter",
    "Batch",
    "DEFAULT_MODEL",
    "EMBEDDED",
    "LAYER_SITE_KINDS",
    "Model",
    "SiteInfo",
    "cache_root",
    "load",
    "parse_site",
]
