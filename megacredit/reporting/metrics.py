"""Metrics logging: JSONL, TensorBoard, Weights & Biases (optional) and the console.

Every metric name carries a namespace (``rollout/``, ``train/``, ``teacher/``, ``perf/``,
``val/``, ``sync/``, ``moe/``); the names the training loop emits are listed in :data:`DOCUMENTED_METRICS` and
explained in docs/metrics.md. Per-token credit of a few samples per step goes to
``<run_dir>/token_credit.jsonl`` through :func:`save_token_credit`.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

METRIC_NAMESPACES = ("rollout", "train", "teacher", "perf", "val", "sync", "moe")
"""Allowed first components of a metric name."""
METRICS_FILE = "metrics.jsonl"
TOKEN_CREDIT_FILE = "token_credit.jsonl"
TENSORBOARD_DIR = "tensorboard"
logger = logging.getLogger(__name__)

DOCUMENTED_METRICS: dict[str, str] = {
    # rollout/: the sampled batch and its rewards
    "rollout/reward_mean": "mean environment reward over all rollouts of the step",
    "rollout/reward_std": "standard deviation of the rewards over all rollouts",
    "rollout/response_length_mean": "mean response length in tokens",
    "rollout/response_length_max": "longest response in tokens",
    "rollout/truncated_frac": "fraction of responses stopped by max_new_tokens (no EOS)",
    "rollout/group_all_correct_frac": "fraction of groups whose G rollouts all have reward 1",
    "rollout/group_all_wrong_frac": "fraction of groups whose G rollouts all have reward 0",
    "rollout/leakage_count": "responses that mention privileged information (RLSD sec. 3.1)",
    "rollout/logprob_abs_diff": "mean |log pi_old - log pi_engine| over sampled tokens (engine/trainer mismatch)",
    "rollout/engine_kl": "KL(pi_engine || pi_old) on the sampled tokens, k3 estimator exp(r) - 1 - r, r = log pi_old - log pi_engine",
    "rollout/engine_kl_k1": "KL(pi_engine || pi_old) on the sampled tokens, k1 estimator -r (unbiased, may be negative)",
    "rollout/engine_faults": "engine faults survived since the previous step's metrics (a remote server that died or hung during this step's rollout or weight sync, or a validation before it); each is logged with the engine and cause (docs/reliability.md); remote vLLM, and remote SGLang without a router",
    "rollout/engines_serving": "remote engines serving at the end of the step (a failed one is left out until it answers its health check at a weight sync); remote vLLM, and remote SGLang without a router",
    # train/: the policy update
    "train/loss": "total loss of the step (mean over mini-batches)",
    "train/entropy": "token entropy of the behaviour policy renormalised on its top-K set (the full-vocabulary entropy is never materialised)",
    "train/advantage_mean": "mean token advantage over response tokens",
    "train/advantage_std": "standard deviation of the token advantages (per data-parallel replica, token-weighted mean over replicas)",
    "train/ppo_clip_frac": "fraction of tokens whose PPO ratio was clipped",
    "train/rlsd_clip_frac": "fraction of evidence weights w_t clipped (RLSD; paper 3-6 %)",
    "train/rlsd_lam": "RLSD mixing coefficient lambda at this step",
    "train/grad_norm": "global gradient norm before clipping",
    "train/lr": "learning rate",
    "train/rollout_is_weight_mean": "mean truncated rollout IS weight over trained tokens (algorithm.rollout_is)",
    "train/rollout_is_clip_frac": "fraction of trained tokens whose rollout IS weight hit algorithm.rollout_is_cap",
    # teacher/: the self-teacher's signal (CREDIT section 3)
    "teacher/s_t": "input-specific signal S_t on the sampled token, token mean (CREDIT)",
    "teacher/delta_v": "realised Delta V_t = r_t(y_t) on the sampled token, token mean",
    "teacher/seq_pmi": "sequence sum of Delta V_t (pMI estimate, eq. 4), mean over samples",
    "teacher/seq_s": "sequence sum of S_t (contrastive pMI, eq. 9), mean over samples",
    "teacher/contrastive_std": "std of the C contrastive log-probs on the sampled token",
    "teacher/rlsd_delta": "RLSD evidence Delta_t on the sampled token, token mean (eq. 13)",
    "teacher/s_t_hybrid": "CREDIT-RLSD: the evidence S_t inside the RLSD weight, token mean",
    "teacher/topk_kl": "divergence of student and teacher on the top-K set, token mean",
    "teacher/signal_frac": "fraction of samples with a teacher signal (solution or feedback)",
    "teacher/delta_v_correct": "teacher minus student log-prob of the sampled token on correct responses, token mean",
    "teacher/delta_v_incorrect": "teacher minus student log-prob of the sampled token on incorrect responses, token mean",
    "teacher/answer_prob_teacher": "the teacher's probability of the correct answer at the response's answer position "
                                   "(logging.teacher_diagnostic_samples; environments that locate the answer)",
    "teacher/answer_prob_student": "the student's probability of the correct answer at the same position",
    "teacher/answer_prob_gain": "teacher/answer_prob_teacher - teacher/answer_prob_student: > 0 when the teacher knows more",
    # perf/: throughput and time per phase (seconds)
    "perf/tokens_per_s": "trained tokens (prompt + response) per second of the step",
    "perf/time_step": "wall time of the whole step",
    "perf/time_rollout": "generation time",
    "perf/time_reward": "environment scoring time",
    "perf/time_teacher": "teacher, contrastive and old-policy forward passes",
    "perf/time_train": "forward/backward and optimizer steps",
    "perf/time_sync": "weight sync to the rollout engine and teacher update",
    "perf/time_diagnostic": "the teacher diagnostic's probes (teacher/answer_prob_*)",
    "perf/time_val": "validation time (steps that validate)",
    "perf/peak_memory_gb": "peak resident memory of the process",
    "perf/page_faults": "minor page faults of the logging process during the step (megacredit/utils/malloc.py: "
                        "whether the malloc tuning saves them is the kernel's choice; one warning when it does not)",
    # sync/: the weight sync into the rollout engine(s), every step
    "sync/bytes": "bytes of HF tensors exported to the engine(s) this step",
    "sync/seconds": "wall time of the export and the engines' loading",
    "sync/gb_per_s": "sync/bytes / sync/seconds in GB/s (1e9 bytes)",
    "sync/peak_extra_gb": "peak extra memory the export's own buffers held (GB)",
    "sync/probe_logprob_diff": "steps whose sync was checked: mean |engine - trainer| log-prob of the probe (worst engine)",
    # moe/: mixture-of-experts models, from the step's training forwards (mean over its mini-batches)
    "moe/load_balancing_loss": "Megatron's switch load-balancing loss (without its coefficient), mean over MoE "
                               "layers and training micro-batches; 1 = balanced (model.moe_aux_loss_coeff > 0)",
    "moe/expert_load_max": "tokens of the busiest expert / the mean per expert, mean over MoE layers (1 = balanced)",
    "moe/expert_load_min": "tokens of the idlest expert / the mean per expert, mean over MoE layers (0 = an unused expert)",
    # val/: periodic evaluation (avg@k with a bootstrap CI over prompts)
    "val/avg_at_k": "mean over prompts of the mean reward of k samples",
    "val/avg_at_k_ci_low": "lower bound of the bootstrap CI of avg@k",
    "val/avg_at_k_ci_high": "upper bound of the bootstrap CI of avg@k",
    "val/pass_at_k": "unbiased pass@k over prompts",
    "val/response_length_mean": "mean validation response length in tokens",
    "val/num_prompts": "validation prompts used",
}
"""Metrics the training loop emits, with a one-line meaning (mirrored in docs/metrics.md)."""

CONSOLE_KEYS = ("rollout/reward_mean", "train/loss", "val/avg_at_k", "perf/tokens_per_s")
"""Metrics shown next to the progress bar."""


def check_metric_name(name: str) -> None:
    """Raise ValueError unless ``name`` is ``<namespace>/<rest>`` with a known namespace."""
    namespace, sep, rest = str(name).partition("/")
    if not sep or not rest or namespace not in METRIC_NAMESPACES:
        raise ValueError(
            f"metric name '{name}' has no known namespace; prefix it with one of "
            f"{', '.join(ns + '/' for ns in METRIC_NAMESPACES)} (e.g. 'train/{rest or name}')"
        )


def to_float(name: str, value: Any) -> float:
    """A float from a Python/NumPy number or a one-element tensor; errors name the metric."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real):
        return float(value)
    item = getattr(value, "item", None)
    if item is not None and getattr(value, "numel", lambda: getattr(value, "size", 1))() == 1:
        return float(item())
    raise TypeError(f"metric '{name}' must be a number, got {type(value).__name__}: {value!r}")


