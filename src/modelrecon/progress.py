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
    `status` is shown after the bar (e.g. a training run's loss). When stderr is not a terminal (a log file, CI), a
    bar would be cut to the log's width (`6553… tokens 0:00:…`), so plain lines are written instead (`log_lines`)."""
    if enabled and not _console.is_terminal:
        with log_lines(total, done, label, unit, rate_unit) as advance:
            yield advance
        return
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


@contextmanager
def log_lines(
    total: int, done: int = 0, label: str = "capturing", unit: str = "tokens", rate_unit: str = "tok",
    every_seconds: float = 10.0, write: Callable[[str], None] | None = None,
) -> Iterator[Callable[[int], None]]:  # fmt: skip
    """Progress for logs: one whole line at the start, then at most every `every_seconds` and at each tenth of the
    work, and at the end, e.g. `capturing: 2,048 / 65,536 tokens (3%), 512 tok/s, 0:02:04 left`."""
    write = write or (lambda line: _console.print(line, markup=False, highlight=False, soft_wrap=True))
    start = last = time.perf_counter()
    position, counted, tenth, status_text = done, 0, (10 * done) // max(total, 1), ""

    def line(final: bool = False) -> str:
        elapsed = time.perf_counter() - start
        rate = counted / max(elapsed, 1e-9)
        text = f"{label}: {position:,} / {total:,} {unit} ({100 * position / max(total, 1):.0f}%)"
        if counted:
            text += f", {rate:,.0f} {rate_unit}/s"
            text += f", took {_clock(elapsed)}" if final else f", {_clock((total - position) / rate)} left"
        return text + (f", {status_text}" if status_text else "")

    def advance(n: int, status: str = "") -> None:
        nonlocal position, counted, last, tenth, status_text
        position, counted, status_text = position + n, counted + n, status or status_text
        now, now_tenth = time.perf_counter(), (10 * position) // max(total, 1)
        if (now - last >= every_seconds or now_tenth > tenth) and position < total:
            write(line())
            last, tenth = now, now_tenth

    write(line())
    yield advance
    write(line(final=True))


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
