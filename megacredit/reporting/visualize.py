"""Run visualisations: learning curves of one or several runs (PNG) and the token-credit page (HTML).

``plot_runs(run_dirs, out_png)`` overlays runs' ``metrics.jsonl`` in one figure: training reward,
validation avg@k with its bootstrap CI as a band, response length, entropy, S_t, the PPO and RLSD
clip fractions, the loss, Delta V_t, seconds per step, and the teacher diagnostic (its and the
student's probability of the correct answer, Delta V_t on correct vs incorrect responses). ``plot_learning_curve`` is the one-run
case. The token-credit page is megacredit.reporting.token_heatmap; ``render_run`` writes both
into a run directory (the trainer calls it at the end of a run, ``megacredit plot`` on demand).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from megacredit.reporting.metrics import METRICS_FILE, TOKEN_CREDIT_FILE, read_metrics
from megacredit.reporting.token_heatmap import as_float, run_label, run_labels, write_heatmap_page

FIGURE_SIZE_INCHES = (16.0, 16.0)
FIGURE_DPI = 100
"""The PNG is FIGURE_SIZE_INCHES * FIGURE_DPI pixels (1600 x 1600)."""
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("training reward (rollout/reward_mean)", ("rollout/reward_mean",)),
    ("validation avg@k, band = bootstrap CI", ("val/avg_at_k",)),
    ("response length (rollout/response_length_mean)", ("rollout/response_length_mean",)),
    ("entropy on the top-K set (train/entropy)", ("train/entropy",)),
    ("S_t on the sampled token (teacher/s_t)", ("teacher/s_t",)),
    ("clip fraction: PPO solid, RLSD w_t dashed", ("train/ppo_clip_frac", "train/rlsd_clip_frac")),
    ("loss (train/loss)", ("train/loss",)),
    ("Delta V_t on the sampled token (teacher/delta_v)", ("teacher/delta_v",)),
    ("seconds per step (perf/time_step)", ("perf/time_step",)),
    ("P(correct answer): teacher solid, student dashed", ("teacher/answer_prob_teacher", "teacher/answer_prob_student")),
    ("teacher - student log-prob: correct solid, incorrect dashed", ("teacher/delta_v_correct", "teacher/delta_v_incorrect")),
    ("truncated responses (rollout/truncated_frac)", ("rollout/truncated_frac",)),
)
"""(title, metrics) of each panel, row by row on a 4 x 3 grid; a panel's 2nd metric is dashed."""
GRID = (4, 3)
LEARNING_CURVE_FILE = "learning_curve.png"
TOKEN_CREDIT_HTML_FILE = "token_credit.html"


@dataclass
class RunCurves:
    """One run's metrics merged by step, and how to draw it."""

    label: str
    rows: list[dict[str, Any]]
    """One dict per logged step (all of the step's records merged), sorted by step."""


def merged_by_step(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One dict per step (later lines of the same step override earlier ones)."""
    by_step: dict[int, dict[str, Any]] = {}
    for rec in records:
        by_step.setdefault(int(rec["step"]), {}).update(rec)
    return [by_step[step] for step in sorted(by_step)]


def series(rows: Sequence[dict[str, Any]], name: str) -> tuple[list[int], list[float]]:
    """(steps, values) of metric ``name`` over the steps that logged it."""
    steps = [int(r["step"]) for r in rows if name in r]
    return steps, [as_float(r[name]) for r in rows if name in r]


def load_curves(run_dir: str | os.PathLike, label: str | None = None) -> RunCurves:
    """A run's metrics.jsonl; a clear error when the directory has none."""
    run = Path(run_dir)
    path = run / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' not found: is '{run}' a megacredit run directory?")
    return RunCurves(label or run_label(run), merged_by_step(read_metrics(path, skip_invalid=True)))


def _draw_panel(ax, runs: Sequence[RunCurves], names: Sequence[str], colours: dict[str, Any]) -> bool:
    drawn, labelled = False, set()
    for run in runs:
        for position, name in enumerate(names):
            steps, values = series(run.rows, name)
            if not steps:
                continue
            label = None if run.label in labelled else run.label
            labelled.add(run.label)
            ax.plot(steps, values, color=colours[run.label], linestyle="--" if position else "-",
                    marker="o", markersize=3, label=label)
            if name == "val/avg_at_k":
                low = [as_float(r.get("val/avg_at_k_ci_low", r[name])) for r in run.rows if name in r]
                high = [as_float(r.get("val/avg_at_k_ci_high", r[name])) for r in run.rows if name in r]
                ax.fill_between(steps, low, high, color=colours[run.label], alpha=0.15, linewidth=0)
            drawn = True
    return drawn


def _finish_axis(ax, title: str, drawn: bool) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "not logged by these runs", ha="center", va="center", transform=ax.transAxes)


def plot_curves(runs: Sequence[RunCurves], out_png: str | os.PathLike, title: str) -> Path:
    """Draw the PANELS of ``runs`` overlaid; runs with the same label share a colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    palette = plt.get_cmap("tab10")
    labels = list(dict.fromkeys(run.label for run in runs))
    colours = {label: palette(index % 10) for index, label in enumerate(labels)}
    fig, axes = plt.subplots(*GRID, figsize=FIGURE_SIZE_INCHES, dpi=FIGURE_DPI)
    try:
        for ax, (panel_title, names) in zip(axes.flat, PANELS):
            _finish_axis(ax, panel_title, _draw_panel(ax, runs, names, colours))
        fig.suptitle(title)
        fig.tight_layout()
        out = Path(out_png)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=FIGURE_DPI)
    finally:
        plt.close(fig)
    return out


def plot_runs(run_dirs: Sequence[str | os.PathLike], out_png: str | os.PathLike,
              labels: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Overlay the learning curves of ``run_dirs``; ``labels`` (one per run) name and colour them."""
    if not run_dirs:
        raise ValueError("plot_runs needs at least one run directory")
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"plot_runs: {len(labels)} labels for {len(run_dirs)} runs")
    runs = [load_curves(run, label) for run, label in zip(run_dirs, labels or run_labels(run_dirs))]
    return plot_curves(runs, out_png, title or "megacredit runs: " + ", ".join(dict.fromkeys(r.label for r in runs)))


def plot_learning_curve(metrics_jsonl: str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """The figure of one run from its ``metrics.jsonl``."""
    label = Path(metrics_jsonl).parent.name
    run = RunCurves(label, merged_by_step(read_metrics(metrics_jsonl, skip_invalid=True)))
    return plot_curves([run], out_png, f"megacredit run: {label}")


def render_run(run_dir: str | os.PathLike) -> list[Path]:
    """Draw ``learning_curve.png`` and ``token_credit.html`` for a run directory.

    Whatever inputs exist are rendered; returns the files written.
    """
    run = Path(run_dir)
    written = []
    if (run / METRICS_FILE).is_file():
        written.append(plot_learning_curve(run / METRICS_FILE, run / LEARNING_CURVE_FILE))
    if (run / TOKEN_CREDIT_FILE).is_file():
        written.append(write_heatmap_page([run], run / TOKEN_CREDIT_HTML_FILE))
    return written