def _json_number(value: float) -> Any:
    """Keep JSON strict: NaN/inf become strings."""
    return value if math.isfinite(value) else str(value)


class MetricsLogger:
    """Log namespaced scalar metrics per step to JSONL, TensorBoard, W&B and the console.

    Create it on one process only (global rank 0) in distributed runs; reduce metrics first.

    ``resume_from_step``: None starts a new run (an existing ``metrics.jsonl``,
    ``token_credit.jsonl`` and TensorBoard event files in ``run_dir`` are removed). An int resumes from a checkpoint taken
    at that step: records with a larger step (logged after the checkpoint, before the crash)
    and a half-written last line are dropped, TensorBoard events after that step are purged,
    and new records are appended.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        jsonl: bool = True,
        tensorboard: bool = True,
        wandb: bool = False,
        console: bool = True,
        total_steps: int | None = None,
        resume_from_step: int | None = None,
        wandb_project: str = "megacredit",
        wandb_entity: str | None = None,
        run_config: Mapping[str, Any] | None = None,
        rich_console: Any = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.total_steps = total_steps
        self.history: list[tuple[int, dict[str, float]]] = []
        self.resume_from_step = resume_from_step
        _truncate_jsonl(self.run_dir / TOKEN_CREDIT_FILE, resume_from_step)
        self._jsonl_file = self._open_jsonl(resume_from_step) if jsonl else None
        self._tb_writer = self._open_tensorboard(resume_from_step) if tensorboard else None
        self._wandb_run = (
            self._open_wandb(wandb_project, wandb_entity, run_config) if wandb else None
        )
        self._console = None
        if console:
            from megacredit.reporting.console import ConsoleReporter

            # One rich console for the step bar and the progress bars of the phases (they nest).
            self._console = ConsoleReporter(total_steps, start_step=resume_from_step or 0, console=rich_console)
        self._closed = False

    @classmethod
    def from_config(cls, cfg: Any, total_steps: int | None = None,
                    resume_from_step: int | None = None, rich_console: Any = None) -> "MetricsLogger":
        """A logger set up from a ``MegacreditConfig``'s ``logging`` section; ``rich_console``:
        the console the progress reporter draws on, if any (shared with the step bar)."""
        from megacredit.config import config_to_dict

        log = cfg.logging
        return cls(log.run_dir, jsonl=log.jsonl, tensorboard=log.tensorboard, wandb=log.wandb,
                   console=log.console, total_steps=total_steps,
                   resume_from_step=resume_from_step, wandb_project=log.wandb_project,
                   wandb_entity=log.wandb_entity, run_config=config_to_dict(cfg), rich_console=rich_console)

    # -- sinks -----------------------------------------------------------------------
    def _open_jsonl(self, resume_from_step: int | None):
        path = self.run_dir / METRICS_FILE
        _truncate_jsonl(path, resume_from_step)
        return open(path, "a", buffering=1)

    def _open_tensorboard(self, resume_from_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        log_dir = self.run_dir / TENSORBOARD_DIR
        if resume_from_step is None and log_dir.is_dir():
            for old in log_dir.glob("events.out.tfevents.*"):
                old.unlink()
        purge = None if resume_from_step is None else resume_from_step + 1
        return SummaryWriter(log_dir=str(log_dir), purge_step=purge)

    @staticmethod
    def _open_wandb(project: str, entity: str | None, run_config: Mapping[str, Any] | None):
        try:
            import wandb  # noqa: PLC0415 (optional dependency)
        except ImportError:
            warnings.warn(
                "logging.wandb is true but the 'wandb' package is not installed; W&B logging "
                "is off. Install it with `pip install wandb` (or the [wandb] extra).",
                stacklevel=3,
            )
            return None
        return wandb.init(project=project, entity=entity, config=dict(run_config or {}))

    # -- public API ------------------------------------------------------------------
    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Log ``metrics`` (name -> number) for ``step``; returns the floats written."""
        if self._closed:
            raise RuntimeError("MetricsLogger.log called after close()")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        values: dict[str, float] = {}
        for name, value in metrics.items():
            check_metric_name(name)
            values[name] = to_float(name, value)
        self.history.append((step, values))
        if self._jsonl_file is not None:
            record = {"step": step, "time": time.time()}
            record.update({k: _json_number(v) for k, v in values.items()})
            self._jsonl_file.write(json.dumps(record) + "\n")
            self._jsonl_file.flush()
        if self._tb_writer is not None:
            for name, value in values.items():
                self._tb_writer.add_scalar(name, value, global_step=step)
            self._tb_writer.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)
        if self._console is not None:
            self._console.update(step, values)
        return values

    def save_token_credit(self, step: int, samples: Iterable[Mapping[str, Any]]) -> Path:
        """:func:`save_token_credit` into this logger's run directory."""
        return save_token_credit(self.run_dir, step, samples)

    def latest(self, name: str) -> float | None:
        """The most recently logged value of ``name`` (None if never logged)."""
        for _, values in reversed(self.history):
            if name in values:
                return values[name]
        return None

    def series(self, name: str) -> list[tuple[int, float]]:
        """All ``(step, value)`` pairs of ``name`` logged by this logger."""
        return [(step, values[name]) for step, values in self.history if name in values]

    def summary_rows(self) -> list[tuple[str, str]]:
        """Rows of the end-of-run summary: validation before/after with CIs, phase times."""
        from megacredit.reporting.console import summary_rows

        return summary_rows(self.history)

    def close(self, print_summary: bool = True, extra_rows: Sequence[tuple[str, str]] = ()) -> None:
        """Flush and close every sink; print the summary table on the console."""
        if self._closed:
            return
        self._closed = True
        if self._console is not None:
            self._console.finish(self.summary_rows() + list(extra_rows) if print_summary else None)
        if self._jsonl_file is not None:
            self._jsonl_file.close()
        if self._tb_writer is not None:
            self._tb_writer.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(print_summary=exc[0] is None)


