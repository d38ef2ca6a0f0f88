"""The Megatron actor: old-policy, teacher and contrastive passes, and the PPO-style update.

One instance per rank holds this rank's model chunks (any TP x PP, DDP over DP), the Megatron
optimizer and the self-teacher weights. Every pass runs packed micro-batches through Megatron's
schedules (megacredit.megatron.rl_passes); per-sample results live on the last pipeline stage,
which is also where the loss is computed, so nothing of size [T, V] ever moves.

Data-parallel split: sample ``j`` of every mini-batch belongs to DP rank ``j % dp``. All ranks
hold the whole rollout batch (token ids, rewards, contexts), so global loss denominators are
computed locally and identically everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from megacredit.data.teacher_context import SampleSequences
from megacredit.megatron.distributed import ParallelContext
from megacredit.megatron.optimizer import optimizer_step, zero_grads
from megacredit.megatron.rl_passes import VocabHead, run_packed_schedule
from megacredit.megatron.teacher import TeacherWeights
from megacredit.trainer.objective import (
    MicroBatchInputs,
    ObjectiveSettings,
    loss_mask_denominator,
    micro_batch_loss,
    pad_per_sample,
    response_mask,
)
from megacredit.trainer.packing import PackedMicroBatch, SequenceToPack, pack_sequences, split_per_sequence


@dataclass(frozen=True)
class ActorSettings:
    """How the actor forms micro-batches and what the passes compute."""

    objective: ObjectiveSettings
    """The method and its loss hyperparameters."""
    top_k: int = 20
    """K of the distillation set (CREDIT: 20 code, 100 science/tool)."""
    topk_source: str = "teacher"
    """Whose top-K ids form the set: "teacher" (CREDIT) or "student" (public SDPO code)."""
    token_budget: int = 4096
    """Tokens per packed micro-batch (parallel.micro_batch_tokens)."""
    chunk_size: int = 1024
    """Response positions per chunk of the vocab-parallel top-K computation."""
    pad_token_id: int = 0
    """Token used for the packed row's tail padding."""


@dataclass
class StudentResult:
    """Old-policy pass, one sample (last pipeline stage)."""

    sampled_logp: torch.Tensor
    """[R] log pi_old(y_t)."""
    topk_ids: torch.Tensor
    """[R, K] the student's top-K ids (the distillation set when topk_source="student")."""
    topk_logp: torch.Tensor
    """[R, K] their log-probs (diagnostics: top-K entropy)."""


@dataclass
class TeacherResult:
    """Teacher and contrastive passes, one sample (last pipeline stage)."""

    set_ids: torch.Tensor
    """[R, K] ids of the distillation set."""
    topk_logp: torch.Tensor
    """[R, K] log pi_ref(v | x, y<t, z) on the set."""
    sampled_logp: torch.Tensor
    """[R] log pi_ref(y_t | x, y<t, z)."""
    contrastive_topk_logp: torch.Tensor
    """[C, R, K] log pi_ref(v | x'_k, y<t, z) on the same set (C may be 0)."""
    contrastive_sampled_logp: torch.Tensor
    """[C, R] log pi_ref(y_t | x'_k, y<t, z)."""


def _sequence(key: tuple, ids: Sequence[int], response_length: int) -> SequenceToPack:
    return SequenceToPack(key, tuple(ids), len(ids) - response_length)


