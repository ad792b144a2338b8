"""Progress display for long work, on stderr so that stdout stays clean for results."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console

_console = Console(stderr=True)


@contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner with a message while a step of unknown length runs."""
    with _console.status(message):
        yield
