"""Errors a user can cause. Each message says what went wrong and what to do about it.

The CLI prints these on one line and exits with code 2; anything else is a bug and keeps its traceback.
"""


def reason(exc: BaseException, limit: int = 200) -> str:
    """The first line of an underlying library's error, for a one-line message (its type when it says nothing)."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


class ModelreconError(Exception):
    """Base class for every user-facing modelrecon error."""


class UnknownModelError(ModelreconError):
    """The name is neither an embedded model, a local path nor a reachable hub id."""


class ModelNotInstalledError(ModelreconError):
    """An embedded model whose weight package is not installed."""


class BadModelFileError(ModelreconError):
    """A model file or folder exists but cannot be read (corrupt GGUF, missing config, ...)."""


class OfflineError(ModelreconError):
    """A hub download was needed but the network is not reachable."""


class UnsupportedArchitectureError(ModelreconError):
    """No adapter names this model's modules."""


class UnknownSiteError(ModelreconError):
    """A site name or pattern that matches nothing on this model."""


class BadInputError(ModelreconError):
    """Bad arguments: empty prompt, wrong shape returned by an edit, ..."""


class CubeError(ModelreconError):
    """An activation cube that is missing, corrupt, unfinished, of an unknown schema, or lacks what was asked."""


class NonFiniteError(ModelreconError):
    """NaN or infinite values where numbers must be finite: a model's weights, captured activations, a result."""