class MegatronActor:
    """This rank's part of the policy, its teacher and its optimizer."""

    def __init__(self, model_chunks: list[torch.nn.Module], optimizer, teacher: TeacherWeights | None,
                 ctx: ParallelContext, settings: ActorSettings) -> None:
        self.model_chunks, self.optimizer, self.teacher = model_chunks, optimizer, teacher
        self.ctx, self.settings = ctx, settings
        self.head = VocabHead(model_chunks, settings.chunk_size)

    # ----------------------------------------------------------------------------- helpers
    def owned(self, indices: Sequence[int]) -> list[int]:
        """The samples of ``indices`` (one mini-batch) this DP rank trains on."""
        return [index for j, index in enumerate(indices) if j % self.ctx.dp_size == self.ctx.dp_rank]

    def _pack(self, groups: list[list[SequenceToPack]]) -> list[PackedMicroBatch]:
        budget = self.settings.token_budget
        pad = budget if self.ctx.pp_size > 1 else 1  # stages exchange fixed-shape activations
        return pack_sequences(groups, budget, pad_to_multiple=pad, pad_token_id=self.settings.pad_token_id)

    def _forward_only(self, groups: list[list[SequenceToPack]], callback) -> dict:
        for chunk in self.model_chunks:
            chunk.eval()
        merged: dict = {}
        for result in run_packed_schedule(self.model_chunks, self._pack(groups), callback, forward_only=True):
            merged.update(result)
        return merged

    # ----------------------------------------------------------------------------- passes
    def old_policy_pass(self, samples: dict[int, SampleSequences]) -> dict[int, StudentResult]:
        """log pi_old of the sampled tokens and the student's top-K, with the current weights."""
        groups = [[_sequence(("s", i), s.student_ids, s.response_length)] for i, s in samples.items()]

        def collect(hidden: torch.Tensor, micro_batch: PackedMicroBatch) -> dict:
            out = self.head(hidden, k=self.settings.top_k, sampled_ids=micro_batch.target_ids.to(hidden.device))
            sampled = split_per_sequence(out.sampled_logprobs, micro_batch)
            ids, logp = split_per_sequence(out.topk_ids, micro_batch), split_per_sequence(out.topk_logprobs, micro_batch)
            return {key[1]: StudentResult(sampled[key], ids[key], logp[key]) for key in micro_batch.keys}

        return self._forward_only(groups, collect)

    def score_sequences(self, sequences: Sequence[Sequence[int]]) -> dict[int, torch.Tensor]:
        """log pi(s[t] | s[:t]), t >= 1, of each sequence with the current weights: the trainer's
        side of the weight-sync probe. Results on the last pipeline stage ({} elsewhere)."""
        groups = [[_sequence(("p", i), ids, len(ids) - 1)] for i, ids in enumerate(sequences)]

        def collect(hidden: torch.Tensor, micro_batch: PackedMicroBatch) -> dict:
            out = self.head(hidden, sampled_ids=micro_batch.target_ids.to(hidden.device))
            sampled = split_per_sequence(out.sampled_logprobs, micro_batch)
            return {key[1]: sampled[key] for key in micro_batch.keys}

        return self._forward_only(groups, collect)

    def teacher_pass(self, samples: dict[int, SampleSequences],
                     student: dict[int, StudentResult] | None = None) -> dict[int, TeacherResult]:
        """Teacher and its C contrastive sequences of each sample, in one micro-batch, with the
        teacher weights swapped into the policy's modules (restored bit-exactly afterwards)."""
        use_student_set = self.settings.topk_source == "student"
        if use_student_set and student is None:
            raise ValueError("topk_source='student' needs the old-policy pass results")
        groups = [
            [_sequence(("t", i), s.teacher_ids, s.response_length)]
            + [_sequence(("c", i, k), ids, s.response_length) for k, ids in enumerate(s.contrastive_ids)]
            for i, s in samples.items()
        ]

        def collect(hidden: torch.Tensor, micro_batch: PackedMicroBatch) -> dict:
            return self._collect_teacher(hidden, micro_batch, student if use_student_set else None)

        if self.teacher is None:
            return self._forward_only(groups, collect)
        with self.teacher.swapped_in(self.model_chunks):
            return self._forward_only(groups, collect)

    def _collect_teacher(self, hidden, micro_batch: PackedMicroBatch, student) -> dict[int, TeacherResult]:
        rows = torch.split(hidden, micro_batch.response_lengths)
        targets = torch.split(micro_batch.target_ids.to(hidden.device), micro_batch.response_lengths)
        by_key = {key: (row, target) for key, row, target in zip(micro_batch.keys, rows, targets)}
        results: dict[int, TeacherResult] = {}
        for key in micro_batch.keys:
            if key[0] != "t":
                continue
            index = key[1]
            row, target = by_key[key]
            if student is None:
                out = self.head(row, k=self.settings.top_k, sampled_ids=target)
                set_ids, set_logp = out.topk_ids, out.topk_logprobs
            else:
                set_ids = student[index].topk_ids.to(row.device)
                out = self.head(row, gather_ids=set_ids, sampled_ids=target)
                set_logp = out.gathered_logprobs
            contrastive = [by_key[c] for c in micro_batch.keys if c[0] == "c" and c[1] == index]
            c_outs = [self.head(c_row, gather_ids=set_ids, sampled_ids=c_target) for c_row, c_target in contrastive]
            empty_k = set_logp.new_zeros((0, *set_logp.shape))
            results[index] = TeacherResult(
                set_ids=set_ids, topk_logp=set_logp, sampled_logp=out.sampled_logprobs,
                contrastive_topk_logp=torch.stack([o.gathered_logprobs for o in c_outs]) if c_outs else empty_k,
                contrastive_sampled_logp=(torch.stack([o.sampled_logprobs for o in c_outs]) if c_outs
                                          else out.sampled_logprobs.new_zeros((0, len(target)))),
            )
        return results

    # ----------------------------------------------------------------------------- training
    def train_mini_batch(self, mini_batch: Sequence[int], samples: dict[int, SampleSequences],
                         student: dict[int, StudentResult], teacher: dict[int, TeacherResult],
                         advantages: dict[int, torch.Tensor] | None,
                         token_weights: dict[int, torch.Tensor] | None = None) -> dict[str, float]:
        """One optimizer step on one mini-batch (all DP ranks together); returns metrics.
        ``token_weights``: per-sample [R] rollout IS weights multiplying the token losses."""
        objective = self.settings.objective
        denominator = max(loss_mask_denominator(
            objective, [samples[i].response_length for i in mini_batch],
            [samples[i].has_teacher_signal for i in mini_batch]), 1.0)
        owned = self.owned(mini_batch)
        groups = [[_sequence(("s", i), samples[i].student_ids, samples[i].response_length)] for i in owned]

        def loss_callback(hidden: torch.Tensor, micro_batch: PackedMicroBatch):
            indices = [key[1] for key in micro_batch.keys]
            set_ids = (torch.cat([teacher[i].set_ids for i in indices]).to(hidden.device)
                       if objective.uses_teacher_topk else None)
            out = self.head(hidden, gather_ids=set_ids, sampled_ids=micro_batch.target_ids.to(hidden.device))
            inputs = self._micro_batch_inputs(indices, micro_batch, out, samples, student, teacher, advantages)
            if token_weights is not None:
                inputs.token_weights = pad_per_sample([token_weights[i] for i in indices])
            terms = micro_batch_loss(objective, inputs)
            loss_share = terms.numerator / denominator
            return loss_share, {**terms.metrics, "loss": loss_share.detach()}

        for chunk in self.model_chunks:
            chunk.train()
        zero_grads(self.model_chunks, self.optimizer)
        outputs = run_packed_schedule(self.model_chunks, self._pack(groups), loss_callback,
                                      forward_only=False, dp_size=self.ctx.dp_size)
        step = optimizer_step(self.optimizer)
        if self.teacher is not None:
            self.teacher.after_optimizer_step(self.model_chunks)
        metrics = _mean_metrics(outputs)
        metrics.update({"train/grad_norm": step.grad_norm or 0.0})
        return metrics

    def _micro_batch_inputs(self, indices, micro_batch, out, samples, student, teacher, advantages) -> MicroBatchInputs:
        lengths = micro_batch.response_lengths
        sampled = torch.split(out.sampled_logprobs, lengths)
        objective = self.settings.objective
        inputs = MicroBatchInputs(
            mask=response_mask(lengths).to(out.sampled_logprobs.device),
            logp=pad_per_sample(sampled),
            old_logp=pad_per_sample([student[i].sampled_logp for i in indices]),
            has_teacher_signal=torch.tensor([samples[i].has_teacher_signal for i in indices]),
        )
        if advantages is not None:
            inputs.token_advantages = pad_per_sample([advantages[i] for i in indices])
        if objective.uses_teacher_topk:
            inputs.student_topk_logp = pad_per_sample(torch.split(out.gathered_logprobs, lengths))
            inputs.teacher_topk_logp = pad_per_sample([teacher[i].topk_logp for i in indices])
            num_contrastive = teacher[indices[0]].contrastive_topk_logp.shape[0]
            inputs.contrastive_topk_logp = torch.stack([
                pad_per_sample([teacher[i].contrastive_topk_logp[c] for i in indices]) for c in range(num_contrastive)
            ]) if num_contrastive else None
        return inputs

    def after_training_step(self, step: int) -> None:
        """Hard-copy teacher sync (RLSD) at the end of a training step."""
        if self.teacher is not None:
            self.teacher.after_training_step(self.model_chunks, step)


LOSS_METRIC_NAMES = {
    "clip_fraction": "train/ppo_clip_frac",  # grpo.ppo_clip_loss
    "divergence_mean": "teacher/topk_kl",  # sdpo / credit / opsd: student-teacher divergence on top-K
}
"""Names in docs/metrics.md of the loss functions' diagnostics; others are logged as train/<name>."""


def _mean_metrics(outputs: list) -> dict[str, float]:
    """Average the per-micro-batch metric dicts the last stage collected ({} elsewhere);
    ``loss`` shares are summed instead: this rank's part of the mini-batch loss."""
    totals: dict[str, list[float]] = {}
    for metrics in outputs:
        for name, value in metrics.items():
            totals.setdefault(name, []).append(float(value))
    return {LOSS_METRIC_NAMES.get(name, f"train/{name}"): sum(values) if name == "loss" else sum(values) / len(values)
            for name, values in totals.items()}
