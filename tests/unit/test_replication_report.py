"""The replication report from run directories written by the real MetricsLogger (3 seeds, 4 methods)."""

from __future__ import annotations

import statistics

import pytest
import yaml

from megacredit.reporting.metrics import MetricsLogger
from megacredit.reporting.replication import ablation_rows, summarise_run, write_report
from megacredit.reporting.validation_stats import bootstrap_mean_ci
from page_parsing import markdown_table

SEEDS = (1, 2, 3)
FINALS = {  # method -> final avg@k per seed
    "grpo": (0.55, 0.50, 0.70),
    "sdpo": (0.50, 0.55, 0.60),
    "credit": (0.60, 0.70, 0.65),   # credit - sdpo: +0.10, +0.15, +0.05 (all above 0)
    "rlsd": (0.40, 0.30, 0.50),     # rlsd - grpo: all below 0
}
STEP_SECONDS = {"grpo": 10.0, "sdpo": 20.0, "credit": 24.0, "rlsd": 21.0}


def write_run(run_dir, method, seed):
    logger = MetricsLogger(run_dir, tensorboard=False, console=False)
    logger.log(0, {"val/avg_at_k": 0.3, "val/avg_at_k_ci_low": 0.2, "val/avg_at_k_ci_high": 0.4})
    for step in (1, 2):
        metrics = {"train/loss": 1.0, "rollout/leakage_count": float(step == 2 and method == "sdpo"),
                   "perf/time_step": STEP_SECONDS[method] + step, "train/entropy": 1.0}
        if method == "credit":
            metrics["teacher/s_t"] = 0.1 * seed if step == 1 else 0.0
        if method == "rlsd":
            metrics["train/rlsd_clip_frac"] = 0.04
        if method == "credit":
            metrics["teacher/answer_prob_teacher"] = 0.5 + 0.1 * step + 0.01 * seed
            metrics["teacher/answer_prob_student"] = 0.4
        logger.log(step, metrics)
    final = FINALS[method][SEEDS.index(seed)]
    logger.log(2, {"val/avg_at_k": final, "val/avg_at_k_ci_low": final - 0.1, "val/avg_at_k_ci_high": final + 0.1})
    logger.close(print_summary=False)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({
        "algorithm": {"name": method, "group_size": 4}, "data": {"prompts_per_step": 8},
        "validation": {"k": 4, "num_prompts": 64, "confidence": 0.95, "bootstrap_samples": 2000}}))
    return summarise_run(run_dir, method, seed, wall_s=60.0)


@pytest.fixture
def report(tmp_path):
    runs = [write_run(tmp_path / f"{m}_seed{s}", m, s) for s in SEEDS for m in FINALS]
    meta = dict(command="make replicate", methods=list(FINALS), seeds=list(SEEDS), steps=2, val_every=0,
                overrides=[], machine="test machine", commit="abc", wall_s=240.0, failures=[], date="today")
    out = write_report(runs, tmp_path / "docs" / "results.md", tmp_path / "docs" / "curves.png", meta)
    return out.read_text(), tmp_path


def test_method_table_means_cis_leakage_and_time(report):
    text, _ = report
    rows = {r[0]: r for r in markdown_table(text, "## Validation accuracy per method")}
    for method, finals in FINALS.items():
        low, high = bootstrap_mean_ci(finals, 2000, 0.95, seed=0)
        assert min(finals) <= low <= statistics.fmean(finals) <= high <= max(finals)
        assert rows[method][2] == f"{statistics.fmean(finals):.3f} [{low:.3f}, {high:.3f}]"
        assert rows[method][1] == "3"
        assert rows[method][4] == f"{3 if method == 'sdpo' else 0} / {3 * 2 * 8 * 4}"
        seconds = statistics.median([STEP_SECONDS[method] + 1, STEP_SECONDS[method] + 2] * 3)
        assert rows[method][5] == f"{seconds:.1f}"
        assert rows[method][6] == f"{seconds / (STEP_SECONDS['sdpo'] + 1.5):.2f}x"
        assert rows[method][7] == "unknown"  # the runs' commits (write_run records none)
    # best: the step-0 value 0.3 is below every final, so best = final
    assert rows["rlsd"][3] == rows["rlsd"][2]


