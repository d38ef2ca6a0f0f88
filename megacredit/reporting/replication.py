"""The replication report (tools/replicate.py): per-run summaries of finished runs, and docs/results.md.

Numbers come only from each run's ``metrics.jsonl`` and ``config.yaml``:

- validation avg@k at each validation step with the run's own prompt-bootstrap CI
  (``val/avg_at_k_ci_low/high``, megacredit.reporting.validation_stats.avg_at_k); "final" is the
  last step's, "best" the highest over the validation steps (selected on the validation set
  itself, so optimistic);
- across seeds: the mean over seeds with a percentile bootstrap CI over seeds
  (validation_stats.bootstrap_mean_ci), and paired differences between methods by seed (the
  same seed gives the same training prompts, validation set and initial model);
- leakage: the sum of ``rollout/leakage_count`` (RLSD section 3.1) over the training steps;
- seconds per step: ``perf/time_step``.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from megacredit.reporting.metrics import METRICS_FILE, read_metrics
from megacredit.reporting.validation_stats import bootstrap_mean_ci
from megacredit.reporting.visualize import merged_by_step, plot_runs, series

BOOTSTRAP_SAMPLES = 2000
CONFIDENCE = 0.95
COMPARISONS = (
    ("credit", "sdpo", "CREDIT > SDPO (CREDIT Table 1, Fig. 3)"),
    ("sdpo", "grpo", "self-distillation > GRPO (CREDIT Table 1)"),
    ("credit", "grpo", "CREDIT > GRPO (CREDIT Table 1, Fig. 3)"),
    ("rlsd", "grpo", "RLSD > GRPO (RLSD sec. 5: +2.32 points on average)"),
    ("credit_rlsd", "rlsd", "none (the hybrid is beyond both papers)"),
)
"""(method a, method b, the papers' claim about a - b) of the paired-difference table."""
LAST_STEPS = 5
"""RunSummary.last averages this many final training steps."""
DIAGNOSTICS = (
    ("teacher/answer_prob_teacher", "P(answer) teacher"), ("teacher/answer_prob_student", "P(answer) student"),
    ("teacher/answer_prob_gain", "gain"), ("teacher/delta_v_correct", "teacher-student log-prob, correct"),
    ("teacher/delta_v_incorrect", "teacher-student log-prob, incorrect"), ("rollout/reward_mean", "reward"),
    ("rollout/response_length_mean", "response length"), ("rollout/truncated_frac", "truncated"),
)
"""(metric, column) of the teacher-diagnostic table (docs/metrics.md, "Does the teacher know more?")."""


@dataclass
class ValPoint:
    """One validation: avg@k and its prompt-bootstrap CI."""

    step: int
    mean: float
    low: float
    high: float


@dataclass
class RunSummary:
    """What the report needs from one finished run."""

    method: str
    seed: int
    run_dir: Path
    wall_s: float
    validations: list[ValPoint]
    leakage: int
    """Training responses that mention privileged information, summed over the steps."""
    responses: int
    """Training responses sampled over the run (steps x prompts_per_step x group_size)."""
    step_seconds: list[float]
    config: dict[str, Any] = field(default_factory=dict)
    first: dict[str, float] = field(default_factory=dict)
    """Metrics of the first training step (teacher/s_t for the paper's ~0.18)."""
    means: dict[str, float] = field(default_factory=dict)
    """Run means of a few diagnostics (train/rlsd_clip_frac, train/entropy)."""
    last: dict[str, float] = field(default_factory=dict)
    """Means over the last LAST_STEPS training steps of every float metric (the teacher diagnostic)."""
    commit: str = "unknown"
    """The commit that trained the run (the harness records it when the run finishes)."""

    @property
    def final(self) -> ValPoint:
        return self.validations[-1]

    @property
    def best(self) -> ValPoint:
        return max(self.validations, key=lambda point: point.mean)

    @property
    def initial(self) -> ValPoint | None:
        return self.validations[0] if self.validations[0].step == 0 else None


def summarise_run(run_dir: str | Path, method: str, seed: int, wall_s: float, commit: str = "unknown") -> RunSummary:
    """A RunSummary from a run directory; a clear error when it has no validation."""
    import yaml

    run = Path(run_dir)
    rows = merged_by_step(read_metrics(run / METRICS_FILE))
    config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    validations = [ValPoint(int(r["step"]), float(r["val/avg_at_k"]), float(r.get("val/avg_at_k_ci_low", math.nan)),
                            float(r.get("val/avg_at_k_ci_high", math.nan))) for r in rows if "val/avg_at_k" in r]
    if not validations:
        raise ValueError(f"{run / METRICS_FILE}: no val/avg_at_k record; the replication needs validation "
                         "(validation.after_training: true)")
    train_rows = [r for r in rows if "train/loss" in r]
    per_step = config.get("data", {}).get("prompts_per_step", 0) * config.get("algorithm", {}).get("group_size", 0)
    means = {}
    for name in ("train/rlsd_clip_frac", "train/entropy", "train/ppo_clip_frac"):
        values = series(train_rows, name)[1]
        if values:
            means[name] = statistics.fmean(values)
    tail = train_rows[-LAST_STEPS:]
    last = {name: statistics.fmean(values) for name in {k for r in tail for k, v in r.items() if isinstance(v, float)}
            if (values := [r[name] for r in tail if isinstance(r.get(name), float) and math.isfinite(r[name])])}
    return RunSummary(
        method=method, seed=seed, run_dir=run, wall_s=wall_s, validations=validations, last=last,
        leakage=int(sum(series(train_rows, "rollout/leakage_count")[1])), responses=per_step * len(train_rows),
        step_seconds=series(train_rows, "perf/time_step")[1], config=config,
        first={k: v for k, v in train_rows[0].items() if isinstance(v, float)} if train_rows else {}, means=means,
        commit=commit)


# ------------------------------------------------------------------ statistics over seeds
def seed_interval(values: Sequence[float]) -> tuple[float, float, float] | None:
    """(mean, CI low, CI high) over seeds; None with fewer than 2 seeds (no interval)."""
    if len(values) < 2:
        return None
    low, high = bootstrap_mean_ci(values, BOOTSTRAP_SAMPLES, CONFIDENCE, seed=0)
    return statistics.fmean(values), low, high


def by_method(runs: Sequence[RunSummary]) -> dict[str, list[RunSummary]]:
    grouped: dict[str, list[RunSummary]] = {}
    for run in runs:
        grouped.setdefault(run.method, []).append(run)
    return grouped


def paired_differences(runs: Sequence[RunSummary], a: str, b: str) -> list[tuple[int, float]]:
    """(seed, final avg@k of a - final avg@k of b) for the seeds both methods finished."""
    finals = {(run.method, run.seed): run.final.mean for run in runs}
    return [(seed, finals[(a, seed)] - finals[(b, seed)])
            for seed in sorted({run.seed for run in runs}) if (a, seed) in finals and (b, seed) in finals]


def verdict(interval: tuple[float, float, float] | None, claim_positive: bool) -> str:
    """Reproduced / contradicted / not shown, from a CI of a - b and the paper's claim a > b."""
    if interval is None:
        return "not testable (needs >= 2 seeds)"
    _, low, high = interval
    if not claim_positive:
        return "no claim"
    if low > 0:
        return "reproduced (CI above 0)"
    if high < 0:
        return "contradicted (CI below 0)"
    return "not shown (CI includes 0)"


def median_step_seconds(runs: Sequence[RunSummary]) -> float:
    values = [s for run in runs for s in run.step_seconds]
    return statistics.median(values) if values else math.nan


# ------------------------------------------------------------------ Markdown
def fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def fmt_interval(interval: tuple[float, float, float] | None, single: float | None = None) -> str:
    if interval is None:
        return f"{fmt(single)} (1 seed, no CI)" if single is not None else "n/a"
    mean, low, high = interval
    return f"{fmt(mean)} [{fmt(low)}, {fmt(high)}]"


def fmt_point(point: ValPoint) -> str:
    return f"{fmt(point.mean)} [{fmt(point.low)}, {fmt(point.high)}] @ {point.step}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(row) + " |" for row in rows])


def commits(runs: Sequence[RunSummary]) -> str:
    """The distinct commits that trained ``runs`` (RunSummary.commit), in first-seen order."""
    return ", ".join(dict.fromkeys(run.commit for run in runs))


def method_rows(runs: Sequence[RunSummary]) -> list[list[str]]:
    grouped = by_method(runs)
    sdpo_time = median_step_seconds(grouped.get("sdpo", []))
    rows = []
    for method, group in grouped.items():
        finals, bests = [r.final.mean for r in group], [r.best.mean for r in group]
        seconds = median_step_seconds(group)
        leak, responses = sum(r.leakage for r in group), sum(r.responses for r in group)
        rows.append([method, str(len(group)), fmt_interval(seed_interval(finals), finals[0]),
                     fmt_interval(seed_interval(bests), bests[0]), f"{leak} / {responses}", fmt(seconds, 1),
                     fmt(seconds / sdpo_time, 2) + "x" if math.isfinite(sdpo_time) else "n/a", commits(group)])
    return rows


def comparison_rows(runs: Sequence[RunSummary]) -> tuple[list[list[str]], list[str]]:
    """Rows of the paired-difference table and one sentence per comparison for the summary."""
    present = {run.method for run in runs}
    rows, sentences = [], []
    for a, b, claim in COMPARISONS:
        if a not in present or b not in present:
            continue
        diffs = paired_differences(runs, a, b)
        interval = seed_interval([d for _, d in diffs])
        result = verdict(interval, claim_positive=not claim.startswith("none"))
        per_seed = ", ".join(f"{seed}: {d:+.3f}" for seed, d in diffs)
        mean = interval[0] if interval else (diffs[0][1] if diffs else math.nan)
        rows.append([f"{a} - {b}", claim, fmt(mean), fmt_interval(interval) if interval else "n/a", per_seed, result])
        sentences.append(f"- {a} vs {b} ({claim}): final avg@k difference {fmt(mean)}; {result}.")
    return rows, sentences


def run_rows(runs: Sequence[RunSummary]) -> list[list[str]]:
    return [[r.method, str(r.seed), fmt_point(r.initial) if r.initial else "n/a", fmt_point(r.final),
             fmt_point(r.best), f"{r.leakage} / {r.responses}", fmt(median_step_seconds([r]), 1),
             fmt(r.wall_s / 60, 1), r.commit] for r in runs]


def paper_claim_rows(runs: Sequence[RunSummary]) -> list[list[str]]:
    """Diagnostics the papers report, next to what these runs measured."""
    grouped = by_method(runs)
    rows = []
    s_t = [r.first["teacher/s_t"] for r in grouped.get("credit", []) if "teacher/s_t" in r.first]
    if s_t:
        rows.append(["S_t at the start of training (CREDIT sec. 4.2, Fig. 4b)", "~0.18 (Qwen3-8B, LCBv6)",
                     f"{fmt(statistics.fmean(s_t))} (CREDIT, step 1, mean over {len(s_t)} seeds)"])
    clip = [r.means["train/rlsd_clip_frac"] for r in grouped.get("rlsd", []) if "train/rlsd_clip_frac" in r.means]
    if clip:
        rows.append(["fraction of clipped RLSD weights w_t (RLSD sec. 5, Fig. 5c)", "3-6 %",
                     f"{100 * statistics.fmean(clip):.1f} % (RLSD, mean over steps and seeds)"])
    credit_time, sdpo_time = median_step_seconds(grouped.get("credit", [])), median_step_seconds(grouped.get("sdpo", []))
    if math.isfinite(credit_time) and math.isfinite(sdpo_time):
        rows.append(["CREDIT time per step / SDPO's at C = 1 (CREDIT Table 2)", "1.01x (8 GPUs, rollouts dominate)",
                     f"{credit_time / sdpo_time:.2f}x (2 CPU cores, medians of perf/time_step)"])
    entropy = {m: statistics.fmean(r.means["train/entropy"] for r in g) for m, g in grouped.items()
               if m in ("grpo", "rlsd") and all("train/entropy" in r.means for r in g)}
    if len(entropy) == 2:
        rows.append(["RLSD keeps a higher entropy than GRPO (RLSD Fig. 5b)", "higher over 200 steps",
                     f"RLSD {fmt(entropy['rlsd'])} vs GRPO {fmt(entropy['grpo'])} (top-K entropy, run means)"])
    leaks = {m: sum(r.leakage for r in g) for m, g in grouped.items()}
    rows.append(["privileged-information leakage (RLSD sec. 3.1; RLSD immune, App. A.6)",
                 "grows over training for OPSD; none for RLSD",
                 ", ".join(f"{m} {n}" for m, n in leaks.items()) + " responses"])
    return rows


def diagnostic_rows(runs: Sequence[RunSummary]) -> list[list[str]]:
    """Per method: each DIAGNOSTICS metric at the first training step -> over the last LAST_STEPS
    steps, means over seeds ("n/a" where the method logs no such metric, e.g. GRPO's teacher)."""
    def cell(group: Sequence[RunSummary], name: str) -> str:
        first = [r.first[name] for r in group if name in r.first]
        last = [r.last[name] for r in group if name in r.last]
        return f"{fmt(statistics.fmean(first))} -> {fmt(statistics.fmean(last))}" if first and last else "n/a"

    return [[method, *(cell(group, name) for name, _ in DIAGNOSTICS)] for method, group in by_method(runs).items()]


def diagnostic_table(runs: Sequence[RunSummary]) -> list[str]:
    """The teacher-diagnostic table of ``runs`` (header: method and DIAGNOSTICS' columns)."""
    return table(["method", *(column for _, column in DIAGNOSTICS)], diagnostic_rows(runs))


def ablation_rows(baseline: Sequence[RunSummary], ablations: dict[str, Sequence[RunSummary]]) -> list[list[str]]:
    """Per ablation and method: final avg@k (mean over seeds) beside the baseline's on the same
    seeds, the paired difference ablation - baseline with its CI over seeds, and the commits of
    both sides' runs."""
    baseline_runs = {(r.method, r.seed): r for r in baseline}
    rows = []
    for name, runs in ablations.items():
        for method, group in by_method(runs).items():
            paired = [(r, baseline_runs[(method, r.seed)]) for r in group if (method, r.seed) in baseline_runs]
            pairs = [(run.seed, run.final.mean, base.final.mean) for run, base in paired]
            if not pairs:
                continue
            diffs = [a - b for _, a, b in pairs]
            interval = seed_interval(diffs)
            rows.append([name, method, ", ".join(str(seed) for seed, _, _ in pairs),
                         fmt(statistics.fmean(a for _, a, _ in pairs)), fmt(statistics.fmean(b for _, _, b in pairs)),
                         fmt_interval(interval, diffs[0]) if len(diffs) < 2 or interval else "n/a",
                         ", ".join(f"{seed}: {a - b:+.3f}" for seed, a, b in pairs),
                         commits([run for pair in paired for run in pair])])
    return rows


def initial_validation_check(runs: Sequence[RunSummary]) -> list[str]:
    """Step-0 validation is before any update, so it must agree across methods at one seed."""
    lines = []
    for seed in sorted({r.seed for r in runs}):
        values = {r.method: r.initial.mean for r in runs if r.seed == seed and r.initial}
        if len(values) > 1:
            same = len(set(values.values())) == 1
            lines.append(f"- seed {seed}: step-0 avg@k {'identical' if same else 'DIFFERS'} across "
                         f"{len(values)} methods ({', '.join(f'{m} {v:.3f}' for m, v in values.items())})")
    return lines


SCOPE = """\
What this replication cannot show, whatever its numbers: the papers train 7-8B models (Qwen3-8B,
OLMo-3-7B-Instruct; RLSD a vision-language model) for hundreds of steps on science, tool-use, code
and maths benchmarks on 8-32 GPUs; here a 135M model trains for a few steps on small additions
(one- or two-digit, the level above) on 2 CPU cores, with batches, response lengths, the learning rate and the teacher schedules scaled
down (examples/_smollm2_arithmetic_base.yaml). The paired comparisons test the papers' orderings
only at this scale; "not shown" means this budget cannot tell the methods apart, not that the
papers are wrong. Long-run claims (OPSD's late collapse and growing leakage, RLSD's higher
convergence ceiling, CREDIT's faster convergence on LiveCodeBench) are out of reach of runs this
short and are not tested. The time ratio is a CPU measurement where the teacher and contrastive
forwards dominate; the paper's 1.01x comes from GPU runs dominated by long rollouts."""


def setup_lines(runs: Sequence[RunSummary], meta: dict[str, Any]) -> list[str]:
    cfg = runs[0].config
    val, data, rollout = cfg.get("validation", {}), cfg.get("data", {}), cfg.get("rollout", {})
    walls = [r.wall_s for r in runs]
    return [
        f"- Command: `{meta['command']}` (resumable: finished runs are skipped; `--dry-run` prints the plan).",
        f"- Generated {meta['date']} at commit {meta['commit']} on: {meta['machine']}.",
        f"- Methods: {', '.join(meta['methods'])}; seeds: {', '.join(map(str, meta['seeds']))}; "
        f"{meta['steps']} training steps per run; validation at step 0"
        + (f", every {meta['val_every']} steps" if meta["val_every"] else "") + " and at the end.",
        f"- Model `{cfg.get('model', {}).get('name_or_path')}` ({cfg.get('model', {}).get('dtype')}), task "
        f"`{cfg.get('env', {}).get('name')}` {data.get('generator_kwargs', {})}; per step "
        f"{data.get('prompts_per_step')} prompts x {cfg.get('algorithm', {}).get('group_size')} rollouts, "
        f"temperature {rollout.get('temperature')}, {rollout.get('max_new_tokens')} new tokens, "
        f"lr {cfg.get('optimizer', {}).get('lr')}.",
        f"- Validation: avg@{val.get('k')} over {val.get('num_prompts')} held-out prompts (a different set per seed), "
        f"temperature {val.get('temperature')}, top-p {val.get('top_p')}. CIs: within a run, the trainer's "
        f"{fmt(100 * val.get('confidence', math.nan), 0)} % percentile bootstrap over prompts "
        f"({val.get('bootstrap_samples')} resamples); across runs, a {int(CONFIDENCE * 100)} % percentile "
        f"bootstrap over seeds ({BOOTSTRAP_SAMPLES} resamples).",
        f"- Extra overrides: {' '.join(meta['overrides']) or 'none'}.",
        f"- Wall time: {sum(walls) / 3600:.2f} h of training in {len(runs)} runs "
        f"({statistics.fmean(walls) / 60:.1f} min per run on average); this invocation took {meta['wall_s'] / 3600:.2f} h.",
    ]


def write_report(runs: Sequence[RunSummary], out_md: Path, out_png: Path, meta: dict[str, Any]) -> Path:
    """Write the learning-curve PNG and the Markdown report of ``runs``."""
    plot_runs([r.run_dir for r in runs], out_png, labels=[r.method for r in runs],
              title="replication: " + ", ".join(dict.fromkeys(r.method for r in runs)) + " (colour = method, one line per seed)")
    comparisons, sentences = comparison_rows(runs)
    lines = ["# Replication on CPU: GRPO, SDPO, CREDIT, RLSD and CREDIT-RLSD", "",
             "Written by `tools/replicate.py` from the runs' metrics files; rerun it to regenerate this page.", "",
             "## Setup and budget", "", *setup_lines(runs, meta)]
    if meta.get("failures"):
        lines += ["", "Runs that FAILED (not in the tables): " + "; ".join(f"{m} seed {s} (log: {log})"
                                                                         for m, s, log in meta["failures"])]
    lines += ["", "## Validation accuracy per method (mean over seeds, 95 % bootstrap CI over seeds)", "",
              *table(["method", "seeds", "final avg@k", "best avg@k", "leaking / all training responses",
                      "s/step (median)", "s/step vs SDPO", "commits"], method_rows(runs)),
              "", "## Paired differences of the final avg@k (same seed: same prompts, validation set, initial model)", "",
              *table(["a - b", "papers' claim", "mean", "95 % CI over seeds", "per seed", "verdict"], comparisons),
              "", "With 3 seeds a bootstrap over seeds is coarse: its interval excludes 0 only when (nearly) every "
              "seed agrees in sign.", "",
              "## Every run", "", *table(["method", "seed", "step-0 avg@k [CI] @ step", "final avg@k [CI] @ step",
                                        "best avg@k [CI] @ step", "leaking / responses", "s/step (median)",
                                        "wall (min)", "commit"], run_rows(runs)),
              "", *initial_validation_check(runs),
              "", f"## Does the teacher know more? (first training step -> mean of the last {LAST_STEPS}; means over seeds)", "",
              *diagnostic_table(runs),
              "", "P(answer): probability of the correct answer at the response's answer position; the log-prob "
              "columns are token means over response tokens (docs/metrics.md).",
              "", "## Diagnostics the papers report", "",
              *table(["claim (source)", "paper", "here"], paper_claim_rows(runs)),
              "", "## What was and was not reproduced", "", *sentences, "", SCOPE, "",
              "## Learning curves", "", f"![learning curves of every run]({out_png.name})", "",
              f"`{out_png.name}`: reward, validation avg@k (band: the run's prompt-bootstrap CI), response length, "
              "entropy, S_t, clip fractions, loss, Delta V_t, seconds per step, the teacher diagnostic "
              "(P(correct answer) of teacher and student, teacher - student log-prob on correct and incorrect "
              "replies) and the truncated fraction; one colour per method, one line per seed.",
              "Token-level credit of any two runs: `megacredit viz RUN_DIR RUN_DIR` (runs under the harness's --runs-dir)."]
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(lines) + "\n")
    return out_md
