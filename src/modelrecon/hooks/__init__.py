"""The one hook mechanism: read (record) and write (edit) sites on the model's own forward pass."""

from modelrecon._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "run": ("RunResult", "run"),
        "trace": ("EditFn", "HookContext", "Trace", "hooked"),
    },
)
