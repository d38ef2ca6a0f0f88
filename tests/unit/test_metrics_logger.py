"""MetricsLogger: JSONL, TensorBoard, console, resume truncation, token-credit records."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from megacredit.reporting.metrics import (
    DOCUMENTED_METRICS,
    METRIC_NAMESPACES,
    METRICS_FILE,
    TOKEN_CREDIT_FILE,
    MetricsLogger,
    check_metric_name,
    read_metrics,
    read_token_credit,
    save_token_credit,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def quiet_logger(run_dir, **kwargs) -> MetricsLogger:
    options = dict(jsonl=True, tensorboard=False, wandb=False, console=False)
    options.update(kwargs)
    return MetricsLogger(run_dir, **options)


def test_jsonl_one_line_per_log_call_flushed_and_converted(tmp_path):
    logger = quiet_logger(tmp_path)
    logger.log(1, {"rollout/reward_mean": 0.5, "train/loss": torch.tensor(1.25)})
    # Readable before close: each line is flushed.
    first = read_metrics(tmp_path / METRICS_FILE)
    assert [rec["step"] for rec in first] == [1]
    logger.log(2, {"rollout/reward_mean": np.float32(0.75), "perf/tokens_per_s": 10,
                   "train/grad_norm": float("nan")})
    logger.close(print_summary=False)
    records = read_metrics(tmp_path / METRICS_FILE)
    assert [rec["step"] for rec in records] == [1, 2]
    assert records[0]["train/loss"] == 1.25 and records[1]["rollout/reward_mean"] == 0.75
    assert records[1]["perf/tokens_per_s"] == 10.0
    assert records[1]["train/grad_norm"] == "nan"  # strict JSON: non-finite as a string
    for line in (tmp_path / METRICS_FILE).read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


@pytest.mark.parametrize("name", ["loss", "training/loss", "train/", "/loss", "Train/loss"])
def test_metric_names_without_known_namespace_are_rejected(tmp_path, name):
    with pytest.raises(ValueError, match="no known namespace"):
        check_metric_name(name)
    logger = quiet_logger(tmp_path)
    with pytest.raises(ValueError, match="rollout/, train/, teacher/, perf/, val/"):
        logger.log(0, {name: 1.0})
    logger.close(print_summary=False)


def test_non_numeric_values_and_bad_steps_are_rejected(tmp_path):
    logger = quiet_logger(tmp_path)
    with pytest.raises(TypeError, match="metric 'train/loss' must be a number"):
        logger.log(0, {"train/loss": "high"})
    with pytest.raises(TypeError, match="must be a number"):
        logger.log(0, {"train/loss": torch.ones(3)})
    with pytest.raises(ValueError, match="non-negative int"):
        logger.log(-1, {"train/loss": 1.0})
    logger.close(print_summary=False)


def test_resume_drops_records_after_checkpoint_and_partial_line(tmp_path):
    logger = quiet_logger(tmp_path)
    for step in range(1, 6):
        logger.log(step, {"train/loss": float(step)})
        logger.save_token_credit(step, [{"tokens": ["a"], "advantage": [float(step)]}])
    logger.close(print_summary=False)
    with open(tmp_path / METRICS_FILE, "a") as handle:
        handle.write('{"step": 6, "train/lo')  # crash mid-write
    resumed = quiet_logger(tmp_path, resume_from_step=3)
    resumed.log(4, {"train/loss": 40.0})
    resumed.close(print_summary=False)
    records = read_metrics(tmp_path / METRICS_FILE)
    assert [(r["step"], r["train/loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert [r["step"] for r in read_token_credit(tmp_path / TOKEN_CREDIT_FILE)] == [1, 2, 3]


def test_new_run_starts_with_empty_files(tmp_path):
    first = quiet_logger(tmp_path)
    first.log(1, {"train/loss": 1.0})
    first.save_token_credit(1, [{"tokens": ["a"], "advantage": [1.0]}])
    first.close(print_summary=False)
    second = quiet_logger(tmp_path)
    second.log(1, {"train/loss": 2.0})
    second.close(print_summary=False)
    assert [r["train/loss"] for r in read_metrics(tmp_path / METRICS_FILE)] == [2.0]
    assert read_token_credit(tmp_path / TOKEN_CREDIT_FILE) == []


def test_tensorboard_events_hold_the_logged_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = quiet_logger(tmp_path, tensorboard=True)
    logger.log(1, {"train/loss": 0.5, "val/avg_at_k": 0.25})
    logger.log(2, {"train/loss": 0.375})
    logger.close(print_summary=False)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(1, 0.5), (2, 0.375)]
    assert [(e.step, e.value) for e in events.Scalars("val/avg_at_k")] == [(1, 0.25)]


def test_wandb_enabled_without_package_warns(tmp_path):
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    with pytest.warns(UserWarning, match="'wandb' package is not installed"):
        logger = quiet_logger(tmp_path, wandb=True)
    logger.log(0, {"train/loss": 1.0})
    logger.close(print_summary=False)


def test_console_lines_and_summary_table(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, jsonl=False, tensorboard=False, console=True, total_steps=2)
    logger.log(0, {"val/avg_at_k": 0.1, "val/avg_at_k_ci_low": 0.05, "val/avg_at_k_ci_high": 0.15})
    logger.log(1, {"rollout/reward_mean": 0.2, "train/loss": 0.7, "perf/time_rollout": 3.0,
                   "perf/time_train": 1.0})
    logger.log(2, {"rollout/reward_mean": 0.4, "val/avg_at_k": 0.3, "val/avg_at_k_ci_low": 0.2,
                   "val/avg_at_k_ci_high": 0.4, "perf/time_rollout": 3.0, "perf/time_train": 1.0})
    logger.close()
    out = capsys.readouterr().out
    assert re.search(r"step 1/2 .*reward 0\.2", out)
    assert "val avg@k, first" in out and "0.1000  CI [0.0500, 0.1500]" in out
    assert "0.3000  CI [0.2000, 0.4000]" in out and "+0.2000" in out
    assert re.search(r"time rollout\s*│?\s*6\.0 s \(75 %\)", out)
    assert logger.latest("rollout/reward_mean") == 0.4
    assert logger.series("val/avg_at_k") == [(0, 0.1), (2, 0.3)]


def test_save_token_credit_records_and_length_check(tmp_path):
    samples = [
        {"tokens": ["<answer>", "7", "</answer>"], "s_t": torch.tensor([0.1, -0.2, 0.0]),
         "delta_v": np.array([0.5, -1.0, 0.25]), "advantage": [1.0, 1.0, 1.0],
         "reward": 1.0, "prompt": "What is 3 + 4?"},
    ]
    path = save_token_credit(tmp_path, 7, samples)
    (record,) = read_token_credit(path)
    assert record["step"] == 7 and record["sample"] == 0
    assert record["tokens"] == ["<answer>", "7", "</answer>"]
    assert record["credit"]["s_t"] == pytest.approx([0.1, -0.2, 0.0])
    assert record["credit"]["delta_v"] == [0.5, -1.0, 0.25]
    assert record["reward"] == 1.0 and record["prompt"] == "What is 3 + 4?"
    with pytest.raises(ValueError, match="sample 0: 'advantage' has 2 values but the sample has 3"):
        save_token_credit(tmp_path, 8, [{"tokens": ["a", "b", "c"], "advantage": [1.0, 2.0]}])


def test_save_token_credit_keeps_token_ids_as_ints(tmp_path):
    path = save_token_credit(tmp_path, 1, [{"tokens": ["a", "b"], "token_ids": torch.tensor([17, 4096]),
                                            "delta_v": [0.5, -0.5]}])
    (record,) = read_token_credit(path)
    assert record["token_ids"] == [17, 4096] and all(type(i) is int for i in record["token_ids"])
    assert "token_ids" not in record["credit"]
    with pytest.raises(ValueError, match="'token_ids' has 1 ids but the sample has 2"):
        save_token_credit(tmp_path, 2, [{"tokens": ["a", "b"], "token_ids": [3]}])


def test_docs_list_every_documented_metric():
    text = DOCS.read_text()
    missing = [name for name in DOCUMENTED_METRICS if f"`{name}`" not in text]
    assert not missing, f"docs/metrics.md lacks {missing}"
    assert all(name.split("/")[0] in METRIC_NAMESPACES for name in DOCUMENTED_METRICS)


def test_from_config_uses_the_logging_section(tmp_path):
    from megacredit.config import load_config

    cfg = load_config(None, [f"logging.run_dir={tmp_path / 'run'}", "logging.tensorboard=false",
                             "logging.console=false"])
    logger = MetricsLogger.from_config(cfg, total_steps=3)
    logger.log(1, {"train/loss": 1.0})
    logger.close()
    assert read_metrics(tmp_path / "run" / METRICS_FILE)[0]["train/loss"] == 1.0
    assert not (tmp_path / "run" / "tensorboard").exists()
