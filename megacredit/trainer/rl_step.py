"""One RL step: rollout -> reward -> teacher -> advantage -> train -> sync.

``RLRun`` holds the run's components (built by megacredit.trainer.builder); ``run_step`` is the
algorithm of one step, in the order the papers state it (CREDIT Algorithm 1, RLSD Algorithm 1).
The batch is produced on global rank 0 and broadcast; teacher contexts are built identically on
every rank; pass results live on the last pipeline stage and are reduced for logging.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from megacredit.algorithms.grpo import group_advantages
from megacredit.algorithms.methods import METHODS, Method, token_advantages
from megacredit.algorithms.schedules import LambdaSchedule
from megacredit.config import MegacreditConfig
from megacredit.data.teacher_context import SampleSequences, TeacherContextConfig, build_teacher_contexts
from megacredit.data.templates import stop_token_ids
from megacredit.megatron.actor import StudentResult, TeacherResult
from megacredit.megatron.optimizer import set_learning_rate
from megacredit.megatron.trainer_memory import PARTS
from megacredit.rollout.base import SamplingParams
from megacredit.trainer import rollout as rollout_lib
from megacredit.trainer import step_metrics
from megacredit.trainer.mismatch import engine_mismatch_sums, rollout_is_token_weights
from megacredit.trainer.rollout import RolloutBatch
from megacredit.trainer.run import RLRun
from megacredit.trainer.teacher_diagnostic import answer_probability_sums
from megacredit.trainer.weight_sync import sync_weights
from megacredit.utils.comm import all_gather_objects, broadcast_object
from megacredit.utils.errors import picklable


def teacher_context_config(cfg: MegacreditConfig) -> TeacherContextConfig:
    """How teacher contexts are built for ``cfg.algorithm.name``."""
    method = METHODS[cfg.algorithm.name]
    return TeacherContextConfig(
        mode=method.teacher_context,
        num_contrastive=cfg.algorithm.credit.num_contrastive if method.contrastive_pass else 0,
        solution_content="think_and_solution" if cfg.algorithm.teacher.include_think_trace else "solution",
        feedback_only_without_solution=cfg.algorithm.teacher.feedback_only_without_solution,
        template=cfg.algorithm.teacher.template,
    )


def warmup_lr(lr: float, warmup_steps: int, step: int) -> float:
    """Linear warm-up over the first ``warmup_steps`` steps, then constant."""
    return lr if warmup_steps <= 0 else lr * min(1.0, (step + 1) / warmup_steps)


def release_trainer_memory(run: RLRun, keep_parameters: bool = False) -> None:
    """With ``rollout.offload_trainer_during_rollout``, take this rank's trainer state off the
    device (megacredit/megatron/trainer_memory.py); ``keep_parameters``: all but the
    parameters, which the weight sync's export reads. Restored by :func:`trainer_memory_released`'s
    exit or before a checkpoint is saved."""
    if run.cfg.rollout.offload_trainer_during_rollout:
        parts = [part for part in PARTS if not (keep_parameters and part == "parameters")]
        run.actor.memory.release(parts)


@contextmanager
def trainer_memory_released(run: RLRun):
    """The body (the colocated engine generating, driven by rank 0) runs with every rank's
    trainer state released; each rank restores its own once all ranks are through the body."""
    release_trainer_memory(run)
    try:
        yield
    finally:
        if run.cfg.rollout.offload_trainer_during_rollout:
            broadcast_object(None)  # the engine spans every rank's device: restore when rank 0 is done
        run.actor.memory.restore()


def rollout_and_score(run: RLRun, step: int, prompts: list[dict]) -> RolloutBatch:
    """Generate G responses per prompt and score them (rank 0), then share the batch.

    The engine (one, or an EnginePool splitting the prompts across several) returns its own
    log-probs of every sampled token with the sample (``RolloutBatch.engine_logprobs``); it is
    put to sleep afterwards (colocated engines release memory for training) and woken by the
    next weight sync. Meanwhile the trainer's state is released (:func:`trainer_memory_released`).
    An error on rank 0 (no rollout engine left, ...) is raised on every rank, so none waits for a
    batch that never comes."""
    cfg = run.cfg
    batch, error = None, None
    with trainer_memory_released(run):
        if run.engine is not None:
            params = SamplingParams(
                temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
                max_new_tokens=cfg.rollout.max_new_tokens, stop_token_ids=stop_token_ids(run.tokenizer, cfg.rollout.stop_at_newline),
                n=cfg.algorithm.group_size, seed=rollout_lib.step_seed(cfg.training.seed, step, salt=1),
            )
            try:
                with run.phase("rollout"):
                    batch = rollout_lib.generate(run.engine, run.tokenizer, prompts, params, run.progress)
                    run.engine.sleep()
                with run.phase("reward"):
                    rollout_lib.score(run.env, batch)
            except Exception as exc:  # noqa: BLE001 - e.g. no engine left: every rank stops, none waits below
                error = exc
        batch, shared_error = broadcast_object((batch, picklable(error)))
    if error is not None:
        raise error  # rank 0: the original, with its traceback
    if shared_error is not None:
        raise shared_error
    return batch


def mini_batches(cfg: MegacreditConfig, num_samples: int) -> list[list[int]]:
    """Sample indices of each PPO mini-batch (``ppo_mini_batch_size`` prompts x G samples)."""
    size = cfg.training.ppo_mini_batch_size * cfg.algorithm.group_size
    return [list(range(start, min(start + size, num_samples))) for start in range(0, num_samples, size)]


def sequence_advantages(cfg: MegacreditConfig, batch: RolloutBatch) -> torch.Tensor:
    """[N] GRPO group advantages A_i of the batch's samples (RLSD eq. 1)."""
    return group_advantages(torch.tensor(batch.rewards, dtype=torch.float32), cfg.algorithm.group_size,
                            eps=cfg.algorithm.adv_eps)


