"""Progress reporters: plain periodic lines off a terminal, rich bars on one, nothing when disabled."""

from __future__ import annotations

import io
import os
import re

import pytest

from megacredit.utils.progress import (
    PlainProgressReporter,
    ProgressReporter,
    RichProgressReporter,
    make_progress_reporter,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def plain(interval_s: float):
    stream, clock = io.StringIO(), FakeClock()
    return PlainProgressReporter(stream, interval_s=interval_s, clock=clock), stream, clock


def test_plain_task_prints_at_most_one_line_per_interval_and_a_closing_line():
    reporter, stream, clock = plain(interval_s=10)
    with reporter.task("rollout", total=8, unit="samples") as advance:
        for second in range(1, 9):  # one sample per second
            clock.now = float(second * 3)
            advance(1)
    lines = stream.getvalue().splitlines()
    # Lines at t = 12 s (4 done) and t = 24 s would be the 8th (complete) -> only the closing line.
    assert lines == [
        "megacredit: rollout: 4/8 samples (50 %), 12.0 s, about 12.0 s left",
        "megacredit: rollout: 8/8 samples (100 %), 24.0 s",
    ]
    assert "\x1b" not in stream.getvalue()


def test_plain_short_task_prints_nothing_and_zero_advances_are_ignored():
    reporter, stream, clock = plain(interval_s=30)
    with reporter.task("train pass", total=2, unit="micro-batches") as advance:
        advance(0)
        clock.now = 1.0
        advance(2)
    assert stream.getvalue() == ""


def test_plain_interval_zero_prints_every_update():
    reporter, stream, clock = plain(interval_s=0)
    with reporter.task("validation", total=3, unit="samples") as advance:
        for _ in range(3):
            clock.now += 1.0
            advance(1)
    assert [line.split(": ", 2)[2].split(" (")[0] for line in stream.getvalue().splitlines()] == [
        "1/3 samples", "2/3 samples", "3/3 samples"]


def test_plain_stage_prints_its_start_and_duration():
    reporter, stream, clock = plain(interval_s=30)
    with reporter.stage("building the Megatron model"):
        clock.now = 75.0
    assert stream.getvalue().splitlines() == [
        "megacredit: building the Megatron model ...",
        "megacredit: building the Megatron model done in 1 min 15 s",
    ]


def terminal_console():
    from rich.console import Console

    return Console(file=io.StringIO(), force_terminal=True, width=120, color_system="standard")


def strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def test_rich_reporter_draws_bars_and_a_stage_line():
    console = terminal_console()
    reporter = RichProgressReporter(console)
    with reporter.stage("loading the model"):
        pass
    with reporter.task("old-policy pass", total=3, unit="micro-batches") as advance:
        advance(2)
    output = console.file.getvalue()
    assert "\x1b[" in output, "no terminal control sequences: not a live display"
    assert "old-policy pass" in output and "0/3" in output and "micro-batches" in output
    assert "━" in output  # the bar
    assert "done loading the model in" in strip_ansi(output)
    assert reporter._display.live.is_started is False, "the live display must stop with its last task"


def test_rich_bars_nest_inside_the_step_bar_on_the_same_console():
    from rich.progress import Progress

    console = terminal_console()
    step_bar = Progress(console=console)  # what metrics_console.ConsoleReporter draws
    step_bar.add_task("train", total=10)
    step_bar.start()
    try:
        with RichProgressReporter(console).task("rollout", total=4, unit="samples") as advance:
            advance(4)
    finally:
        step_bar.stop()
    output = console.file.getvalue()
    assert "rollout" in output and "train" in output


def test_make_progress_reporter_picks_the_rendering():
    # Not a terminal (a pipe or a file: CI, Slurm logs) -> plain lines.
    assert type(make_progress_reporter("auto", stream=io.StringIO())) is PlainProgressReporter
    # A real pseudo-terminal -> rich bars.
    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "w") as tty:
            reporter = make_progress_reporter("auto", stream=tty)
            assert type(reporter) is RichProgressReporter
    finally:
        os.close(master)
    assert type(make_progress_reporter("plain", stream=io.StringIO())) is PlainProgressReporter
    # Every rank but the logging one, and "off", show nothing.
    for reporter in (make_progress_reporter("auto", enabled=False), make_progress_reporter("off")):
        assert type(reporter) is ProgressReporter and reporter.console is None
    with pytest.raises(ValueError, match="logging.progress must be one of"):
        make_progress_reporter("fancy")


def test_silent_reporter_accepts_the_same_calls(capsys):
    reporter = ProgressReporter()
    with reporter.stage("anything"):
        with reporter.task("rollout", total=2, unit="samples") as advance:
            advance(2)
    assert capsys.readouterr() == ("", "")
