"""The replication harness on a tiny budget, and the token-credit page of its runs in Chromium.

One module-scoped fixture runs ``tools/replicate.py`` end to end (CREDIT and RLSD, 1 seed, 1 step,
a 2-layer random model, validation before and after): real training processes, real metrics files.
Then: the generated results.md is checked against the metrics files, a second invocation must
skip the finished runs, and ``megacredit viz`` of the two runs must hold exactly the saved
per-token values and, rendered by headless Chromium, show coloured tokens in both run columns.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from make_deps import needs
from page_parsing import markdown_table, token_spans

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
HELPERS_DIR = Path(__file__).parent
METHODS = ("credit", "rlsd")
SEED = 7
TINY = [
    "model.name_or_path=tiny", "model.tiny.hidden_size=64", "model.tiny.num_hidden_layers=2",
    "algorithm.group_size=2", "rollout.max_new_tokens=5", "rollout.temperature=1.0",
    "env.name=trainer_helpers:ParityEnv", "env.kwargs={}", "data.num_generated_train=32",
    "data.num_generated_val=4", "data.prompts_per_step=4", "training.ppo_mini_batch_size=2",
    "optimizer.lr=1e-3", "validation.num_prompts=4", "validation.k=2", "validation.bootstrap_samples=200",
    "logging.tensorboard=false", "logging.console=false", "parallel.micro_batch_tokens=512",
]
_spec = importlib.util.spec_from_file_location("replicate_tool", REPO / "tools" / "replicate.py")
replicate_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(replicate_tool)


def experiment_dir(ablation: str | None = None) -> Path:
    """--runs-dir / experiment (no --level; the ablation; the tag of the --set overrides)."""
    return Path("runs") / replicate_tool.experiment_name(argparse.Namespace(level=None, ablation=ablation, set=TINY))


RUNS = experiment_dir()  # / <method>_seed<seed>
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def harness(tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "tools" / "replicate.py"), "--methods", *METHODS, "--seeds", str(SEED),
               "--steps", "1", "--val-every", "0", "--runs-dir", str(tmp / "runs"),
               "--results", str(tmp / "results.md"), *extra, "--set", *TINY]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HELPERS_DIR), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def replication(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replicate")
    result = harness(tmp)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp


def merged(run_dir: Path) -> dict[int, dict]:
    by_step: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        by_step.setdefault(record["step"], {}).update(record)
    return by_step


def point(record: dict) -> str:
    return (f"{record['val/avg_at_k']:.3f} [{record['val/avg_at_k_ci_low']:.3f}, "
            f"{record['val/avg_at_k_ci_high']:.3f}] @ {record['step']}")


def test_results_table_matches_the_metrics_files(replication):
    text = (replication / "results.md").read_text()
    rows = {row[0]: row for row in markdown_table(text, "## Every run")}
    assert sorted(rows) == sorted(METHODS)
    for method in METHODS:
        steps = merged(replication / RUNS / f"{method}_seed{SEED}")
        validations = [steps[s] for s in sorted(steps) if "val/avg_at_k" in steps[s]]
        assert [v["step"] for v in validations] == [0, 1]
        best = max(validations, key=lambda v: v["val/avg_at_k"])
        train = [steps[s] for s in sorted(steps) if "train/loss" in steps[s]]
        leakage = int(sum(r["rollout/leakage_count"] for r in train))
        seconds = statistics.median(r["perf/time_step"] for r in train)
        row = rows[method]
        assert row[1] == str(SEED)
        assert row[2] == point(validations[0]) and row[3] == point(validations[-1]) and row[4] == point(best)
        assert row[5] == f"{leakage} / {len(train) * 4 * 2}"  # steps x prompts x group size
        assert row[6] == f"{seconds:.1f}"
    per_method = {row[0]: row for row in markdown_table(text, "## Validation accuracy per method")}
    final = merged(replication / RUNS / f"credit_seed{SEED}")[1]["val/avg_at_k"]
    assert per_method["credit"][2] == f"{final:.3f} (1 seed, no CI)"
    assert f"seed {SEED}: step-0 avg@k identical across 2 methods" in text  # no update before step 0
    assert (replication / "results_curves.png").stat().st_size > 10_000


def test_second_invocation_skips_finished_runs(replication):
    metrics = replication / RUNS / f"credit_seed{SEED}" / "metrics.jsonl"
    before = metrics.stat().st_mtime_ns
    result = harness(replication)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 already finished, 0 to train" in result.stdout
    assert metrics.stat().st_mtime_ns == before
    plan = harness(replication, "--dry-run")
    assert plan.stdout.count("finished") == 2


def saved_records(run_dir: Path) -> dict[tuple[int, int], dict]:
    lines = (run_dir / "token_credit.jsonl").read_text().splitlines()
    return {(r["step"], r["sample"]): r for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def page(replication):
    from megacredit.cli import main

    runs = [replication / RUNS / f"{method}_seed{SEED}" for method in METHODS]
    out = replication / "viz" / "page.html"
    assert main(["viz", *map(str, runs), "--out", str(out)]) == 0
    return runs, out


def test_page_values_equal_the_saved_per_token_records(page):
    runs, out = page
    spans_of_page = token_spans(out.read_text())
    for index, run in enumerate(runs):
        records = saved_records(run)
        spans = [s for s in spans_of_page if s["run"] == index]
        expected = [(key, name, value, token_id) for key, rec in sorted(records.items())
                    for name in rec["credit"] for value, token_id in zip(rec["credit"][name], rec["token_ids"])]
        got = [((s["step"], s["sample"]), s["series"], s["value"], int(s["token_id"])) for s in spans]
        assert sorted(got) == sorted(expected) and len(got) > 0
        assert all(f"token id {s['token_id']}" in s["title"] for s in spans)
    credit_series = {name for rec in saved_records(runs[0]).values() for name in rec["credit"]}
    rlsd_series = {name for rec in saved_records(runs[1]).values() for name in rec["credit"]}
    assert credit_series == {"delta_v", "s_t", "r_t"} and rlsd_series == {"delta_v", "rlsd_weight", "advantage"}


def test_rlsd_weights_follow_from_the_saved_evidence_and_advantage_sign(page):
    """RLSD eq. 14 + clip: w = clip(exp(sign(A) Delta_t), 0.8, 1.2), Delta_t = the saved delta_v
    (sign(A) = sign of the saved token advantage, which RLSD keeps equal to sign(A))."""
    runs, _ = page
    checked = 0
    for rec in saved_records(runs[1]).values():
        credit = rec["credit"]
        if not any(credit["delta_v"]):
            continue  # no teacher signal: delta_v is masked to 0, the weight is not
        for delta, weight, advantage in zip(credit["delta_v"], credit["rlsd_weight"], credit["advantage"]):
            sign = 0.0 if advantage == 0 else math.copysign(1.0, advantage)
            assert weight == pytest.approx(min(1.2, max(0.8, math.exp(sign * delta))), abs=1e-5)
            checked += 1
    assert checked > 0


def grid_columns(image: np.ndarray) -> tuple[int, int, list[tuple[int, int]]]:
    """(top, bottom, [(x0, x1) of each column]) of the page's bordered grid table (#ccc borders)."""
    border = (np.abs(image - 204) <= 3).all(axis=2)
    lines = np.where(border.mean(axis=1) > 0.5)[0]
    top, bottom = int(lines.min()), int(lines.max())
    xs = np.where(border[top:bottom + 1].mean(axis=0) > 0.8)[0]
    edges = [int(x) for i, x in enumerate(xs) if i == 0 or x != xs[i - 1] + 1]
    return top, bottom, list(zip(edges, edges[1:]))