def can_take_old_policy_from_training(cfg: MegacreditConfig, num_mini_batches: int) -> bool:
    """True when the old-policy forward is provably redundant, so it is skipped and its results
    are taken from the training forward (``old_policy_from_training`` in the actor): one mini-batch and one PPO epoch (the only optimizer
    step of the step comes after the training forward, so pi_old = pi_theta there, and the
    model has no dropout), and no rollout importance correction (which would need pi_old
    before training). The loss and gradients equal those with the pass
    (tests/distributed/test_old_policy_skip.py)."""
    return (num_mini_batches == 1 and cfg.training.ppo_epochs == 1
            and getattr(cfg.algorithm, "rollout_is", "none") == "none")


def advantage_function(run: RLRun, step: int, batch: RolloutBatch, teacher: dict[int, TeacherResult]):
    """``(indices, student) -> (token advantages {index: [R]}, metric sums)`` for the PPO family;
    per-sample arithmetic, so any subset of the batch gives the same values as the whole."""
    cfg = run.cfg
    seq_adv = sequence_advantages(cfg, batch)
    lam = LambdaSchedule(**vars(cfg.algorithm.rlsd.lam)).value(step)
    settings = run.actor.settings.objective

    def compute(indices, student: dict) -> tuple[dict, dict]:
        lengths = [len(student[i].sampled_logp) for i in indices]
        mask, old_logp, teacher_logp, contrastive = step_metrics.sampled_token_tensors(indices, student, teacher)
        adv, metrics = token_advantages(settings, seq_adv[indices], mask, old_logp, teacher_logp, contrastive, lam)
        device = student[indices[0]].sampled_logp.device
        advantages = {i: adv[row, :length].to(device) for row, (i, length) in enumerate(zip(indices, lengths))}
        return advantages, _advantage_sums(run.method, adv, mask, metrics, lam)

    return compute


def compute_advantages(run: RLRun, step: int, batch: RolloutBatch, student: dict[int, StudentResult],
                       teacher: dict[int, TeacherResult]) -> tuple[dict | None, dict]:
    """Token advantages [R] of the samples whose pass results live on this rank (None: distillation)."""
    if not run.method.is_ppo or not student:
        return ({} if run.method.is_ppo else None), {}
    return advantage_function(run, step, batch, teacher)(sorted(student), student)


