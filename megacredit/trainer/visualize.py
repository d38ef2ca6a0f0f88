"""Run visualisations: a learning-curve PNG and a token-credit HTML page.

``plot_learning_curve(metrics_jsonl, out_png)`` draws reward, validation avg@k with its
bootstrap CI as error bars, the losses and the teacher signal from ``metrics.jsonl``.
``token_credit_html(token_credit_jsonl, out_html)`` renders each saved sample's response
tokens coloured by their per-token credit (green positive, red negative, opacity ~ |value|),
with every series' values in the tooltip; the page is self-contained (no scripts, no links).
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path
from typing import Any, Sequence

from megacredit.trainer.metrics import read_metrics, read_token_credit

FIGURE_SIZE_INCHES = (12.0, 8.0)
FIGURE_DPI = 100
"""The PNG is FIGURE_SIZE_INCHES * FIGURE_DPI pixels (1200 x 800)."""
CREDIT_KEY_PREFERENCE = ("advantage", "delta_v", "s_t")
"""Series coloured by default, first one present wins."""
POSITIVE_RGB = (0, 150, 60)
NEGATIVE_RGB = (210, 30, 30)


def _as_float(value: Any) -> float:
    try:
        return float(value)  # also parses the "nan"/"inf" strings metrics.jsonl stores
    except (TypeError, ValueError):
        return math.nan


def _merged_by_step(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One dict per step (later lines of the same step override earlier ones)."""
    by_step: dict[int, dict[str, Any]] = {}
    for rec in records:
        by_step.setdefault(int(rec["step"]), {}).update(rec)
    return [by_step[step] for step in sorted(by_step)]


def _xy(rows: Sequence[dict[str, Any]], name: str) -> tuple[list[int], list[float]]:
    steps = [int(r["step"]) for r in rows if name in r]
    return steps, [_as_float(r[name]) for r in rows if name in r]


def _plot_lines(ax, rows, names: Sequence[str], title: str) -> None:
    drawn = False
    for name in names:
        steps, values = _xy(rows, name)
        if steps:
            ax.plot(steps, values, marker="o", markersize=3, label=name)
            drawn = True
    _finish_axis(ax, title, drawn)


def _plot_reward(ax, rows) -> None:
    steps, mean = _xy(rows, "rollout/reward_mean")
    if steps:
        ax.plot(steps, mean, marker="o", markersize=3, label="rollout/reward_mean")
        std_steps, std = _xy(rows, "rollout/reward_std")
        if std_steps == steps:
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)],
                            [m + s for m, s in zip(mean, std)], alpha=0.2, label="± std")
    _finish_axis(ax, "training reward", bool(steps))


def _plot_validation(ax, rows) -> None:
    points = [r for r in rows if "val/avg_at_k" in r]
    if points:
        steps = [int(r["step"]) for r in points]
        mean = [_as_float(r["val/avg_at_k"]) for r in points]
        low = [_as_float(r.get("val/avg_at_k_ci_low", r["val/avg_at_k"])) for r in points]
        high = [_as_float(r.get("val/avg_at_k_ci_high", r["val/avg_at_k"])) for r in points]
        yerr = [[m - lo for m, lo in zip(mean, low)], [hi - m for m, hi in zip(mean, high)]]
        ax.errorbar(steps, mean, yerr=yerr, marker="o", capsize=4, label="val/avg_at_k (CI)")
    _finish_axis(ax, "validation avg@k with bootstrap CI", bool(points))


