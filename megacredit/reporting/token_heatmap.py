"""Token heatmaps of the saved per-token credit: one self-contained HTML page for one or more runs.

``write_heatmap_page(run_dirs, out_html)`` reads each run's ``token_credit.jsonl`` (written by
:func:`megacredit.reporting.metrics.save_token_credit`) and renders, for every saved (step, sample),
one row with a column per run; in each cell every per-token series of the sample is a line of
the response's tokens coloured on a diverging scale (green above the series' centre, red below,
white at it). Series and where they come from (megacredit/trainer/step_metrics.py):

- ``delta_v``: realised Delta V_t = r_t(y_t) = f_t[y_t] - log pi_theta(y_t) (CREDIT eq. 2 at y_t);
  for RLSD this is its evidence Delta_t (RLSD eq. 13);
- ``s_t``: S_t = f_t[y_t] - mean_k g_{k,t}[y_t] (CREDIT eq. 6 with the C-sample baseline);
- ``r_t``: R_t(y_t) of CREDIT eq. 8;
- ``rlsd_weight``: clip(w_t, 1 - eps_w, 1 + eps_w), w_t = exp(sign(A) Delta_t) (RLSD eq. 14,
  Algorithm 1 line 17), centred at 1;
- ``advantage``: the token advantage the PPO-family loss used (GRPO A_i, RLSD / hybrid A_hat_t).

Each series has one scale for the whole page (all runs), the 98th percentile of
|value - centre|, so runs side by side are comparable. Hovering a token shows the series,
its value and the token id (the ``title`` tooltip); the exact value is also in ``data-v``.
No scripts, no external links.
"""

from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from megacredit.reporting.metrics import TOKEN_CREDIT_FILE, read_token_credit

POSITIVE_RGB = (0, 150, 60)
NEGATIVE_RGB = (210, 30, 30)
"""End colours of the diverging scale (at +scale and -scale from the centre); white at the centre."""
SERIES_INFO: dict[str, tuple[str, float]] = {
    "delta_v": ("ΔV_t = r_t(y_t)  (CREDIT eq. 2; RLSD Δ_t, eq. 13)", 0.0),
    "s_t": ("S_t  (CREDIT eq. 6, C-sample baseline)", 0.0),
    "r_t": ("R_t(y_t)  (CREDIT eq. 8)", 0.0),
    "rlsd_weight": ("clip(w_t)  (RLSD eq. 14, Alg. 1 l. 17)", 1.0),
    "advantage": ("token advantage", 0.0),
}
"""Known series in display order: (label, centre of the diverging scale)."""
SCALE_PERCENTILE = 0.98


@dataclass
class RunTokens:
    """The saved token-credit records of one run."""

    label: str
    """Column heading (the run directory's name, with the method when config.yaml names it)."""
    records: list[dict[str, Any]]
    """Lines of token_credit.jsonl."""


def as_float(value: Any) -> float:
    """A float from a JSON number or the "nan"/"inf" strings metrics files store; NaN otherwise."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def run_method(run_dir: Path) -> str | None:
    """``algorithm.name`` from the run's saved config.yaml, if there is one."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        return None
    import yaml

    data = yaml.safe_load(config.read_text()) or {}
    return (data.get("algorithm") or {}).get("name")


def run_label(run_dir: Path) -> str:
    """Directory name, plus the method when the name does not already say it."""
    method = run_method(run_dir)
    return run_dir.name if not method or method in run_dir.name else f"{run_dir.name} ({method})"


def run_labels(run_dirs: Sequence[str | os.PathLike]) -> list[str]:
    """:func:`run_label` of each run; the full paths instead when two labels would be equal."""
    labels = [run_label(Path(run)) for run in run_dirs]
    return labels if len(set(labels)) == len(labels) else [str(Path(run)) for run in run_dirs]


def load_run_tokens(run_dir: str | os.PathLike, label: str | None = None) -> RunTokens:
    """A run's token-credit records; a clear error when the run saved none."""
    run = Path(run_dir)
    path = run / TOKEN_CREDIT_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"'{path}' not found: is '{run}' a megacredit run directory? Per-token credit is saved when "
            f"logging.token_credit_samples > 0")
    return RunTokens(label or run_label(run), read_token_credit(path, skip_invalid=True))


def diverging_color(value: float, scale: float, centre: float = 0.0) -> str:
    """CSS colour of ``value``: white at ``centre``, POSITIVE_RGB at centre + scale and above,
    NEGATIVE_RGB at centre - scale and below, linear in between; transparent if not finite."""
    if not math.isfinite(value) or not scale > 0:
        return "transparent"
    strength = max(-1.0, min(1.0, (value - centre) / scale))
    end = POSITIVE_RGB if strength > 0 else NEGATIVE_RGB
    red, green, blue = (round(255 + abs(strength) * (channel - 255)) for channel in end)
    return f"rgb({red}, {green}, {blue})"


def series_order(names: Iterable[str]) -> list[str]:
    """Known series first, in SERIES_INFO order, then any others alphabetically."""
    present = set(names)
    return [n for n in SERIES_INFO if n in present] + sorted(present - set(SERIES_INFO))


def series_scales(runs: Sequence[RunTokens], names: Sequence[str]) -> dict[str, float]:
    """Page-wide scale per series: the SCALE_PERCENTILE quantile of |value - centre|."""
    scales = {}
    for name in names:
        centre = SERIES_INFO.get(name, ("", 0.0))[1]
        spread = sorted(abs(v - centre) for run in runs for rec in run.records
                        for v in map(as_float, rec.get("credit", {}).get(name, [])) if math.isfinite(v))
        scales[name] = (spread[min(len(spread) - 1, int(SCALE_PERCENTILE * len(spread)))] or spread[-1]
                        if spread else 0.0)
    return scales


