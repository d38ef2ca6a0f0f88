"""Console side of :class:`megacredit.reporting.metrics.MetricsLogger` (rich).

On a terminal: a progress bar over training steps with the key metrics beside it. Elsewhere
(CI logs, files): one plain line per step. At the end: a summary table with validation
accuracy before/after (with its bootstrap CI), the reward trend and the time per phase.
"""

from __future__ import annotations

from typing import Sequence

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

_SHORT_NAMES = {
    "rollout/reward_mean": "reward",
    "train/loss": "loss",
    "val/avg_at_k": "val",
    "perf/tokens_per_s": "tok/s",
}
PHASES = ("rollout", "reward", "teacher", "diagnostic", "train", "sync", "val")


def _format(value: float) -> str:
    if value != value:  # NaN
        return "nan"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


class ConsoleReporter:
    """Progress bar (terminal) or one line per step (non-terminal) plus a final table."""

    def __init__(self, total_steps: int | None, start_step: int = 0, console: Console | None = None):
        self.console = console or Console(stderr=False)
        self.total_steps = total_steps
        self._shown: dict[str, float] = {}
        self._progress: Progress | None = None
        if self.console.is_terminal and total_steps:
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[metrics]}"),
                console=self.console,
            )
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step,
                                                 metrics="")
            self._progress.start()

    def _metrics_text(self) -> str:
        return "  ".join(
            f"{_SHORT_NAMES[name]} {_format(value)}"
            for name, value in self._shown.items()
        )

    def update(self, step: int, values: dict[str, float]) -> None:
        """Show the key metrics of ``step``."""
        for name in _SHORT_NAMES:
            if name in values:
                self._shown[name] = values[name]
        if self._progress is not None:
            self._progress.update(self._task, completed=min(step, self.total_steps or step),
                                  metrics=self._metrics_text())
            return
        total = f"/{self.total_steps}" if self.total_steps else ""
        self.console.print(f"step {step}{total}  {self._metrics_text()}", highlight=False)

    def finish(self, rows: Sequence[tuple[str, str]] | None) -> None:
        """Stop the bar and print the summary ``rows`` (if any) as a table."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if not rows:
            return
        table = Table(title="megacredit run summary", show_lines=False)
        table.add_column("metric", style="bold")
        table.add_column("value")
        for name, value in rows:
            table.add_row(name, value)
        self.console.print(table)


def _series(history: Sequence[tuple[int, dict[str, float]]], name: str) -> list[tuple[int, dict]]:
    return [(step, values) for step, values in history if name in values]


def _val_row(step: int, values: dict[str, float]) -> str:
    text = f"{values['val/avg_at_k']:.4f}"
    if "val/avg_at_k_ci_low" in values and "val/avg_at_k_ci_high" in values:
        text += f"  CI [{values['val/avg_at_k_ci_low']:.4f}, {values['val/avg_at_k_ci_high']:.4f}]"
    return text + f"  (step {step})"


def summary_rows(history: Sequence[tuple[int, dict[str, float]]]) -> list[tuple[str, str]]:
    """Summary of a run's logged history (list of ``(step, {name: value})``)."""
    rows: list[tuple[str, str]] = []
    val = _series(history, "val/avg_at_k")
    if val:
        rows.append(("val avg@k, first", _val_row(*val[0])))
        if len(val) > 1:
            rows.append(("val avg@k, last", _val_row(*val[-1])))
            change = val[-1][1]["val/avg_at_k"] - val[0][1]["val/avg_at_k"]
            rows.append(("val avg@k, change", f"{change:+.4f}"))
    reward = _series(history, "rollout/reward_mean")
    if reward:
        first, last = reward[0][1]["rollout/reward_mean"], reward[-1][1]["rollout/reward_mean"]
        rows.append(("train reward, first -> last", f"{first:.4f} -> {last:.4f}"))
    rows.extend(_teacher_diagnostic_rows(history))
    totals = {
        phase: sum(v[f"perf/time_{phase}"] for _, v in _series(history, f"perf/time_{phase}"))
        for phase in PHASES
    }
    grand = sum(totals.values())
    for phase, seconds in totals.items():
        if seconds > 0:
            rows.append((f"time {phase}", f"{seconds:.1f} s ({100 * seconds / grand:.0f} %)"))
    speed = [v["perf/tokens_per_s"] for _, v in _series(history, "perf/tokens_per_s")]
    if speed:
        rows.append(("tokens/s (mean over steps)", f"{sum(speed) / len(speed):.1f}"))
    steps = sorted({step for step, _ in history})
    if steps:
        rows.append(("steps logged", f"{len(steps)} (last step {steps[-1]})"))
    return rows


def _teacher_diagnostic_rows(history: Sequence[tuple[int, dict[str, float]]]) -> list[tuple[str, str]]:
    """Does the self-teacher know more than the student? First and last logged values."""
    rows = []
    for label, names in (("P(correct answer) teacher / student", ("teacher/answer_prob_teacher",
                                                                   "teacher/answer_prob_student")),
                         ("teacher - student log-prob, correct / incorrect", ("teacher/delta_v_correct",
                                                                               "teacher/delta_v_incorrect"))):
        logged = [values for _, values in history if all(name in values for name in names)]
        if logged:
            first, last = (" / ".join(f"{values[name]:+.3f}" if "delta" in name else f"{values[name]:.3f}"
                                      for name in names) for values in (logged[0], logged[-1]))
            rows.append((label, f"{first} (first) -> {last} (last)"))
    return rows
