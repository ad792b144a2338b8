"""Reading and writing model internals at sites, through one hook mechanism."""

from modelrecon.hooks.run import RunResult, run
from modelrecon.hooks.trace import EditFn, HookContext, Trace, hooked

__all__ = ["EditFn", "HookContext", "RunResult", "Trace", "hooked", "run"]
