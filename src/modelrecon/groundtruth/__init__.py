"""White-box transformers with known circuits that score every attribution and discovery method."""

from modelrecon._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "runner": ("run_suite",),
        "tasks": ("TASKS",),
    },
)
