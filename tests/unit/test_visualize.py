"""Learning-curve PNGs (one run, several overlaid) and the token-credit heatmap page."""

from __future__ import annotations

import matplotlib.image as mpimg
import pytest

from megacredit.reporting.metrics import METRICS_FILE, MetricsLogger, save_token_credit
from megacredit.reporting.token_heatmap import (
    NEGATIVE_RGB,
    POSITIVE_RGB,
    diverging_color,
    series_order,
    write_heatmap_page,
)
from megacredit.reporting.visualize import FIGURE_DPI, FIGURE_SIZE_INCHES, plot_learning_curve, plot_runs
from page_parsing import token_spans as parse_spans


def make_run(run_dir, offset=0.0):
    logger = MetricsLogger(run_dir, tensorboard=False, console=False)
    logger.log(0, {"val/avg_at_k": 0.2, "val/avg_at_k_ci_low": 0.1, "val/avg_at_k_ci_high": 0.3})
    for step in range(1, 5):
        logger.log(step, {"rollout/reward_mean": 0.1 * step + offset, "rollout/reward_std": 0.05,
                          "train/loss": 1.0 / step, "teacher/s_t": 0.18 - 0.01 * step,
                          "train/entropy": 2.0 - 0.1 * step, "train/ppo_clip_frac": 0.01,
                          "perf/time_step": 20.0})
    logger.log(4, {"val/avg_at_k": 0.4 + offset, "val/avg_at_k_ci_low": 0.3, "val/avg_at_k_ci_high": 0.5})
    logger.close(print_summary=False)
    return run_dir / METRICS_FILE


def expected_shape():
    width, height = (round(s * FIGURE_DPI) for s in FIGURE_SIZE_INCHES)
    return (height, width)


def test_learning_curve_png_has_the_stated_size(tmp_path):
    out = plot_learning_curve(make_run(tmp_path), tmp_path / "plots" / "curve.png")
    image = mpimg.imread(out)
    assert image.shape[:2] == expected_shape()
    assert image.std() > 0.01  # not a blank canvas


def test_learning_curve_with_few_metrics_still_renders(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False, console=False)
    logger.log(1, {"perf/tokens_per_s": 10.0})
    logger.close(print_summary=False)
    out = plot_learning_curve(tmp_path / METRICS_FILE, tmp_path / "curve.png")
    assert mpimg.imread(out).shape[:2] == expected_shape()


def coloured_pixels(image, rgb):
    """Pixels within 0.05 of ``rgb`` (0-255) in every channel."""
    target = [c / 255 for c in rgb]
    return int(((abs(image[..., 0] - target[0]) < 0.05) & (abs(image[..., 1] - target[1]) < 0.05)
                & (abs(image[..., 2] - target[2]) < 0.05)).sum())


def test_plot_runs_overlays_each_run_in_its_own_colour(tmp_path):
    make_run(tmp_path / "a")
    make_run(tmp_path / "b", offset=0.1)
    one = mpimg.imread(plot_runs([tmp_path / "a"], tmp_path / "one.png"))
    two = mpimg.imread(plot_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "two.png"))
    assert two.shape[:2] == expected_shape()
    blue, orange = (31, 119, 180), (255, 127, 14)  # tab10 colours of the first and second run
    assert coloured_pixels(one, blue) > 500 and coloured_pixels(one, orange) == 0
    assert coloured_pixels(two, blue) > 500 and coloured_pixels(two, orange) > 500
    shared = mpimg.imread(plot_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "s.png", labels=["m", "m"]))
    assert coloured_pixels(shared, orange) == 0  # same label, same colour
    with pytest.raises(FileNotFoundError, match="metrics.jsonl' not found"):
        plot_runs([tmp_path / "missing"], tmp_path / "x.png")


