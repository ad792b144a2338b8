"""Activation cubes: capture sites into a Zarr store, read them back without the model."""

from modelrecon._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "capture": ("capture",),
        "reader": ("Cube", "Example", "open_cube"),
    },
)