def _truncate_jsonl(path: Path, keep_up_to_step: int | None) -> None:
    """Empty ``path`` (None) or keep only its records with step <= ``keep_up_to_step``."""
    if not path.exists():
        return
    kept = [] if keep_up_to_step is None else [
        rec for rec in read_metrics(path) if rec["step"] <= keep_up_to_step
    ]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as out:
        out.write("".join(json.dumps(rec) + "\n" for rec in kept))
    os.replace(tmp, path)


def _line_problem(record: Any) -> str | None:
    if not isinstance(record, dict):
        return f"is a JSON {type(record).__name__}, not an object"
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        return f"has no integer 'step' (got {step!r})"
    return None


def _token_credit_problem(record: Any) -> str | None:
    problem = _line_problem(record)
    if problem is not None:
        return problem
    tokens, credit = record.get("tokens"), record.get("credit", {})
    if not isinstance(tokens, list):
        return "has no 'tokens' list"
    if not isinstance(credit, dict) or not all(isinstance(v, list) and len(v) == len(tokens)
                                               for v in credit.values()):
        return "has a 'credit' that is not a mapping of one value per token"
    return None


def read_metrics(path: str | os.PathLike, skip_invalid: bool = False,
                 _problem: Callable[[Any], str | None] = _line_problem) -> list[dict[str, Any]]:
    """Records of a metrics JSONL file; a half-written (unparsable) last line is skipped.

    ``skip_invalid``: also skip malformed lines elsewhere (not JSON, not an object, no integer
    ``step``) and log one warning with their count and the first one, as the data loaders do;
    without it such a line raises ValueError naming the file and line.
    """
    records: list[dict[str, Any]] = []
    skipped: list[str] = []
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if index == len(lines) - 1:
                break  # crash mid-write: drop the partial line
            problem = "is not valid JSON"
        else:
            problem = _problem(record)
        if problem is None:
            records.append(record)
        elif skip_invalid:
            skipped.append(f"line {index + 1} {problem}")
        else:
            raise ValueError(f"{path}: line {index + 1} {problem}")
    if skipped:
        logger.warning("%s: skipped %d malformed line(s); first: %s", path, len(skipped), skipped[0])
    return records