def _token_text(token: str) -> str:
    text = html.escape(token, quote=True).replace("\n", "\u21b5")
    return text if text.strip() else text.replace(" ", "\u00b7") or "\u2205"


def _render_series(rec: dict[str, Any], name: str, scale: float) -> str:
    values = rec.get("credit", {}).get(name)
    label = html.escape(name)
    if values is None:
        return f'<div class="series" data-series="{label}"><span class="name">{label}</span><i>not saved</i></div>'
    centre = SERIES_INFO.get(name, ("", 0.0))[1]
    ids = rec.get("token_ids") or [None] * len(rec["tokens"])
    spans = []
    for token, value, token_id in zip(rec["tokens"], values, ids):
        number = as_float(value)
        tip = f"{name} = {number:+.4f} | token id {token_id if token_id is not None else '?'} | {token!r}"
        spans.append(f'<span class="tok" data-v="{number!r}" data-id="{"" if token_id is None else token_id}" '
                     f'style="background:{diverging_color(number, scale, centre)}" '
                     f'title="{html.escape(tip, quote=True)}">{_token_text(token)}</span>')
    return (f'<div class="series" data-series="{label}"><span class="name">{label}</span>'
            f'<span class="toks">{"".join(spans)}</span></div>')


def _render_cell(rec: dict[str, Any] | None, names: Sequence[str], scales: dict[str, float], run_index: int) -> str:
    if rec is None:
        return f'<td class="cell" data-run="{run_index}"><i>not saved in this run</i></td>'
    meta = [f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in rec.items()
            if k not in {"step", "sample", "tokens", "token_ids", "credit", "prompt", "feedback"}]
    parts = [f'<div class="meta">{" | ".join(meta)}</div>'] if meta else []
    for field in ("prompt", "feedback"):
        if rec.get(field):
            parts.append(f"<details><summary>{field}</summary><pre>{html.escape(str(rec[field]))}</pre></details>")
    shown = [n for n in names if n in rec.get("credit", {})] or list(names)
    parts.extend(_render_series(rec, name, scales[name]) for name in shown)
    return f'<td class="cell" data-run="{run_index}">{"".join(parts)}</td>'


def _legend(names: Sequence[str], scales: dict[str, float]) -> str:
    rows = []
    for name in names:
        label, centre = SERIES_INFO.get(name, (name, 0.0))
        scale = scales[name]
        swatches = "".join(f'<span class="sw" style="background:{diverging_color(centre + f * scale, scale, centre)}">'
                           f"{centre + f * scale:+.3g}</span>" for f in (-1.0, -0.5, 0.0, 0.5, 1.0))
        rows.append(f"<tr><td><b>{html.escape(name)}</b></td><td>{html.escape(label)}</td><td>{swatches}</td></tr>")
    return f'<table class="legend">{"".join(rows)}</table>'


_STYLE = """
body { font-family: sans-serif; margin: 1em; }
table.grid { border-collapse: collapse; table-layout: fixed; width: 100%; }
table.grid th, table.grid td { border: 1px solid #ccc; padding: 0.4em; vertical-align: top; }
.series { font-family: monospace; white-space: pre-wrap; line-height: 1.8; margin: 0.2em 0; }
.name { display: inline-block; min-width: 7em; color: #444; font-size: 85%; }
.tok { border-radius: 2px; padding: 0 1px; }
.meta { color: #555; font-size: 85%; }
.sw { font-family: monospace; font-size: 80%; padding: 0 0.4em; }
table.legend td { padding: 0.1em 0.6em; font-size: 90%; }
"""


def heatmap_page(runs: Sequence[RunTokens], series: Sequence[str] | None = None,
                 steps: Sequence[int] | None = None) -> str:
    """The HTML page of ``runs`` side by side (a column per run, a row per saved step/sample)."""
    names = list(series) if series else series_order(
        name for run in runs for rec in run.records for name in rec.get("credit", {}))
    scales = series_scales(runs, names)
    by_key = [{(int(rec["step"]), int(rec["sample"])): rec for rec in run.records} for run in runs]
    keys = sorted({key for table in by_key for key in table if steps is None or key[0] in steps})
    head = "".join(f"<th>{html.escape(run.label)}</th>" for run in runs)
    rows = [f'<tr data-step="{step}" data-sample="{sample}"><th>step {step}<br>sample {sample}</th>'
            + "".join(_render_cell(table.get((step, sample)), names, scales, i) for i, table in enumerate(by_key))
            + "</tr>" for step, sample in keys]
    body = (f'<table class="grid"><colgroup><col style="width:6em"></colgroup><tr><th></th>{head}</tr>'
            f'{"".join(rows)}</table>' if rows else "<p>no saved samples</p>")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>megacredit token credit</title>"
            f"<style>{_STYLE}</style></head><body><h1>Per-token credit</h1>"
            f"<p>Each line is one series on the response tokens: green above the series' centre, red below, "
            f"white at it; full colour at the scale shown (98th percentile of |value - centre| over the page). "
            f"Hover a token for its value and token id.</p>{_legend(names, scales)}{body}</body></html>\n")


def write_heatmap_page(run_dirs: Sequence[str | os.PathLike], out_html: str | os.PathLike,
                       series: Sequence[str] | None = None, steps: Sequence[int] | None = None) -> Path:
    """Render :func:`heatmap_page` of the given run directories to ``out_html``."""
    if not run_dirs:
        raise ValueError("write_heatmap_page needs at least one run directory")
    runs = [load_run_tokens(run, label) for run, label in zip(run_dirs, run_labels(run_dirs))]
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(heatmap_page(runs, series, steps), encoding="utf-8")
    return out