def _finish_axis(ax, title: str, drawn: bool) -> None:
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def plot_learning_curve(metrics_jsonl: str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """Write a 2x2 learning-curve figure (reward, val avg@k + CI, losses, teacher signal)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _merged_by_step(read_metrics(metrics_jsonl, skip_invalid=True))
    fig, axes = plt.subplots(2, 2, figsize=FIGURE_SIZE_INCHES, dpi=FIGURE_DPI)
    try:
        _plot_reward(axes[0][0], rows)
        _plot_validation(axes[0][1], rows)
        _plot_lines(axes[1][0], rows, ("train/loss",),
                    "losses")
        _plot_lines(axes[1][1], rows, ("teacher/s_t", "teacher/delta_v", "teacher/rlsd_delta"),
                    "teacher signal on the sampled token (token mean)")
        fig.suptitle(f"megacredit run: {Path(metrics_jsonl).parent.name}")
        fig.tight_layout()
        out = Path(out_png)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=FIGURE_DPI)
    finally:
        plt.close(fig)
    return out


# ------------------------------------------------------------------ token credit HTML
def credit_color(value: float, scale: float) -> str:
    """CSS background for ``value``: green if positive, red if negative, alpha ~ |value|."""
    if not math.isfinite(value) or scale <= 0 or value == 0:
        return "transparent"
    red, green, blue = POSITIVE_RGB if value > 0 else NEGATIVE_RGB
    alpha = min(1.0, abs(value) / scale) * 0.85 + 0.05
    return f"rgba({red}, {green}, {blue}, {alpha:.3f})"


def _pick_key(records: Sequence[dict[str, Any]], key: str | None) -> str | None:
    if key is not None:
        return key
    present = {name for rec in records for name in rec.get("credit", {})}
    for name in CREDIT_KEY_PREFERENCE:
        if name in present:
            return name
    return sorted(present)[0] if present else None


def _scale(records: Sequence[dict[str, Any]], key: str | None) -> float:
    values = [abs(_as_float(v)) for rec in records for v in rec.get("credit", {}).get(key, [])]
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return 0.0
    return finite[min(len(finite) - 1, int(0.98 * len(finite)))] or finite[-1]


def _render_token(token: str, index: int, credit: dict[str, list], key: str | None,
                  scale: float) -> str:
    tooltip = "; ".join(
        f"{name}={_as_float(series[index]):+.4f}" for name, series in credit.items()
        if index < len(series)
    )
    value = _as_float(credit[key][index]) if key in credit else math.nan
    text = html.escape(token, quote=True).replace("\n", "\u21b5<br>")
    return (f'<span class="tok" style="background:{credit_color(value, scale)}" '
            f'title="{html.escape(tooltip, quote=True)}">{text}</span>')


def _render_sample(rec: dict[str, Any], key: str | None, scale: float) -> str:
    credit = rec.get("credit", {})
    head = f"step {rec.get('step')}, sample {rec.get('sample')}"
    meta = [f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in rec.items()
            if k not in {"step", "sample", "tokens", "credit", "prompt", "feedback"}]
    parts = [f"<h3>{html.escape(head)}</h3>"]
    if meta:
        parts.append(f"<p class=meta>{' | '.join(meta)}</p>")
    for field in ("prompt", "feedback"):
        if rec.get(field):
            parts.append(f"<details><summary>{field}</summary><pre>"
                         f"{html.escape(str(rec[field]))}</pre></details>")
    if key not in credit:
        parts.append(f"<p class=meta>(no '{html.escape(str(key))}' series for this sample)</p>")
    tokens = "".join(_render_token(t, i, credit, key, scale) for i, t in enumerate(rec["tokens"]))
    parts.append(f'<div class="resp">{tokens}</div>')
    return "<section>" + "\n".join(parts) + "</section>"


_STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 70em; }
.resp { font-family: monospace; white-space: pre-wrap; line-height: 1.7; border: 1px solid #ccc;
        padding: 0.6em; }
.tok { border-radius: 2px; }
.meta { color: #555; font-size: 90%; }
section { margin-bottom: 2em; }
"""


def token_credit_html(token_credit_jsonl: str | os.PathLike, out_html: str | os.PathLike,
                      key: str | None = None, max_samples: int | None = None) -> Path:
    """Render saved samples' tokens coloured by the per-token series ``key``.

    ``key`` defaults to the first of advantage, delta_v, s_t present. Colour opacity is
    |value| relative to the page-wide 98th percentile of |value| of that series.
    """
    records = read_token_credit(token_credit_jsonl, skip_invalid=True)
    if max_samples is not None:
        records = records[-max_samples:]
    key = _pick_key(records, key)
    scale = _scale(records, key)
    body = "\n".join(_render_sample(rec, key, scale) for rec in records) or "<p>no samples</p>"
    legend = (f"<p>Colour: series <b>{html.escape(str(key))}</b>; "
              f"<span style='background:{credit_color(1, 1)}'>&nbsp;positive&nbsp;</span> "
              f"<span style='background:{credit_color(-1, 1)}'>&nbsp;negative&nbsp;</span>; "
              f"full opacity at |value| &ge; {scale:.4g}. Hover a token for all values.</p>")
    page = (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>megacredit token credit"
            f"</title><style>{_STYLE}</style></head><body><h1>Per-token credit</h1>{legend}"
            f"{body}</body></html>\n")
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


LEARNING_CURVE_FILE = "learning_curve.png"
TOKEN_CREDIT_HTML_FILE = "token_credit.html"


def render_run(run_dir: str | os.PathLike) -> list[Path]:
    """Draw ``learning_curve.png`` and ``token_credit.html`` for a run directory.

    Whatever inputs exist are rendered; returns the files written.
    """
    from megacredit.trainer.metrics import METRICS_FILE, TOKEN_CREDIT_FILE

    run = Path(run_dir)
    written = []
    if (run / METRICS_FILE).is_file():
        written.append(plot_learning_curve(run / METRICS_FILE, run / LEARNING_CURVE_FILE))
    if (run / TOKEN_CREDIT_FILE).is_file():
        written.append(token_credit_html(run / TOKEN_CREDIT_FILE, run / TOKEN_CREDIT_HTML_FILE))
    return written
