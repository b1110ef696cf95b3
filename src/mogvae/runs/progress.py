"""Progress on long work, on a terminal and in a log file alike.

On a terminal: rich progress bars. Elsewhere (nohup, a cluster job, CI) a live
display prints nothing until the end, so plain lines are written instead: one
per task at most every `every` seconds, and one when a task finishes.

A run that has trained its last epoch is evaluating until it finishes: both displays say so,
and print the lines evaluation reports through the same callback as text (each phase with its
counts, the gap search's progress with an ETA), so that minutes of evaluation never look like
a stalled run.
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

    def update(self, name: str, epochs_done: int | str) -> None:
        """Epochs done, or (text) a line of the evaluation that follows the last epoch."""
        if isinstance(epochs_done, str):
            self.console.print(f"{name}: {epochs_done}", soft_wrap=True, highlight=False)
            return
        self.done[name] = epochs_done
        trained = epochs_done >= self.totals[name]
        now = time.perf_counter()
        if self.live:
            self._bars.update(self._tasks[name], completed=epochs_done)
        elif now - self._last_line[name] >= self.every or trained:
            self._last_line[name] = now
            self.console.print(f"{name}: epoch {epochs_done}/{self.totals[name]} "
                               f"({now - self._start:.0f} s)", soft_wrap=True, highlight=False)


class SweepProgress:
    """One display across a sweep: runs done of all, epochs, and an ETA.
    `epoch(name, done)` as runs train, `finished(name)` as each completes."""

    def __init__(self, console: Console, epochs: dict[str, int], already_done: int, every: float = 30.0):
        from rich.progress import TimeRemainingColumn
        self.console, self.epochs, self.every = console, epochs, every
        self.total_runs = already_done + len(epochs)
        self.runs_done, self.done = already_done, {name: 0 for name in epochs}
        self.evaluating: set[str] = set()      # trained to the last epoch, not finished yet
        self.live, self._last, self._start = console.is_terminal, -float("inf"), time.perf_counter()
        self._bars = None
        if self.live:
            self._bars = Progress(TextColumn("{task.description}"), BarColumn(),
                                  TextColumn("{task.completed}/{task.total} epochs"), TimeElapsedColumn(),
                                  TextColumn("ETA"), TimeRemainingColumn(), console=console)

    def __enter__(self):
        if self._bars is not None:
            self._bars.__enter__()
            self._task = self._bars.add_task(self._description(), total=max(1, sum(self.epochs.values())))
        return self

    def __exit__(self, *exc):
        if self._bars is not None:
            self._bars.__exit__(*exc)
        return False

    def _description(self) -> str:
        evaluating = f" ({len(self.evaluating)} evaluating)" if self.evaluating else ""
        return f"runs {self.runs_done}/{self.total_runs}{evaluating}"

    def epoch(self, name: str, done: int | str) -> None:
        """Epochs a run has done, or (text) a line of its evaluation, shown as it comes."""
        if isinstance(done, str):
            self.console.print(f"{name}: {done}", soft_wrap=True, highlight=False)
            return
        self.done[name] = done
        started = done >= self.epochs.get(name, 0) and name not in self.evaluating
        if started:
            self.evaluating.add(name)
        self._show(force=started)

    def finished(self, name: str) -> None:
        self.done[name] = self.epochs.get(name, 0)
        self.evaluating.discard(name)
        self.runs_done += 1
        self._show(force=True)

    def _show(self, force: bool = False) -> None:
        done, total = sum(self.done.values()), sum(self.epochs.values())
        if self.live:
            self._bars.update(self._task, completed=done, description=self._description())
            return
        now = time.perf_counter()
        if force or now - self._last >= self.every:
            self._last = now
            elapsed = now - self._start
            eta = f", ETA {elapsed / done * (total - done):.0f} s" if 0 < done < total else ""
            evaluating = f", {len(self.evaluating)} evaluating" if self.evaluating else ""
            self.console.print(f"sweep: {self.runs_done}/{self.total_runs} runs done{evaluating}, {done}/{total} epochs, "
                               f"{elapsed:.0f} s{eta}", soft_wrap=True, highlight=False)
