"""Training text for sparse dictionaries: an offline default corpus built from installed packages, a small shipped
sample, the user's own txt/JSONL/Parquet, and fixed-length token chunks over any of them."""

from modelrecon._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "build": ("build_corpus", "default_corpus"),
        "read": ("SAMPLE_CORPUS", "read_texts", "token_stream"),
        "sources": ("SOURCES", "Source"),
    },
)
