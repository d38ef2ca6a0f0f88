"""Learning-curve PNG and token-credit HTML."""

from __future__ import annotations

import re

import matplotlib.image as mpimg
import pytest

from megacredit.trainer.metrics import METRICS_FILE, MetricsLogger, save_token_credit
from megacredit.trainer.visualize import (
    FIGURE_DPI,
    FIGURE_SIZE_INCHES,
    NEGATIVE_RGB,
    POSITIVE_RGB,
    credit_color,
    plot_learning_curve,
    token_credit_html,
)


def make_run(run_dir):
    logger = MetricsLogger(run_dir, tensorboard=False, console=False)
    logger.log(0, {"val/avg_at_k": 0.2, "val/avg_at_k_ci_low": 0.1, "val/avg_at_k_ci_high": 0.3})
    for step in range(1, 5):
        logger.log(step, {"rollout/reward_mean": 0.1 * step, "rollout/reward_std": 0.05,
                          "train/loss": 1.0 / step, "train/distill_loss": 0.5 / step,
                          "teacher/s_t": 0.18 - 0.01 * step, "teacher/delta_v": 0.02})
    logger.log(4, {"val/avg_at_k": 0.4, "val/avg_at_k_ci_low": 0.3, "val/avg_at_k_ci_high": 0.5})
    logger.close(print_summary=False)
    return run_dir / METRICS_FILE


def test_learning_curve_png_has_the_stated_size(tmp_path):
    out = plot_learning_curve(make_run(tmp_path), tmp_path / "plots" / "curve.png")
    image = mpimg.imread(out)
    width, height = (round(s * FIGURE_DPI) for s in FIGURE_SIZE_INCHES)
    assert image.shape[:2] == (height, width)
    assert image.std() > 0.01  # not a blank canvas


def test_learning_curve_with_few_metrics_still_renders(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False, console=False)
    logger.log(1, {"perf/tokens_per_s": 10.0})
    logger.close(print_summary=False)
    out = plot_learning_curve(tmp_path / METRICS_FILE, tmp_path / "curve.png")
    assert mpimg.imread(out).shape[0] == round(FIGURE_SIZE_INCHES[1] * FIGURE_DPI)


def test_credit_color_sign_and_zero():
    assert credit_color(0.5, 1.0).startswith("rgba({}, {}, {},".format(*POSITIVE_RGB))
    assert credit_color(-0.5, 1.0).startswith("rgba({}, {}, {},".format(*NEGATIVE_RGB))
    assert credit_color(0.0, 1.0) == "transparent"
    assert credit_color(float("nan"), 1.0) == "transparent"
    weak, strong = credit_color(0.1, 1.0), credit_color(5.0, 1.0)
    alpha = lambda css: float(css.rsplit(",", 1)[1].rstrip(")"))  # noqa: E731
    assert alpha(weak) < alpha(strong) <= 0.9 + 1e-9


def spans(page: str) -> list[tuple[str, str, str]]:
    """(style, title, text) of every token span."""
    return re.findall(r'<span class="tok" style="background:([^"]*)" title="([^"]*)">(.*?)</span>',
                      page, flags=re.S)


def test_token_credit_html_escapes_and_colours_by_sign(tmp_path):
    hostile = "<script>alert(1)</script>"
    quote_attack = '" onmouseover="alert(2)'
    save_token_credit(tmp_path, 3, [{
        "tokens": [hostile, " good", " bad", quote_attack, "\n"],
        "advantage": [0.0, 2.0, -1.5, 0.5, -0.25],
        "s_t": [0.1, 0.2, -0.3, 0.0, 0.0],
        "reward": 1.0, "prompt": "<b>What</b> is 2 + 2?",
    }])
    out = token_credit_html(tmp_path / "token_credit.jsonl", tmp_path / "page.html")
    page = out.read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>What</b>" not in page and "&lt;b&gt;What&lt;/b&gt;" in page
    assert 'onmouseover="alert' not in page
    token_spans = spans(page)
    assert len(token_spans) == 5
    by_text = {text: (style, title) for style, title, text in token_spans}
    assert by_text[" good"][0].startswith("rgba({}, {}, {}".format(*POSITIVE_RGB))
    assert by_text[" bad"][0].startswith("rgba({}, {}, {}".format(*NEGATIVE_RGB))
    assert by_text["&lt;script&gt;alert(1)&lt;/script&gt;"][0] == "transparent"
    assert "advantage=+2.0000" in by_text[" good"][1] and "s_t=+0.2000" in by_text[" good"][1]
    assert "advantage=-1.5000" in by_text[" bad"][1]


def test_token_credit_html_colours_by_requested_series(tmp_path):
    save_token_credit(tmp_path, 1, [{"tokens": ["a", "b"], "advantage": [1.0, 1.0],
                                     "delta_v": [-1.0, 1.0]}])
    page = token_credit_html(tmp_path / "token_credit.jsonl", tmp_path / "p.html",
                             key="delta_v").read_text()
    styles = [style for style, _, _ in spans(page)]
    assert styles[0].startswith("rgba({}, {}, {}".format(*NEGATIVE_RGB))
    assert styles[1].startswith("rgba({}, {}, {}".format(*POSITIVE_RGB))
    assert "series <b>delta_v</b>" in page


@pytest.mark.parametrize("max_samples, expected", [(None, 3), (2, 2)])
def test_token_credit_html_sample_limit(tmp_path, max_samples, expected):
    for step in range(3):
        save_token_credit(tmp_path, step, [{"tokens": ["x"], "advantage": [1.0]}])
    page = token_credit_html(tmp_path / "token_credit.jsonl", tmp_path / "p.html",
                             max_samples=max_samples).read_text()
    assert page.count("<section>") == expected
