"""Loading models, naming their internals (sites) and batching prompts."""

from modelrecon._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "adapters": ("ADAPTERS", "Adapter"),
        "embedded": ("DEFAULT_MODEL", "EMBEDDED"),
        "loading": ("cache_root", "load"),
        "model": ("Batch", "Model", "SiteInfo"),
        "sites": ("LAYER_SITE_KINDS", "parse_site"),
    },
)
