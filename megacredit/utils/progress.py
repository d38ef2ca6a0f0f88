"""Progress a person can see inside the long phases of a run (start-up, rollout, passes, validation).

One reporter object is made per process (:func:`make_progress_reporter`) and handed down to
whatever does long work; nothing here is global. Two kinds of work:

* ``with reporter.stage("building the Megatron model"):`` -- one long call with no inner count
  (model conversion/loading, Megatron build, weight sync). Its start and its duration are shown.
* ``with reporter.task("rollout", total=64, unit="samples") as advance:`` -- counted work;
  call ``advance(k)`` as ``k`` more units finish.

Renderings:

* :class:`RichProgressReporter` (a terminal): rich's live progress bars, which vanish when the
  task ends (the per-step line of the metrics console stays); stages show a spinner and leave one
  "done in X s" line. The bars share the console of the step bar (metrics_console), so rich nests
  them in one live display (rich >= 14.1).
* :class:`PlainProgressReporter` (not a terminal: CI, Slurm logs, files): plain lines, flushed
  at once; a counted task prints at most one line per ``interval_s`` while it runs, plus a closing
  line if it printed any (or ran longer than ``interval_s``); stages print a start and an end line.
* :class:`ProgressReporter` itself shows nothing: the reporter of every rank but the logging one.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Callable, Iterator, Literal, TextIO

Advance = Callable[[int], None]
"""``advance(count)``: ``count`` more units of the current task are done."""
ProgressMode = Literal["auto", "rich", "plain", "off"]
PROGRESS_MODES = ("auto", "rich", "plain", "off")


def _ignore(count: int = 1) -> None:
    return None


class ProgressReporter:
    """The interface, showing nothing (non-logging ranks, ``logging.progress=off``, tests)."""

    console = None
    """The rich console the bars are drawn on (None when nothing is drawn with rich)."""

    @contextlib.contextmanager
    def stage(self, description: str) -> Iterator[None]:
        """One long step without an inner count, e.g. "loading the model"."""
        yield

    @contextlib.contextmanager
    def task(self, description: str, total: int, unit: str) -> Iterator[Advance]:
        """Counted work of ``total`` ``unit``s; the body calls the yielded ``advance(k)``."""
        yield _ignore


def _format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes} min {seconds:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class PlainProgressReporter(ProgressReporter):
    """Plain, periodic lines for output that is not a terminal (see the module docstring)."""

    def __init__(self, stream: TextIO | None = None, interval_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, prefix: str = "megacredit") -> None:
        if interval_s < 0:
            raise ValueError(f"logging.progress_interval_s must be >= 0, got {interval_s}")
        self.stream, self.interval_s, self.clock, self.prefix = stream, float(interval_s), clock, prefix

    def _write(self, text: str) -> None:
        stream = self.stream if self.stream is not None else sys.stdout
        stream.write(f"{self.prefix}: {text}\n")
        stream.flush()

    @contextlib.contextmanager
    def stage(self, description: str) -> Iterator[None]:
        start = self.clock()
        self._write(f"{description} ...")
        yield
        self._write(f"{description} done in {_format_seconds(self.clock() - start)}")

    @contextlib.contextmanager
    def task(self, description: str, total: int, unit: str) -> Iterator[Advance]:
        start = last_line = self.clock()
        done = 0
        printed = False
        lock = threading.Lock()  # engines with a thread per server report concurrently

        def line(now: float) -> str:
            elapsed = now - start
            text = f"{description}: {done}/{total} {unit}"
            if total:
                text += f" ({100 * done / total:.0f} %)"
            text += f", {_format_seconds(elapsed)}"
            if 0 < done < total:
                text += f", about {_format_seconds(elapsed * (total - done) / done)} left"
            return text

        def advance(count: int = 1) -> None:
            nonlocal done, last_line, printed
            if count <= 0:
                return
            with lock:
                done += count
                now = self.clock()
                if done < total and now - last_line >= self.interval_s:
                    self._write(line(now))
                    last_line, printed = now, True

        yield advance
        now = self.clock()
        if printed or now - start >= self.interval_s:
            self._write(line(now))


def _counted_only(column):
    """A rich progress column shown only for counted tasks (stages have ``total=None``)."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class CountedOnly(ProgressColumn):
        def render(self, task):
            return column.render(task) if task.total is not None else Text("")

    return CountedOnly()


class RichProgressReporter(ProgressReporter):
    """rich's live progress display on a terminal (see the module docstring)."""

    def __init__(self, console=None) -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.console = console or Console()
        self._display = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), _counted_only(BarColumn()),
            _counted_only(MofNCompleteColumn()), TextColumn("{task.fields[unit]}"), TimeElapsedColumn(),
            _counted_only(TimeRemainingColumn()), console=self.console, transient=True,
        )
        self._open_tasks = 0

    @contextlib.contextmanager
    def _shown(self, description: str, total: int | None, unit: str) -> Iterator[int]:
        if self._open_tasks == 0:
            self._display.start()
        self._open_tasks += 1
        task_id = self._display.add_task(description, total=total, unit=unit)
        self._display.refresh()  # show it now, not at the next periodic refresh
        try:
            yield task_id
        finally:
            self._display.remove_task(task_id)
            self._open_tasks -= 1
            if self._open_tasks == 0:
                self._display.stop()

    @contextlib.contextmanager
    def stage(self, description: str) -> Iterator[None]:
        start = time.monotonic()
        with self._shown(description, None, ""):
            yield
        self.console.print(f"[green]done[/green] {description} in {_format_seconds(time.monotonic() - start)}",
                           highlight=False)

    @contextlib.contextmanager
    def task(self, description: str, total: int, unit: str) -> Iterator[Advance]:
        with self._shown(description, total, unit) as task_id:
            yield lambda count=1: self._display.advance(task_id, count)


def make_progress_reporter(mode: str = "auto", *, enabled: bool = True, interval_s: float = 30.0,
                           stream: TextIO | None = None) -> ProgressReporter:
    """The reporter for this process: ``mode`` "auto" picks rich on a terminal, plain lines
    elsewhere; "off" or ``enabled=False`` (every rank but the logging one) shows nothing."""
    if mode not in PROGRESS_MODES:
        raise ValueError(f"logging.progress must be one of {PROGRESS_MODES}, got {mode!r}")
    if not enabled or mode == "off":
        return ProgressReporter()
    if mode == "auto":
        from rich.console import Console

        mode = "rich" if Console(file=stream).is_terminal else "plain"
    if mode == "rich":
        from rich.console import Console

        return RichProgressReporter(Console(file=stream))
    return PlainProgressReporter(stream, interval_s)
