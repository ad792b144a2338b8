"""Progress display for long work, on stderr so that stdout stays clean for results."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
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


@contextmanager
def token_progress(
    total: int,
    done: int = 0,
    enabled: bool = True,
    label: str = "capturing",
    unit: str = "tokens",
    rate_unit: str = "tok",
) -> Iterator[Callable[[int], None]]:
    """A progress bar over units of work (tokens by default) with rate and ETA; yields `advance(n, status="")`, where
    `status` is shown after the bar (e.g. a training run's loss)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit + "  {task.fields[rate]}"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, console=_console, disable=not enabled, transient=False) as bar:
        task = bar.add_task(label, total=total, completed=done, rate="", status="")
        start, counted = time.perf_counter(), 0

        def advance(n: int, status: str = "") -> None:
            nonlocal counted
            counted += n
            rate = counted / max(time.perf_counter() - start, 1e-9)
            bar.update(task, advance=n, rate=f"{rate:,.0f} {rate_unit}/s", status=status)

        yield advance