def _advantage_sums(method: Method, adv, mask, metrics: dict, lam: float) -> dict:
    """Advantage diagnostics as (sum, count) pairs."""
    names = {"clip_fraction": "train/rlsd_clip_frac", "evidence_mean": method.evidence_metric}
    sums = {names.get(k, f"train/rlsd_{k}"): (float(v), 1.0) for k, v in metrics.items()}
    valid = adv[mask]
    sums["train/advantage_mean"] = (float(valid.sum()), float(valid.numel()))
    sums["train/advantage_std"] = (float(valid.std(correction=0)) * valid.numel(), float(valid.numel()))
    if method.schedules_lambda:
        sums["train/rlsd_lam"] = (lam, 1.0)
    return sums


@dataclass
class StepPasses:
    """What the passes and the update of one step produced (on the ranks that hold it)."""

    student: dict[int, StudentResult]
    """Old-policy results per owned sample (last pipeline stage)."""
    teacher: dict[int, TeacherResult]
    """Teacher / contrastive results per owned sample ({} for GRPO)."""
    advantages: dict[int, torch.Tensor] | None
    """PPO-family token advantages per owned sample (None for distillation methods)."""
    advantage_sums: dict
    """Advantage diagnostics as (sum, count)."""
    train_parts: list
    """Metrics of every mini-batch update."""


def passes_and_update(run: RLRun, step: int, batch: RolloutBatch, samples: list[SampleSequences],
                      old_policy_from_training: bool | None = None) -> StepPasses:
    """Old-policy, teacher and contrastive passes, advantages, and the PPO mini-batch updates.

    ``old_policy_from_training``: skip the old-policy forward and take its results from the
    training forward; None decides with :func:`can_take_old_policy_from_training`, True/False
    force one path (the equality test runs both).
    """
    cfg, actor = run.cfg, run.actor
    batches = mini_batches(cfg, len(batch))
    owned = {i: samples[i] for mb in batches for i in actor.owned(mb)}
    if old_policy_from_training is None:
        old_policy_from_training = can_take_old_policy_from_training(cfg, len(batches))
    with run.phase("teacher"):
        student = {} if old_policy_from_training else actor.old_policy_pass(owned)
        teacher = (actor.teacher_pass(owned, student, old_policy_from_training=old_policy_from_training,
                                      skip_without_signal=run.method.masks_samples_without_signal)
                   if run.method.teacher_pass else {})
    advantage_fn = None
    if old_policy_from_training:  # advantages are computed in the training forward, from its own log-probs
        advantages = {} if run.method.is_ppo else None
        advantage_fn = advantage_function(run, step, batch, teacher) if advantages is not None else None
    else:
        advantages, advantage_sums = compute_advantages(run, step, batch, student, teacher)
    # Truncated IS for the engine/trainer mismatch needs pi_old before training (never from training).
    is_weights, is_sums = rollout_is_token_weights(cfg.algorithm.rollout_is, cfg.algorithm.rollout_is_cap,
                                                   sorted(student), student, batch.engine_logprobs)
    with run.phase("train"):
        train_parts = [actor.train_mini_batch(mb, samples, student, teacher, advantages, token_weights=is_weights,
                                              old_policy_from_training=old_policy_from_training,
                                              advantage_fn=advantage_fn)
                       for _ in range(cfg.training.ppo_epochs) for mb in batches]
        actor.after_training_step(step + 1)
    if old_policy_from_training:  # the diagnostics of the advantages the loss used (same arithmetic)
        advantage_sums = compute_advantages(run, step, batch, student, teacher)[1]
    return StepPasses(student, teacher, advantages, {**advantage_sums, **is_sums}, train_parts)