def _per_token_list(sample_index: int, key: str, values: Any, length: int) -> list[float]:
    if hasattr(values, "tolist"):
        values = values.tolist()
    values = [float(v) for v in values]
    if len(values) != length:
        raise ValueError(
            f"token-credit sample {sample_index}: '{key}' has {len(values)} values but the "
            f"sample has {length} tokens"
        )
    return [_json_number(v) for v in values]


def _token_ids(sample_index: int, ids: Any, length: int) -> list[int]:
    ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
    if len(ids) != length:
        raise ValueError(f"token-credit sample {sample_index}: 'token_ids' has {len(ids)} ids but the "
                         f"sample has {length} tokens")
    return ids


def save_token_credit(
    run_dir: str | os.PathLike, step: int, samples: Iterable[Mapping[str, Any]]
) -> Path:
    """Append per-token credit of a few samples to ``<run_dir>/token_credit.jsonl``.

    Each sample is a mapping with ``tokens`` (list of token strings), optionally
    ``token_ids`` (the same tokens' vocabulary ids, kept as ints), and any number of
    per-token series of the same length (e.g. ``s_t``, ``delta_v``, ``advantage``); other
    scalar or string entries (``reward``, ``prompt``, ``feedback``) are kept as metadata.
    One JSON line per sample:
    ``{"step", "sample", "tokens", "token_ids", "credit": {series: [...]}, ...}``.
    """
    path = Path(run_dir) / TOKEN_CREDIT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, sample in enumerate(samples):
        tokens = sample.get("tokens")
        if tokens is None or isinstance(tokens, str):
            raise ValueError(f"token-credit sample {index}: 'tokens' must be a list of strings")
        tokens = [str(t) for t in tokens]
        record: dict[str, Any] = {"step": int(step), "sample": index, "tokens": tokens}
        credit: dict[str, list[float]] = {}
        for key, value in sample.items():
            if key == "tokens":
                continue
            if key == "token_ids":
                record[key] = _token_ids(index, value, len(tokens))
                continue
            if isinstance(value, (str, numbers.Real)) or value is None:
                record[key] = value
            else:
                credit[key] = _per_token_list(index, key, value, len(tokens))
        record["credit"] = credit
        lines.append(json.dumps(record))
    with open(path, "a") as out:
        out.write("".join(line + "\n" for line in lines))
    return path


def read_token_credit(path: str | os.PathLike, skip_invalid: bool = False) -> list[dict[str, Any]]:
    """Records written by :func:`save_token_credit` (``skip_invalid``: as :func:`read_metrics`)."""
    return read_metrics(path, skip_invalid, _token_credit_problem)
