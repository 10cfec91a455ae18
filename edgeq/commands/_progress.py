"""Progress for every command: bars on a terminal, a plain line every few seconds in a log, or nothing.

``edgeq quantize ... | tee log`` (CI, nohup, a pipe) has no terminal: rich's live bars would be
hidden there, and ~1 minute of rollouts would print nothing. :func:`progress_reporter` returns a
context manager yielding the stages' ``progress(stage, total) -> advance(n)`` factory (the shape
:mod:`edgeq.pipeline` and :mod:`edgeq.validate.validator` take) for the three cases.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import IO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

ProgressFactory = Callable[[str, int | None], Callable[[int], None]]

#: Seconds between two plain progress lines of one stage.
PLAIN_INTERVAL_S = 5.0


class PlainProgress:
    """``stage: done/total (pct%), elapsed`` lines, at most one per ``interval`` seconds per stage.

    A stage of known length prints its last line when it reaches its total (and, if it takes
    longer than ``interval``, lines in between); a stage of unknown length one line when it starts.
    """

    def __init__(self, stream: IO[str], interval: float = PLAIN_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream, self.interval, self.clock = stream, interval, clock

    def _line(self, stage: str, done: int, total: int | None, started: float) -> None:
        elapsed = self.clock() - started
        if total:
            text = f"{stage}: {done:,}/{total:,} ({100 * min(done, total) / total:.0f}%), {elapsed:.0f}s"
        else:
            text = f"{stage}: {done:,} done, {elapsed:.0f}s" if done else f"{stage}..."
        print(f"[edgeq] {text}", file=self.stream, flush=True)

    def __call__(self, stage: str, total: int | None) -> Callable[[int], None]:
        started = self.clock()
        state = {"done": 0, "last": started, "finished": False}
        if not total:
            self._line(stage, 0, total, started)

        def advance(n: int) -> None:
            state["done"] += n
            now = self.clock()
            finished = bool(total) and state["done"] >= (total or 0)
            if finished and not state["finished"]:
                state["finished"] = True
                self._line(stage, int(state["done"]), total, started)
                state["last"] = now
            elif not finished and now - state["last"] >= self.interval:
                self._line(stage, int(state["done"]), total, started)
                state["last"] = now

        return advance


def _silent(stage: str, total: int | None) -> Callable[[int], None]:
    return lambda n: None


@contextlib.contextmanager
def progress_reporter(console: Console, *, quiet: bool = False) -> Iterator[ProgressFactory]:
    """Bars when ``console`` is a terminal, :class:`PlainProgress` lines when not, nothing when ``quiet``."""
    if quiet:
        yield _silent
        return
    if not console.is_terminal:
        yield PlainProgress(console.file)
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as prog:
        def factory(stage: str, total: int | None) -> Callable[[int], None]:
            task = prog.add_task(stage, total=total)
            return lambda n: prog.advance(task, n)

        yield factory
