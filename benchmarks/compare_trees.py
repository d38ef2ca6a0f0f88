"""Time per step of the demo run: this source tree vs a baseline commit, interleaved.

What is measured: ``megacredit train examples/credit_smollm2_arithmetic.yaml`` (the demo's
CREDIT on SmolLM2-135M-Instruct, 10 steps, with megacredit's teacher wording: the demo file
credit_smollm2_demo.yaml is newer than the baseline commits) run by each tree's own command
line, with validation off (it is not part of ``perf/time_step``) and the same seed, so both trees train on the same
prompts. Runs alternate baseline, current, baseline, current, ... (``--pairs``) so that load
changes on a shared machine hit both alike. The baseline is exported with ``git archive`` into
a temporary folder (no worktree is registered) and run with ``PYTHONPATH`` pointing at it and
this tree's virtual environment; ``MALLOC_*`` variables are removed from both runs' environment
so that each tree uses its own defaults.

Reported per tree: ``perf/time_step`` of every step of every run (the per-step profile shows any
warm-up), the median over steps and runs, each phase's median, and per pair the ratio of mean
step times current / baseline; plus the per-step ``train/loss`` of both trees and their largest
difference (changes that must not alter the losses keep it at float-rounding level; later steps
can differ more once a sample drawn from slightly different weights changes).

Run: ``.venv/bin/python benchmarks/compare_trees.py [--baseline 29e183b] [--pairs 2] [--quick]``;
writes benchmarks/results/compare_trees.json and the ``compare_trees`` table of
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

CONFIG = "examples/credit_smollm2_arithmetic.yaml"
OVERRIDES = ["validation.before_training=false", "validation.after_training=false", "validation.every_steps=0",
             "logging.tensorboard=false", "logging.console=false"]
PHASES = ("perf/time_rollout", "perf/time_teacher", "perf/time_train", "perf/time_sync")


def export_tree(ref: str) -> Path:
    """The source tree of ``ref`` in a temporary folder (reused if present)."""
    sha = subprocess.run(["git", "-C", str(_common.REPO), "rev-parse", ref], check=True, capture_output=True,
                         text=True).stdout.strip()
    target = Path(tempfile.gettempdir()) / "megacredit-bench-trees" / sha
    if not (target / "megacredit" / "__init__.py").is_file():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(_common.REPO), "archive", sha], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


def run_tree(tree: Path, run_dir: Path, steps: int, log: Path) -> list[dict]:
    """One training run of ``tree``'s trainer; returns its per-step metric records."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "MEGACREDIT_MALLOC_TUNING"}
    env["PYTHONPATH"] = str(tree)
    command = [sys.executable, "-m", "megacredit.cli", "train", str(tree / CONFIG), *OVERRIDES,
               f"training.steps={steps}", f"logging.run_dir={run_dir}"]
    with open(log, "ab") as output:
        subprocess.run(command, cwd=tree, env=env, stdout=output, stderr=subprocess.STDOUT, check=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if "perf/time_step" in r]


def summarise(runs: dict[str, list[list[dict]]]) -> dict:
    """Per-tree step times, phases and losses; per-pair ratios; loss differences."""
    summary: dict = {"trees": {}}
    for label, tree_runs in runs.items():
        times = [[r["perf/time_step"] for r in run] for run in tree_runs]
        summary["trees"][label] = {
            "time_step_per_run": times,
            "time_step": _common.spread([t for run in times for t in run]),
            "time_step_by_step_median": [statistics.median(col) for col in zip(*times)],
            "phases": {p: statistics.median([r.get(p, 0.0) for run in tree_runs for r in run]) for p in PHASES},
            "phases_per_run": [{p: statistics.median([r.get(p, 0.0) for r in run]) for p in PHASES}
                               for run in tree_runs],
            "loss_per_run": [[r.get("train/loss") for r in run] for run in tree_runs],
        }
    base, current = (summary["trees"][k]["time_step_per_run"] for k in ("baseline", "current"))
    summary["ratio_current_over_baseline"] = _common.ratio_spread(
        [statistics.mean(run) for run in current], [statistics.mean(run) for run in base])
    losses = [(a, b) for ra, rb in zip(summary["trees"]["current"]["loss_per_run"],
                                       summary["trees"]["baseline"]["loss_per_run"]) for a, b in zip(ra, rb)]
    summary["max_abs_loss_difference"] = max(abs(a - b) for a, b in losses) if losses else None
    summary["first_step_abs_loss_difference"] = abs(losses[0][0] - losses[0][1]) if losses else None
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="29e183b", help="git ref of the baseline tree (default 29e183b)")
    parser.add_argument("--pairs", type=int, default=None, help="baseline/current run pairs (default 2, quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 10, quick 3)")
    parser.add_argument("--quick", action="store_true", help="one pair of 3-step runs")
    args = parser.parse_args()
    pairs, steps = args.pairs or (1 if args.quick else 2), args.steps or (3 if args.quick else 10)
    trees = {"baseline": export_tree(args.baseline), "current": _common.REPO}
    log = _common.RESULTS_DIR / "compare_trees.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    runs: dict[str, list] = {"baseline": [], "current": []}
    with tempfile.TemporaryDirectory(prefix="megacredit-compare-") as scratch:
        for pair in range(pairs):
            for label in (("baseline", "current") if pair % 2 == 0 else ("current", "baseline")):
                records = run_tree(trees[label], Path(scratch) / f"{label}-{pair}", steps, log)
                runs[label].append(records)
                print(f"pair {pair + 1}/{pairs} {label}: time_step",
                      [round(r["perf/time_step"], 1) for r in records], flush=True)
    summary = summarise(runs)
    current_sha = subprocess.run(["git", "-C", str(_common.REPO), "rev-parse", "--short", "HEAD"], check=True,
                                 capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(_common.REPO), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True).stdout.strip())
    info = _common.machine()
    mode = "quick" if args.quick else "full"
    report = {"description": __doc__.split("\n\n")[1].replace("\n", " "), "mode": mode, "pairs": pairs,
              "steps": steps, "baseline": args.baseline, "current": current_sha + ("+dirty" if dirty else ""),
              "config": CONFIG, "overrides": OVERRIDES, **summary, "machine": info, "date": _common.timestamp()}
    path = _common.write_results("compare_trees", report)
    trees_summary = summary["trees"]
    row = [_common.machine_label(info), mode, f"{args.baseline} -> {report['current']}, {pairs}x{steps} steps",
           f"{trees_summary['baseline']['time_step']['median']:.1f}", f"{trees_summary['current']['time_step']['median']:.1f}",
           _common.fmt_ratio(summary["ratio_current_over_baseline"]),
           f"{summary['first_step_abs_loss_difference']:.1e} / {summary['max_abs_loss_difference']:.1e}",
           _common.timestamp()]
    header = ["machine", "mode", "trees, runs", "baseline s/step (median)", "current s/step (median)",
              "current / baseline (per pair)", "loss diff step 1 / max", "date"]
    _common.update_readme_table("compare_trees", header, [row])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