def test_paired_differences_and_verdicts(report):
    text, _ = report
    rows = {r[0]: r for r in markdown_table(text, "## Paired differences")}
    assert rows["credit - sdpo"][5] == "reproduced (CI above 0)"
    assert rows["credit - sdpo"][4] == "1: +0.100, 2: +0.150, 3: +0.050"
    assert rows["sdpo - grpo"][5] == "not shown (CI includes 0)"
    assert rows["rlsd - grpo"][5] == "contradicted (CI below 0)"
    assert float(rows["rlsd - grpo"][2]) == pytest.approx(statistics.fmean([-0.15, -0.2, -0.2]), abs=1e-3)
    assert "credit_rlsd - rlsd" not in rows  # the hybrid did not run
    assert "- credit vs sdpo (CREDIT > SDPO (CREDIT Table 1, Fig. 3)): final avg@k difference 0.100; reproduced" in text


def test_paper_diagnostics_and_figure(report):
    text, tmp_path = report
    rows = {r[0]: r for r in markdown_table(text, "## Diagnostics the papers report")}
    s_t = next(v for k, v in rows.items() if k.startswith("S_t"))
    assert s_t[2].startswith(f"{statistics.fmean([0.1, 0.2, 0.3]):.3f} (CREDIT, step 1")
    clip = next(v for k, v in rows.items() if k.startswith("fraction of clipped"))
    assert clip[2].startswith("4.0 %")
    ratio = next(v for k, v in rows.items() if k.startswith("CREDIT time"))
    assert ratio[2].startswith(f"{25.5 / 21.5:.2f}x")
    assert "seed 1: step-0 avg@k identical across 4 methods" in text
    assert (tmp_path / "docs" / "curves.png").stat().st_size > 10_000 and "](curves.png)" in text


def test_summarise_run_needs_a_validation(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False, console=False)
    logger.log(1, {"train/loss": 1.0})
    logger.close(print_summary=False)
    with pytest.raises(ValueError, match="no val/avg_at_k record"):
        summarise_run(tmp_path, "grpo", 1, 1.0)


def test_teacher_diagnostic_table_first_step_and_last_steps(report):
    text, _ = report
    rows = {r[0]: r for r in markdown_table(text, "## Does the teacher know more?")}
    first = statistics.fmean(0.6 + 0.01 * seed for seed in SEEDS)  # step 1
    last = statistics.fmean(statistics.fmean((0.6 + 0.01 * seed, 0.7 + 0.01 * seed)) for seed in SEEDS)  # steps 1-2
    assert rows["credit"][1] == f"{first:.3f} -> {last:.3f}"
    assert rows["credit"][2] == "0.400 -> 0.400"
    assert rows["grpo"][1] == "n/a"  # GRPO has no teacher


def test_ablation_rows_pair_seeds_with_the_baseline(tmp_path):
    baseline = [write_run(tmp_path / f"base_credit_{s}", "credit", s) for s in SEEDS]
    ablated = [write_run(tmp_path / f"abl_sdpo_{s}", "sdpo", s) for s in SEEDS[:2]]  # no sdpo baseline: no row
    for run in ablated:
        run.method, run.commit = "credit", "bbbbbbb"
    baseline[0].commit = "aaaaaaa"  # seed 1's baseline; seed 2's keeps "unknown"
    rows = ablation_rows(baseline, {"feedback_on_correct": ablated})
    assert len(rows) == 1
    name, method, seeds, mean_ablated, mean_baseline, _, per_seed, commits = rows[0]
    assert (name, method, seeds) == ("feedback_on_correct", "credit", "1, 2")
    assert mean_ablated == f"{statistics.fmean(FINALS['sdpo'][:2]):.3f}"
    assert mean_baseline == f"{statistics.fmean(FINALS['credit'][:2]):.3f}"
    assert per_seed == "1: -0.100, 2: -0.150"
    assert commits == "bbbbbbb, aaaaaaa, unknown"  # both sides' runs, each commit once
