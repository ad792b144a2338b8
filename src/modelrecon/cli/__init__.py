"""The `modelrecon` command: one subcommand per user story, each a thin layer over one library function.

Each module registers its commands on the one `app` (cli/common.py).
User errors (`ModelreconError`) print one line and exit with code 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import os
import sys
from importlib import import_module

from modelrecon.cli.common import app
from modelrecon.errors import ModelreconError

__all__ = ["app", "main"]

# The commands' modules, in the order `--help` lists them (each registers its commands on `app` when imported).
COMMAND_MODULES = ("models", "cube", "counterfactual", "dictionaries", "circuits", "explain", "serve", "corpus",
                   "groundtruth")  # fmt: skip
for _module in COMMAND_MODULES:
    import_module(f"modelrecon.cli.{_module}")


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import typer
    from rich.console import Console

    from modelrecon.memory import keep_freed_memory

    keep_freed_memory()
    stderr = Console(stderr=True, soft_wrap=True)
    try:
        # Not standalone: click's own errors (a bad option value, a missing argument) come here, to be printed on one
        # line like ours instead of as a usage box.
        code = app(args=argv, standalone_mode=False)
    except ModelreconError as exc:
        stderr.print(f"error: {_one_line(str(exc))}", markup=False, highlight=False)
        sys.exit(2)
    except typer.TyperException as exc:  # click's errors (typer vendors click; this is their public base class)
        if type(exc).__name__ == "NoArgsIsHelpError":
            app(args=argv)  # a bare command group: its help, printed as before
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        where = getattr(exc, "ctx", None)
        hint = f" (see: {where.command_path} --help)" if where is not None else ""
        stderr.print(f"error: {' '.join(message.split())}{hint}", markup=False, highlight=False)
        sys.exit(getattr(exc, "exit_code", 2))
    except (KeyboardInterrupt, typer.Abort):
        stderr.print("interrupted", markup=False)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def _one_line(message: str) -> str:
    """An error on one line even when it quotes a value holding line breaks (a prompt, a path, an option)."""
    return message.strip().replace("\r", "\\r").replace("\n", "\\n")
