"""A small, honest replication: GRPO vs SDPO vs CREDIT vs RLSD vs CREDIT-RLSD on the CPU task.

Runs ``megacredit train examples/<method>_smollm2_arithmetic.yaml`` (SmolLM2-135M-Instruct,
additions at the level chosen by --level) for every method and seed, one run at a time, each in
its own process with its log in ``<runs-dir>/<method>_seed<seed>/train.log``; then writes ``docs/results.md``
(final and best validation avg@k with bootstrap CIs, the paired differences between methods,
leakage counts, seconds per step, what was and was not reproduced from the papers) and one PNG
of the learning curves of all runs overlaid (megacredit.reporting.visualize.plot_runs).

Resumable: a finished run leaves ``replicate.json`` (its exact command) in its directory and
is skipped when the same command is asked again; an unfinished or failed run is started afresh; a
finished run of another command is never overwritten without ``--force``. Runs with ``--set``
overrides get their own folder (``<level>[_<ablation>]_set-<hash of the overrides>``).
A failed run does not stop the others; the summary covers the runs that finished.

Archive: a finished run's command (with the commit that trained it), config and metrics are copied to
``<archive>/<experiment>/<method>_seed<seed>/`` (default ``runs/`` beside ``--results``, i.e.
``docs/results/runs``); commit it with the report. The runs folder (checkpoints, logs) is not kept
between sessions; ``--report-only`` and later seeds use the archive's runs when it is gone.

    make replicate                                   # the documented budget (see BUDGET)
    .venv/bin/python tools/replicate.py --dry-run    # the plan and its time estimate
    .venv/bin/python tools/replicate.py --methods grpo credit --seeds 1 --steps 2 \\
        --set validation.num_prompts=16              # a smaller experiment
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megacredit.reporting.replication import (  # noqa: E402 (the repository root goes on the path first)
    RunSummary,
    ablation_rows,
    diagnostic_table,
    summarise_run,
    table,
    write_report,
)

METHODS = ("grpo", "sdpo", "credit", "rlsd", "credit_rlsd")
BUDGET = {"seeds": (1, 2, 3), "steps": 20, "val_every": 10}
"""Issue 19's budget per level: 5 methods x 3 seeds x 20 steps, validation (64 prompts x 4 samples)
at steps 0, 10 and 20. The time estimates below predate issue 19's longer replies (a stop at the
first newline, up to 96 new tokens: 12-23 tokens on average against 8-15), so expect 1.5-2x; each
training process peaks at about 8 GB resident (docs/results.md): run one at a time on 24 GB."""
LEVELS = {"easy": "1d+1d", "hard": "2d+2d"}
"""The testbed's arithmetic levels, chosen by SmolLM2-135M-Instruct's measured base accuracy
(tools/arithmetic_levels.py, benchmarks/results/arithmetic_levels.json): one near 40 %, one at or
below 15 % where groups are often all-wrong and GRPO has no signal (docs/results.md)."""
ABLATIONS = {
    "no_temperature_scaling": ["rollout.score_at_temperature=false"],
    "feedback_on_correct": ["env.kwargs.feedback_on_correct=true"],
    "sdpo_template": ["algorithm.teacher.template=sdpo"],
    "sdpo_divergence": ["algorithm.sdpo.alpha=0.5", "algorithm.sdpo.top_k=100", "algorithm.sdpo.topk_source=student"],
}
"""Single-factor ablations (issue 19): each changes one thing of the defaults; 'sdpo_divergence' is the
public SDPO code's default divergence and top-K source (lasgroup/SDPO actor.yaml: alpha 0.5,
distillation_topk 100; top-K of the student)."""
STEP_SECONDS_ESTIMATE = {"grpo": 12.0, "sdpo": 14.0, "credit": 17.0, "rlsd": 14.0, "credit_rlsd": 17.0}
"""Seconds per training step on 2 cores after the issue-11 speed-ups: CREDIT 30 s before them
(docs/demo.md: rollout + teacher + train = 298 s over 10 steps) x 0.57 (benchmarks/README.md,
demo step vs 29e183b); SDPO = CREDIT / 1.2 (issue 11's measured CPU ratio at C = 1); GRPO
without the teacher pass; RLSD and the hybrid like SDPO / CREDIT."""
VALIDATION_SECONDS_ESTIMATE = 28.0
"""One validation of 64 prompts x 4 samples: 41 s in docs/demo.md (124 s for 3) / 1.5, the
embedded engine's prompt-prefilled-once speed-up."""
STARTUP_SECONDS_ESTIMATE = 20.0
"""Process start, model load and the first weight sync."""
MARKER = "replicate.json"
ARCHIVED_FILES = (MARKER, "config.yaml", "metrics.jsonl")
"""What the archive keeps of a finished run: the report and the curves need nothing else (the run
folder also holds checkpoints, logs and token records, too large to commit)."""


def config_path(method: str) -> Path:
    return REPO / "examples" / f"{method}_smollm2_arithmetic.yaml"


def run_command(method: str, seed: int, args: argparse.Namespace) -> list[str]:
    """The ``megacredit train`` command of one run."""
    overrides = [f"training.seed={seed}", f"training.steps={args.steps}",
                 f"validation.every_steps={args.val_every}", "checkpoint.resume=none",
                 f"logging.run_dir={run_dir(method, seed, args)}", *experiment_overrides(args), *args.set]
    return [sys.executable, "-m", "megacredit.cli", "train", str(config_path(method)), *overrides]


def experiment_overrides(args: argparse.Namespace) -> list[str]:
    """The level's and the ablation's config overrides."""
    level = [f"data.generator_kwargs.difficulty={LEVELS[args.level]}"] if args.level else []
    return level + list(ABLATIONS.get(args.ablation or "", []))


def experiment_name(args: argparse.Namespace) -> str:
    """The runs' folder under --runs-dir: level, ablation, and a tag of the --set overrides (so
    that runs with other overrides never share a folder with the experiment's own)."""
    tag = "set-" + hashlib.sha1("\n".join(sorted(args.set)).encode()).hexdigest()[:8] if args.set else ""
    return "_".join(part for part in (args.level, args.ablation, tag) if part) or "default"


def run_dir(method: str, seed: int, args: argparse.Namespace) -> Path:
    return Path(args.runs_dir).resolve() / experiment_name(args) / f"{method}_seed{seed}"


def finished_command(directory: Path) -> list[str] | None:
    """The command of the run finished in ``directory`` (its marker), or None."""
    try:
        return json.loads((directory / MARKER).read_text()).get("command")
    except (OSError, json.JSONDecodeError):
        return None


def is_finished(directory: Path, command: Sequence[str]) -> bool:
    """True when ``directory`` holds a run finished with exactly ``command``."""
    return finished_command(directory) == list(command[1:])


def comparable(command: Sequence[str]) -> list[str]:
    """A run's command without what depends on where it was trained: the run folder and the
    checkout's path of the config (an archived run was trained in another checkout)."""
    return [Path(part).name if part.endswith(".yaml") and "=" not in part else part
            for part in command if not part.startswith("logging.run_dir=")]


def archive_dir(method: str, seed: int, args: argparse.Namespace) -> Path:
    return Path(args.archive).resolve() / experiment_name(args) / f"{method}_seed{seed}"


def archive_run(directory: Path, target: Path) -> None:
    """Copy what the report needs of a finished run into the archive (committed with the report,
    so that a later session can add seeds and rewrite the report without the runs folder)."""
    if target.resolve() == directory.resolve():
        return
    target.mkdir(parents=True, exist_ok=True)
    for name in ARCHIVED_FILES:
        if (directory / name).is_file():
            shutil.copyfile(directory / name, target / name)


def finished_run(method: str, seed: int, args: argparse.Namespace) -> Path | None:
    """The folder of the finished run of (method, seed) with this experiment's command: the runs
    folder, else the archive (whose runs were trained in another folder); None when neither has it."""
    command = run_command(method, seed, args)
    if is_finished(run_dir(method, seed, args), command):
        return run_dir(method, seed, args)
    archived = archive_dir(method, seed, args)
    other = finished_command(archived)
    return archived if other is not None and comparable(other) == comparable(command[1:]) else None


def overwrite_problem(directory: Path, command: Sequence[str]) -> str | None:
    """Why training ``command`` into ``directory`` would destroy a finished run of another
    command (a changed harness or budget), or None."""
    other = finished_command(directory)
    if other is None or other == list(command[1:]):
        return None
    return (f"{directory} holds a finished run of another command ({' '.join(other[3:])}); give "
            "another --runs-dir to keep it, or --force to retrain it")


def estimate_seconds(method: str, args: argparse.Namespace) -> float:
    """Pre-speed-up wall time of one run at the demo's batch sizes (see the constants)."""
    validations = 2 + (args.steps - 1) // args.val_every if args.val_every else 2
    return (STARTUP_SECONDS_ESTIMATE + args.steps * STEP_SECONDS_ESTIMATE.get(method, 30.0)
            + validations * VALIDATION_SECONDS_ESTIMATE)


def train_one(method: str, seed: int, args: argparse.Namespace) -> tuple[bool, float]:
    """Run one training process; returns (succeeded, wall seconds). Output goes to train.log."""
    directory = run_dir(method, seed, args)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MARKER).unlink(missing_ok=True)
    command = run_command(method, seed, args)
    start = time.monotonic()
    with open(directory / "train.log", "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            returncode = process.wait()
        finally:
            if process.poll() is None:  # interrupted (Ctrl-C): end exactly the process we started
                process.terminate()
                process.wait(timeout=60)
    wall = time.monotonic() - start
    if returncode == 0:
        (directory / MARKER).write_text(json.dumps({"command": command[1:], "wall_s": wall, "commit": args.commit,
                                                    "finished": datetime.now(timezone.utc).isoformat()}))
        archive_run(directory, archive_dir(method, seed, args))
    return returncode == 0, wall


def run_all(args: argparse.Namespace) -> list[tuple[str, int, str]]:
    """Train every (method, seed) not yet finished; returns the failures (method, seed, log)."""
    plan = [(method, seed) for seed in args.seeds for method in args.methods]
    todo = [(m, s) for m, s in plan if args.force or finished_run(m, s, args) is None]
    problems = [] if args.force else [p for m, s in todo if (p := overwrite_problem(run_dir(m, s, args),
                                                                                    run_command(m, s, args)))]
    if problems:
        raise SystemExit("replicate: refusing to overwrite finished runs:\n  " + "\n  ".join(problems))
    remaining = sum(estimate_seconds(m, args) for m, _ in todo)
    print(f"replicate: {len(plan)} runs, {len(plan) - len(todo)} already finished, {len(todo)} to train "
          f"(estimate: {remaining / 3600:.1f} h)", flush=True)
    load = os.getloadavg()[0]
    if todo and load > 1.5 * (os.cpu_count() or 1):
        print(f"replicate: warning: load average {load:.1f} on {os.cpu_count()} cores; other work slows the "
              "runs down and inflates the seconds per step the report shows", flush=True)
    failures, measured, estimated = [], 0.0, 0.0
    for index, (method, seed) in enumerate(todo, 1):
        print(f"[{index}/{len(todo)}] {method} seed {seed}: training -> {run_dir(method, seed, args)}", flush=True)
        ok, wall = train_one(method, seed, args)
        measured += wall
        estimated += estimate_seconds(method, args)
        left = sum(estimate_seconds(m, args) for m, _ in todo[index:]) * measured / estimated
        status = "done" if ok else f"FAILED, see {run_dir(method, seed, args) / 'train.log'}"
        print(f"[{index}/{len(todo)}] {method} seed {seed}: {status} in {wall / 60:.1f} min; "
              f"about {left / 60:.0f} min left", flush=True)
        if not ok:
            failures.append((method, seed, str(run_dir(method, seed, args) / "train.log")))
    return failures


def machine_description() -> str:
    """CPU model, cores and memory of this machine (absolute times are only meaningful with it)."""
    cpu = platform.processor() or platform.machine()
    memory = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
        kib = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal")))
        memory = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    threads = os.environ.get("OMP_NUM_THREADS")
    return (f"{cpu}, {os.cpu_count()} cores{memory}, {platform.system()} {platform.release()}"
            + (f", OMP_NUM_THREADS={threads}" if threads else ""))


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.strip()
        # The harness's own reports (docs/results/) do not count: a second invocation in the same
        # checkout found the first one's report modified and marked code at HEAD as changed.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)docs/results"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def collect(args: argparse.Namespace) -> list[RunSummary]:
    """Summaries of the finished runs of the plan, in plan order."""
    summaries = []
    for seed in args.seeds:
        for method in args.methods:
            if (directory := finished_run(method, seed, args)) is not None:
                marker = json.loads((directory / MARKER).read_text())
                summaries.append(summarise_run(directory, method, seed, marker["wall_s"],
                                               marker.get("commit", "unknown")))
    return summaries


def write_ablation_report(args: argparse.Namespace) -> Path:
    """docs/results/<level>_ablations.md: every ablation's finished runs beside the level's own
    (same methods and seeds), with paired differences by seed."""
    def finished(ablation: str | None) -> list[RunSummary]:
        return collect(argparse.Namespace(**{**vars(args), "ablation": ablation}))

    baseline = finished(None)
    ablations = {name: runs for name in ABLATIONS if (runs := finished(name))}
    out = Path(args.results).with_name(f"{args.level or 'default'}_ablations.md")
    lines = [f"# Single-factor ablations on the '{args.level or 'default'}' level", "",
             "Written by `tools/replicate.py --ablation-report` from the runs' metrics files. Each ablation "
             "changes one setting of the defaults (tools/replicate.py ABLATIONS); the baseline is the same "
             "method and seed without it (same prompts, validation set and initial model).", "",
             f"Generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} at commit {git_commit()} "
             f"on: {machine_description()}.", "",
             *(f"- `{name}`: {' '.join(ABLATIONS[name])}" for name in ablations), "",
             *table(["ablation", "method", "seeds", "final avg@k (ablation)", "final avg@k (baseline)",
                     "ablation - baseline [95 % CI over seeds]", "per seed", "commits"], ablation_rows(baseline, ablations)),
             "", "## Teacher diagnostic of each ablation (first training step -> mean of the last steps)", ""]
    for name, runs in ablations.items():
        lines += [f"### {name}", "", *diagnostic_table(runs), ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=list(BUDGET["seeds"]))
    parser.add_argument("--steps", type=int, default=BUDGET["steps"], help="training steps per run")
    parser.add_argument("--val-every", type=int, default=BUDGET["val_every"],
                        help="validate every N steps (and before and after training)")
    parser.add_argument("--level", choices=sorted(LEVELS), default=None,
                        help="the testbed level (arithmetic difficulty, see LEVELS); default: the configs' own")
    parser.add_argument("--ablation", choices=sorted(ABLATIONS), default=None,
                        help="one single-factor ablation (see ABLATIONS)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra config overrides applied to every run (e.g. validation.num_prompts=32)")
    parser.add_argument("--runs-dir", default=str(REPO / "runs" / "replicate"))
    parser.add_argument("--archive", default=None,
                        help="where finished runs' metrics, config and command are copied for the report "
                             "(default: runs/ beside --results; commit it with the report)")
    parser.add_argument("--results", default=None,
                        help="the Markdown report (default: docs/results/<level>[_<ablation>].md)")
    parser.add_argument("--plot", default=None, help="the learning-curve PNG (default: beside --results)")
    parser.add_argument("--force", action="store_true", help="retrain runs that are already finished")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report from finished runs")
    parser.add_argument("--ablation-report", action="store_true",
                        help="only write <level>_ablations.md beside --results from the finished ablation runs")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the time estimate")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.val_every < 0:
        parser.error("--steps must be >= 1 and --val-every >= 0")
    args.results = args.results or str(REPO / "docs" / "results" / f"{experiment_name(args)}.md")
    args.plot = args.plot or str(Path(args.results).with_name(Path(args.results).stem + "_curves.png"))
    args.archive = args.archive or str(Path(args.results).with_name("runs"))
    args.commit = git_commit()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        for seed in args.seeds:
            for method in args.methods:
                command = run_command(method, seed, args)
                done = "finished" if finished_run(method, seed, args) is not None else "to run"
                print(f"{done:>8}  ~{estimate_seconds(method, args) / 60:4.1f} min  megacredit {' '.join(command[3:])}")
        total = sum(estimate_seconds(m, args) for m in args.methods) * len(args.seeds)
        print(f"estimate: {total / 3600:.2f} h on 2 cores")
        return 0
    if args.ablation_report:
        print(f"replicate: wrote {write_ablation_report(args)}")
        return 0
    started = time.monotonic()
    failures = [] if args.report_only else run_all(args)
    summaries = collect(args)
    if not summaries:
        print("replicate: no finished runs to report", file=sys.stderr)
        return 1
    command = "make replicate" if sys.argv[1:] == [] and argv is None else (
        "python tools/replicate.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    write_report(summaries, Path(args.results), Path(args.plot), dict(
        command=command, methods=args.methods, seeds=args.seeds, steps=args.steps, val_every=args.val_every,
        overrides=experiment_overrides(args) + args.set, machine=machine_description(), commit=git_commit(),
        wall_s=time.monotonic() - started, failures=failures,
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")))
    print(f"replicate: wrote {args.results} and {args.plot}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
