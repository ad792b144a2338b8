"""Public names imported on first use (PEP 562), so `import modelrecon` and the CLI's start stay cheap: torch,
transformers and zarr load only when a name that needs them is touched."""

from __future__ import annotations

import sys
import types
from importlib import import_module


class _LazyPackage(types.ModuleType):
    """A package whose exports resolve on first use. The import system binds a submodule on its package once loaded;
    where the package exports a function of the submodule's name (`cube.capture`, `dictionaries.train`), the function
    keeps the name, exactly as an eager `from .capture import capture` in the package would leave it."""

    _lazy_owner: dict[str, str] = {}

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and value.__name__ == f"{self.__name__}.{name}":
            if self._lazy_owner.get(name) == name and hasattr(value, name):
                value = getattr(value, name)
        super().__setattr__(name, value)


def lazy_exports(package: str, where: dict[str, tuple[str, ...]]):
    """`__getattr__`, `__dir__` and `__all__` for `package`, whose public names live in its modules: `where` maps a
    module (relative to `package`, e.g. "tracing", or absolute, e.g. "modelrecon.cube") to its names.
    A name resolves once; the value is then cached in the package like a normal import."""
    owner = {name: module for module, names in where.items() for name in names}
    module_object = sys.modules[package]
    module_object.__class__ = _LazyPackage
    module_object._lazy_owner = owner

    def __getattr__(name: str):
        module = owner.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        full = module if module.startswith("modelrecon.") else f"{package}.{module}"
        value = getattr(import_module(full), name)
        setattr(module_object, name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(module_object)) | set(owner))

    return __getattr__, __dir__, sorted(owner)
