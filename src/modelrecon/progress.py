"""Progress display for long work, on stderr so that stdout stays clean for results."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console

_console = Console(stderr=True)


@contextmanager
def step(message: str) -> Iterator[None]:
    """Announce a long step and report its duration. Inner progress bars (transformers' own) show while it runs,
    so this draws no spinner that would fight with them."""
    _console.print(f"{message} ...", markup=False, highlight=False)
    start = time.perf_counter()
    yield
    _console.print(f"done in {time.perf_counter() - start:.1f} s", markup=False, highlight=False)
