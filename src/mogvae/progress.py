"""Progress on long work, on a terminal and in a log file alike.

On a terminal: rich progress bars. Elsewhere (nohup, a cluster job, CI) a live
display prints nothing until the end, so plain lines are written instead: one
per task at most every `every` seconds, and one when a task finishes.
"""
from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn


class EpochProgress:
    """Epochs done per named task: `update(name, epochs_done)`."""

    def __init__(self, console: Console, totals: dict[str, int], done: dict[str, int] | None = None,
                 every: float = 10.0):
        self.console, self.totals, self.every = console, totals, every
        self.done = {name: (done or {}).get(name, 0) for name in totals}
        self.live = console.is_terminal
        self._last_line = {name: -float("inf") for name in totals}
        self._start = time.perf_counter()
        self._bars = None

    def __enter__(self):
        if self.live:
            self._bars = Progress(TextColumn("{task.description:>14}"), BarColumn(),
                                  TextColumn("{task.completed}/{task.total} epochs"), TimeElapsedColumn(),
                                  console=self.console)
            self._bars.__enter__()
            self._tasks = {n: self._bars.add_task(n, total=t, completed=self.done[n]) for n, t in self.totals.items()}
        return self

    def __exit__(self, *exc):
        if self._bars is not None:
            self._bars.__exit__(*exc)
        return False

    def update(self, name: str, epochs_done: int) -> None:
        self.done[name] = epochs_done
        if self.live:
            self._bars.update(self._tasks[name], completed=epochs_done)
            return
        now = time.perf_counter()
        if now - self._last_line[name] >= self.every or epochs_done >= self.totals[name]:
            self._last_line[name] = now
            self.console.print(f"{name}: epoch {epochs_done}/{self.totals[name]} "
                               f"({now - self._start:.0f} s)", soft_wrap=True, highlight=False)
