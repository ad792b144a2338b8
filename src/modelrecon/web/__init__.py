"""The offline viewer: a local server over a folder of results (`modelrecon serve`), and the same front-end embedded
in notebooks and standalone pages (`show`)."""

from modelrecon._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "notebook": ("show", "View"),
        "app": ("create_app",),
    },
)