def test_diverging_color_is_white_at_the_centre_and_saturates():
    assert diverging_color(0.0, 1.0) == "rgb(255, 255, 255)"
    assert diverging_color(1.0, 0.2, centre=1.0) == "rgb(255, 255, 255)"
    assert diverging_color(5.0, 1.0) == "rgb({}, {}, {})".format(*POSITIVE_RGB)
    assert diverging_color(-5.0, 1.0) == "rgb({}, {}, {})".format(*NEGATIVE_RGB)
    assert diverging_color(0.8, 0.2, centre=1.0) == "rgb({}, {}, {})".format(*NEGATIVE_RGB)
    half = diverging_color(0.5, 1.0)
    assert half == "rgb({}, {}, {})".format(*(round(255 + 0.5 * (c - 255)) for c in POSITIVE_RGB))
    assert diverging_color(float("nan"), 1.0) == "transparent" and diverging_color(1.0, 0.0) == "transparent"


def test_series_order_puts_the_papers_series_first():
    assert series_order(["zeta", "advantage", "s_t", "delta_v", "rlsd_weight", "r_t"]) == [
        "delta_v", "s_t", "r_t", "rlsd_weight", "advantage", "zeta"]


def test_heatmap_page_escapes_and_holds_the_saved_values(tmp_path):
    hostile, quote_attack = "<script>alert(1)</script>", '" onmouseover="alert(2)'
    save_token_credit(tmp_path / "a", 3, [{
        "tokens": [hostile, " good", " bad", quote_attack, "\n"], "token_ids": [5, 6, 7, 8, 9],
        "advantage": [0.0, 2.0, -1.5, 0.5, -0.25], "s_t": [0.1, 0.2, -0.3, 0.0, 0.0],
        "reward": 1.0, "prompt": "<b>What</b> is 2 + 2?"}])
    save_token_credit(tmp_path / "b", 3, [{"tokens": [" x"], "rlsd_weight": [0.8]}])
    save_token_credit(tmp_path / "b", 4, [{"tokens": [" y"], "rlsd_weight": [1.2]}])
    page = write_heatmap_page([tmp_path / "a", tmp_path / "b"], tmp_path / "page.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>What</b>" not in page and "&lt;b&gt;What&lt;/b&gt;" in page
    assert 'onmouseover="alert' not in page
    spans = parse_spans(page)
    run_a = [s for s in spans if s["run"] == 0]
    assert [(s["series"], s["value"], s["token_id"]) for s in run_a] == (
        [("s_t", v, str(i)) for v, i in zip([0.1, 0.2, -0.3, 0.0, 0.0], range(5, 10))]
        + [("advantage", v, str(i)) for v, i in zip([0.0, 2.0, -1.5, 0.5, -0.25], range(5, 10))])
    good = next(s for s in run_a if s["series"] == "advantage" and s["text"] == " good")
    bad = next(s for s in run_a if s["series"] == "advantage" and s["text"] == " bad")
    assert good["style"] == "background:rgb({}, {}, {})".format(*POSITIVE_RGB)  # at the scale: full colour
    assert bad["style"].startswith("background:rgb(") and "advantage = -1.5000 | token id 7" in bad["title"]
    assert [(s["step"], s["value"]) for s in spans if s["run"] == 1] == [(3, 0.8), (4, 1.2)]
    assert "not saved in this run" in page  # run a has no step-4 sample
    assert page.count("<th>a</th>") == 1 and page.count("<th>b</th>") == 1


def test_heatmap_page_series_and_steps_filters(tmp_path):
    for step in range(1, 4):
        save_token_credit(tmp_path, step, [{"tokens": ["x"], "delta_v": [1.0], "advantage": [2.0]}])
    page = write_heatmap_page([tmp_path], tmp_path / "p.html", series=["delta_v"], steps=[2, 3]).read_text()
    assert [(s["step"], s["series"]) for s in parse_spans(page)] == [(2, "delta_v"), (3, "delta_v")]
    with pytest.raises(FileNotFoundError, match="token_credit.jsonl' not found"):
        write_heatmap_page([tmp_path / "nothing"], tmp_path / "q.html")