def run_step(run: RLRun, step: int, prompts: list[dict]) -> dict[str, Any]:
    """One training step; returns the metrics (complete on global rank 0)."""
    cfg, actor = run.cfg, run.actor
    run.timings = {}
    lr = warmup_lr(cfg.optimizer.lr, cfg.optimizer.warmup_steps, step)
    set_learning_rate(actor.optimizer, lr)
    step_start = time.perf_counter()
    batch = rollout_and_score(run, step, prompts)
    with run.phase("teacher"):
        samples = build_teacher_contexts(
            run.tokenizer, batch.records, batch.group_ids, batch.response_ids, batch.rewards, batch.feedbacks,
            teacher_context_config(cfg), seed=rollout_lib.step_seed(cfg.training.seed, step, salt=2),
            response_texts=batch.response_texts)
    with run.phase("diagnostic"):  # before the update: the weights that sampled this batch
        diagnostic_sums = answer_probability_sums(run, batch, samples)
    passes = passes_and_update(run, step, batch, samples)
    with run.phase("sync"):
        release_trainer_memory(run, keep_parameters=True)  # before the engine wakes
        sync_metrics = sync_weights(run)
    metrics = collect_metrics(run, step, batch, samples, passes.student, passes.teacher, passes.advantages,
                              {**passes.advantage_sums, **diagnostic_sums}, passes.train_parts,
                              time.perf_counter() - step_start)
    if not metrics:
        return metrics
    return {**metrics, **sync_metrics, **(run.engine.fault_metrics() if run.engine else {}), "train/lr": lr}


def peak_memory_gb() -> float:
    """Peak resident memory of this process (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reduce_train_metrics(per_rank: list[list[dict[str, float]]]) -> dict[str, float]:
    """Combine the reporting ranks' per-mini-batch metrics: ``train/loss`` is summed over the
    data-parallel ranks (each holds its share of the global loss), then everything is averaged
    over mini-batches."""
    if not per_rank:
        return {}
    merged: dict[str, list[float]] = {}
    for position in range(len(per_rank[0])):
        parts = [rank_parts[position] for rank_parts in per_rank]
        for name in {key for part in parts for key in part}:
            values = [part[name] for part in parts if name in part]
            value = sum(values) if name == "train/loss" else sum(values) / len(values)
            merged.setdefault(name, []).append(value)
    return {name: sum(values) / len(values) for name, values in merged.items()}


def collect_metrics(run: RLRun, step, batch, samples, student, teacher, advantages, extra_sums,
                    train_parts, step_time) -> dict[str, Any]:
    """Reduce the step's diagnostics from the ranks that hold them to global rank 0
    (``extra_sums``: (sum, count) metrics computed during the step: advantages, diagnostic)."""
    ctx = run.ctx
    reporter = ctx.is_last_stage and ctx.tp_rank == 0
    local: dict[str, Any] = {"sums": {}, "train": [], "per_token": {}, "adv": {}}
    if reporter:
        indices = sorted(student)
        if teacher:
            sums, local["per_token"] = step_metrics.teacher_metrics(
                indices, student, teacher, [samples[i].has_teacher_signal for i in indices],
                run.actor.settings.objective, sequence_advantages(run.cfg, batch)[indices],
                correct=[batch.rewards[i] >= 1.0 for i in indices])
            local["sums"].update(sums)
        local["sums"].update(step_metrics.entropy_sums(indices, student))
        local["sums"].update(engine_mismatch_sums(indices, student, batch.engine_logprobs))
        local["sums"].update(extra_sums)
        local["train"] = train_parts
        local["adv"] = {i: advantages[i].tolist() for i in indices} if advantages else {}
    parts = all_gather_objects(local)
    if not run.is_logger:
        return {}
    metrics = step_metrics.rollout_metrics(batch, run.cfg.algorithm.group_size)
    metrics.update(step_metrics.combine_sums([p["sums"] for p in parts]))
    metrics.update(reduce_train_metrics([p["train"] for p in parts if p["train"]]))
    tokens = sum(len(ids) for ids in batch.prompt_ids) + sum(len(ids) for ids in batch.response_ids)
    metrics.update(run.timings, **{"perf/time_step": step_time, "perf/tokens_per_s": tokens / step_time,
                                   "perf/peak_memory_gb": peak_memory_gb()})
    per_token = {k: v for p in parts for k, v in p["per_token"].items()}
    adv = {k: v for p in parts for k, v in p["adv"].items()}
    metrics["_token_credit"] = step_metrics.token_credit_samples(
        batch, run.tokenizer, per_token or {i: {} for i in adv}, adv, run.cfg.logging.token_credit_samples)
    return metrics
