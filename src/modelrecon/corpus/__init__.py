"""Training text for sparse dictionaries: an offline default corpus built from installed packages, a small shipped
sample, the user's own txt/JSONL/Parquet, and fixed-length token chunks over any of them."""

from modelrecon.corpus.build import build_corpus, default_corpus
from modelrecon.corpus.read import SAMPLE_CORPUS, read_texts, token_stream
from modelrecon.corpus.sources import SOURCES, Source

__all__ = ["SAMPLE_CORPUS", "SOURCES", "Source", "build_corpus", "default_corpus", "read_texts", "token_stream"]