@needs("chromium", CHROMIUM is not None)
def test_chromium_screenshot_shows_coloured_tokens_for_both_runs(page, tmp_path):
    from PIL import Image

    _, out = page
    screenshot = tmp_path / "page.png"
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run",
               f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1300,1400",
               f"--screenshot={screenshot}", out.resolve().as_uri()]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:  # end the browser we started and its helper processes (its own group)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert screenshot.is_file(), output.decode(errors="replace")[-2000:]
    image = np.asarray(Image.open(screenshot).convert("RGB")).astype(int)
    assert image.shape[:2] == (1400, 1300)
    assert image.std() > 10 and (image.sum(axis=2) < 200).mean() > 0.001  # not blank: there is dark text
    top, bottom, columns = grid_columns(image)
    assert len(columns) == 3, columns  # step/sample labels, then one column per run
    coloured = (image.max(axis=2) - image.min(axis=2)) > 60
    per_run = [int(coloured[top:bottom, x0 + 2:x1 - 1].sum()) for x0, x1 in columns[1:]]
    assert int(coloured[top:bottom, columns[0][0]:columns[0][1]].sum()) == 0
    assert all(count > 500 for count in per_run), per_run


def test_ablation_report_pairs_the_ablated_run_with_the_baseline(replication):
    ablated = harness(replication, "--methods", "credit", "--ablation", "no_temperature_scaling")
    assert ablated.returncode == 0, ablated.stdout[-3000:] + ablated.stderr[-3000:]
    report = harness(replication, "--ablation-report")
    assert report.returncode == 0, report.stderr[-3000:]
    text = (replication / "default_ablations.md").read_text()
    rows = markdown_table(text, "# Single-factor ablations")
    assert [row[:3] for row in rows] == [["no_temperature_scaling", "credit", str(SEED)]]
    baseline = merged(replication / RUNS / f"credit_seed{SEED}")[1]["val/avg_at_k"]
    ablation_run = replication / experiment_dir("no_temperature_scaling") / f"credit_seed{SEED}"
    final = merged(ablation_run)[1]["val/avg_at_k"]
    assert rows[0][3] == f"{final:.3f}" and rows[0][4] == f"{baseline:.3f}"
    assert rows[0][6] == f"{SEED}: {final - baseline:+.3f}"
    assert "rollout.score_at_temperature=false" in text
