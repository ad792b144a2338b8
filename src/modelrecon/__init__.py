"""modelrecon: record, share, test causally and trace what happens inside language models."""

from modelrecon.cube import Cube, capture, open_cube
from modelrecon.errors import ModelreconError
from modelrecon.hooks import HookContext, RunResult, Trace, hooked, run
from modelrecon.models import DEFAULT_MODEL, EMBEDDED, Batch, Model, load

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED",
    "Batch",
    "Cube",
    "HookContext",
    "Model",
    "ModelreconError",
    "RunResult",
    "Trace",
    "capture",
    "hooked",
    "load",
    "open_cube",
    "run",
]
