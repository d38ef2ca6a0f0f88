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
from typing import Callable, Sequence

import torch

from megacredit.data.teacher_context import SampleSequences
from megacredit.megatron.distributed import ParallelContext
from megacredit.megatron.moe import RouterLoad, is_moe
from megacredit.megatron.optimizer import optimizer_step, zero_grads
from megacredit.algorithms.topk_fused import TopKLogprobs
from megacredit.megatron.rl_passes import VocabHead, row_length_multiple, run_packed_schedule
from megacredit.megatron.teacher import TeacherWeights
from megacredit.megatron.trainer_memory import TrainerMemory
from megacredit.algorithms.methods import METHODS, loss_mask_denominator, micro_batch_loss
from megacredit.algorithms.objective import MicroBatchInputs, ObjectiveSettings, pad_per_sample, response_mask
from megacredit.data.packing import PackedMicroBatch, SequenceToPack, pack_sequences, split_per_sequence
from megacredit.utils.progress import ProgressReporter


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
    temperature: float = 1.0
    """Every pass scores softmax(logits / temperature): the rollout temperature, so the policy
    optimised is the one sampled (verl's dp_actor.py ``_forward_micro_batch``)."""


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
    hidden: torch.Tensor | None = None
    """[R, h] teacher hidden states, kept only while the set is deferred (see ``teacher_pass``)."""
    contrastive_hidden: torch.Tensor | None = None
    """[C, R, h] the contrastive sequences' hidden states, likewise."""
    head_weight: torch.Tensor | None = None
    """The teacher's output-layer shard the deferred set is scored with."""


AdvantageFn = Callable[[Sequence[int], dict], tuple[dict, dict]]
"""``(sample indices, student results) -> ({index: [R] token advantages}, metric sums)``
(the trainer's ``rl_step.advantage_function``; the actor uses the advantages)."""


def _stack(pieces: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """[C, ...] stack of per-contrastive tensors shaped like ``like``; [0, ...] when C = 0."""
    return torch.stack(pieces) if pieces else like.new_zeros((0, *like.shape))


def _sequence(key: tuple, ids: Sequence[int], response_length: int) -> SequenceToPack:
    return SequenceToPack(key, tuple(ids), len(ids) - response_length)


class MegatronActor:
    """This rank's part of the policy, its teacher and its optimizer."""

    def __init__(self, model_chunks: list[torch.nn.Module], optimizer, teacher: TeacherWeights | None,
                 ctx: ParallelContext, settings: ActorSettings, progress: ProgressReporter | None = None) -> None:
        self.model_chunks, self.optimizer, self.teacher = model_chunks, optimizer, teacher
        self.ctx, self.settings = ctx, settings
        self.progress = progress or ProgressReporter()  # shows each pass's micro-batches
        self.head = VocabHead(model_chunks, settings.chunk_size, temperature=settings.temperature)
        self.memory = TrainerMemory(model_chunks, optimizer, teacher)  # released while an engine generates
        self.router_load = RouterLoad(model_chunks) if is_moe(model_chunks) else None  # MoE diagnostics

    # ----------------------------------------------------------------------------- helpers
    def owned(self, indices: Sequence[int]) -> list[int]:
        """The samples of ``indices`` (one mini-batch) this DP rank trains on."""
        return [index for j, index in enumerate(indices) if j % self.ctx.dp_size == self.ctx.dp_rank]

    def _pack(self, groups: list[list[SequenceToPack]]) -> list[PackedMicroBatch]:
        budget = self.settings.token_budget
        return pack_sequences(groups, budget, pad_to_multiple=row_length_multiple(self.model_chunks, budget),
                              pad_token_id=self.settings.pad_token_id)

    def _forward_only(self, groups: list[list[SequenceToPack]], callback, description: str = "pass") -> dict:
        for chunk in self.model_chunks:
            chunk.eval()
        merged: dict = {}
        for result in run_packed_schedule(self.model_chunks, self._pack(groups), callback, forward_only=True,
                                          progress=self.progress, description=description):
            merged.update(result)
        return merged

    # ----------------------------------------------------------------------------- passes
    def old_policy_pass(self, samples: dict[int, SampleSequences]) -> dict[int, StudentResult]:
        """log pi_old of the sampled tokens and the student's top-K, with the current weights."""
        groups = [[_sequence(("s", i), s.student_ids, s.response_length)] for i, s in samples.items()]

        def collect(hidden: torch.Tensor, micro_batch: PackedMicroBatch) -> dict:
            out = self.head(hidden, k=self.settings.top_k, sampled_ids=micro_batch.target_ids.to(hidden.device))
            return _student_results(out, micro_batch)

        return self._forward_only(groups, collect, "old-policy pass")

    def score_sequences(self, sequences: Sequence[Sequence[int]], temperature: float = 1.0,
                        teacher: bool = False) -> dict[int, torch.Tensor]:
        """log pi(s[t] | s[:t]), t >= 1, of each sequence at ``temperature`` with the current
        weights (``teacher``: the self-teacher's, swapped in): the trainer's side of the weight-sync
        probe (temperature 1), and the teacher diagnostic. Results on the last pipeline stage."""
        groups = [[_sequence(("p", i), ids, len(ids) - 1)] for i, ids in enumerate(sequences)]

        def collect(hidden: torch.Tensor, micro_batch: PackedMicroBatch) -> dict:
            out = self.head(hidden, sampled_ids=micro_batch.target_ids.to(hidden.device), temperature=temperature)
            sampled = split_per_sequence(out.sampled_logprobs, micro_batch)
            return {key[1]: sampled[key] for key in micro_batch.keys}

        if not teacher or self.teacher is None:
            return self._forward_only(groups, collect)
        with self.teacher.swapped_in(self.model_chunks):
            return self._forward_only(groups, collect)

    def teacher_pass(self, samples: dict[int, SampleSequences], student: dict[int, StudentResult] | None = None,
                     old_policy_from_training: bool = False,
                     skip_without_signal: bool = False) -> dict[int, TeacherResult]:
        """Teacher and its C contrastive sequences of each sample, in one micro-batch, with the
        teacher weights swapped into the policy's modules (restored bit-exactly afterwards).

        ``skip_without_signal``: samples whose context has no teacher signal (the methods that
        leave them out of the loss) are not run; they get zero placeholders of the right shapes,
        which the loss masks (sdpo.validity_mask) and the diagnostics ignore.

        With topk_source="student" the distillation set is the student's top-K. Without the
        old-policy pass (``old_policy_from_training``, see :meth:`train_mini_batch`) the teacher's
        hidden states are kept and the set's log-probs are computed in the training forward, once
        the student's top-K is known there.
        """
        use_student_set = self.settings.topk_source == "student"
        if use_student_set and student is None and not old_policy_from_training:
            raise ValueError("topk_source='student' needs the old-policy pass results "
                             "(or old_policy_from_training=True)")
        skipped = {i: s for i, s in samples.items() if skip_without_signal and not s.has_teacher_signal}
        groups = [
            [_sequence(("t", i), s.teacher_ids, s.response_length)]
            + [_sequence(("c", i, k), ids, s.response_length) for k, ids in enumerate(s.contrastive_ids)]
            for i, s in samples.items() if i not in skipped
        ]
        if use_student_set and old_policy_from_training:
            collect = self._deferred_collector()
        else:
            def collect(hidden: torch.Tensor, micro_batch: PackedMicroBatch) -> dict:
                return self._collect_teacher(hidden, micro_batch, student if use_student_set else None)

        description = "teacher+contrastive pass" if any(len(g) > 1 for g in groups) else "teacher pass"
        if self.teacher is None:
            results = self._forward_only(groups, collect, description)
        else:
            with self.teacher.swapped_in(self.model_chunks):
                results = self._forward_only(groups, collect, description)
        if self.ctx.is_last_stage:  # where pass results live
            results.update({i: self._placeholder_teacher_result(s) for i, s in skipped.items()})
        return results

    def _placeholder_teacher_result(self, sample: SampleSequences) -> TeacherResult:
        """Zeros shaped like a sample's teacher results, for a sample whose passes were skipped."""
        device = next(self.model_chunks[-1].parameters()).device
        length, k, count = sample.response_length, self.settings.top_k, len(sample.contrastive_ids)
        return TeacherResult(
            set_ids=torch.zeros(length, k, dtype=torch.long, device=device),
            topk_logp=torch.zeros(length, k, device=device), sampled_logp=torch.zeros(length, device=device),
            contrastive_topk_logp=torch.zeros(count, length, k, device=device),
            contrastive_sampled_logp=torch.zeros(count, length, device=device))

    def _deferred_collector(self):
        """Teacher-pass callback that keeps hidden states (and the teacher's output-layer shard)
        instead of scoring a set that is not known yet; only sampled-token log-probs are final."""
        weight = self.head.weight().detach()
        if self.teacher is not None:
            weight = self.teacher.tensor_of(self.model_chunks, self.head.weight()).to(weight.device, weight.dtype)

        def collect(hidden: torch.Tensor, micro_batch: PackedMicroBatch) -> dict:
            sampled = split_per_sequence(
                self.head(hidden, sampled_ids=micro_batch.target_ids.to(hidden.device)).sampled_logprobs, micro_batch)
            rows = split_per_sequence(hidden, micro_batch)
            results = {}
            for key in (k for k in micro_batch.keys if k[0] == "t"):
                contrastive = [c for c in micro_batch.keys if c[0] == "c" and c[1] == key[1]]
                results[key[1]] = TeacherResult(
                    set_ids=None, topk_logp=None, sampled_logp=sampled[key], contrastive_topk_logp=None,
                    contrastive_sampled_logp=_stack([sampled[c] for c in contrastive], sampled[key]),
                    hidden=rows[key], contrastive_hidden=_stack([rows[c] for c in contrastive], rows[key]),
                    head_weight=weight)
            return results

        return collect

    @torch.no_grad()
    def _score_deferred_sets(self, indices: Sequence[int], teacher: dict[int, TeacherResult],
                             set_ids: torch.Tensor) -> None:
        """Fill the deferred teacher results of ``indices`` with their log-probs on ``set_ids``
        [N, K] (the student's top-K of the training forward, rows in the order of ``indices``);
        placeholders of skipped samples (no hidden states kept) are left as they are."""
        all_sets = torch.split(set_ids, [len(teacher[i].sampled_logp) for i in indices])
        deferred = [(i, ids) for i, ids in zip(indices, all_sets) if teacher[i].hidden is not None]
        if not deferred:
            return
        indices, per_sample = [i for i, _ in deferred], [ids for _, ids in deferred]
        rows = [teacher[i].hidden for i in indices] + [c for i in indices for c in teacher[i].contrastive_hidden]
        ids = list(per_sample) + [per_sample[j] for j, i in enumerate(indices)
                                  for _ in range(teacher[i].contrastive_hidden.shape[0])]
        out = self.head(torch.cat(rows), gather_ids=torch.cat(ids), weight=teacher[indices[0]].head_weight)
        pieces = iter(torch.split(out.gathered_logprobs, [len(r) for r in rows]))
        teachers = [next(pieces) for _ in indices]
        for j, i in enumerate(indices):
            result, count = teacher[i], teacher[i].contrastive_hidden.shape[0]
            contrastive = [next(pieces) for _ in range(count)]
            result.set_ids, result.topk_logp = per_sample[j], teachers[j]
            result.contrastive_topk_logp = _stack(contrastive, teachers[j])
            result.hidden = result.contrastive_hidden = result.head_weight = None

    def _collect_teacher(self, hidden, micro_batch: PackedMicroBatch, student) -> dict[int, TeacherResult]:
        """Teacher results of a micro-batch: one head call for all teacher rows (their top-K, or
        log-probs on the student's set) and one for all contrastive rows (on their sample's set)."""
        rows = split_per_sequence(hidden, micro_batch)
        targets = split_per_sequence(micro_batch.target_ids.to(hidden.device), micro_batch)
        teachers = [key for key in micro_batch.keys if key[0] == "t"]
        contrastive = {key[1]: [c for c in micro_batch.keys if c[0] == "c" and c[1] == key[1]] for key in teachers}
        teacher_hidden = torch.cat([rows[key] for key in teachers])
        teacher_targets = torch.cat([targets[key] for key in teachers])
        if student is None:
            out = self.head(teacher_hidden, k=self.settings.top_k, sampled_ids=teacher_targets)
            all_set_ids, all_set_logp = out.topk_ids, out.topk_logprobs
        else:
            all_set_ids = torch.cat([student[key[1]].topk_ids for key in teachers]).to(hidden.device)
            out = self.head(teacher_hidden, gather_ids=all_set_ids, sampled_ids=teacher_targets)
            all_set_logp = out.gathered_logprobs
        lengths = [len(rows[key]) for key in teachers]
        set_ids = dict(zip(teachers, torch.split(all_set_ids, lengths)))
        set_logp = dict(zip(teachers, torch.split(all_set_logp, lengths)))
        sampled = dict(zip(teachers, torch.split(out.sampled_logprobs, lengths)))
        c_keys = [c for key in teachers for c in contrastive[key[1]]]
        c_gathered, c_sampled = {}, {}
        if c_keys:
            c_out = self.head(torch.cat([rows[c] for c in c_keys]),
                              gather_ids=torch.cat([set_ids[("t", c[1])] for c in c_keys]),
                              sampled_ids=torch.cat([targets[c] for c in c_keys]))
            c_lengths = [len(rows[c]) for c in c_keys]
            c_gathered = dict(zip(c_keys, torch.split(c_out.gathered_logprobs, c_lengths)))
            c_sampled = dict(zip(c_keys, torch.split(c_out.sampled_logprobs, c_lengths)))
        return {
            key[1]: TeacherResult(
                set_ids=set_ids[key], topk_logp=set_logp[key], sampled_logp=sampled[key],
                contrastive_topk_logp=_stack([c_gathered[c] for c in contrastive[key[1]]], set_logp[key]),
                contrastive_sampled_logp=_stack([c_sampled[c] for c in contrastive[key[1]]], sampled[key]))
            for key in teachers
        }

    # ----------------------------------------------------------------------------- training
    def train_mini_batch(self, mini_batch: Sequence[int], samples: dict[int, SampleSequences],
                         student: dict[int, StudentResult], teacher: dict[int, TeacherResult],
                         advantages: dict[int, torch.Tensor] | None,
                         token_weights: dict[int, torch.Tensor] | None = None, old_policy_from_training: bool = False,
                         advantage_fn: AdvantageFn | None = None) -> dict[str, float]:
        """One optimizer step on one mini-batch (all DP ranks together); returns metrics.

        ``token_weights``: per-sample [R] rollout IS weights multiplying the token losses.
        ``old_policy_from_training``: the old-policy pass was skipped because it would equal this
        forward (one mini-batch, one epoch, on-policy; the trainer's
        ``can_take_old_policy_from_training`` decides). ``student`` is then filled here from this
        forward (detached, so pi_old = sg(pi_theta) and the PPO ratio is exactly 1), a deferred
        student-top-K set is scored (``teacher_pass(old_policy_from_training=True)``), and ``advantage_fn(indices,
        student)`` fills ``advantages`` before the loss.
        """
        objective = self.settings.objective
        denominator = max(loss_mask_denominator(
            objective, [samples[i].response_length for i in mini_batch],
            [samples[i].has_teacher_signal for i in mini_batch]), 1.0)
        owned = self.owned(mini_batch)
        groups = [[_sequence(("s", i), samples[i].student_ids, samples[i].response_length)] for i in owned]

        def loss_callback(hidden: torch.Tensor, micro_batch: PackedMicroBatch):
            indices = [key[1] for key in micro_batch.keys]
            if old_policy_from_training:
                out = self._student_forward_head(hidden, micro_batch, student, teacher)
                if advantage_fn is not None:
                    advantages.update(advantage_fn(indices, student)[0])
            else:
                set_ids = (torch.cat([teacher[i].set_ids for i in indices]).to(hidden.device)
                           if METHODS[objective.method].distills else None)
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
                                      forward_only=False, dp_size=self.ctx.dp_size,
                                      progress=self.progress, description="train pass")
        step = optimizer_step(self.optimizer)
        if self.teacher is not None:
            self.teacher.after_optimizer_step(self.model_chunks)
        metrics = _mean_metrics(outputs)
        metrics.update({"train/grad_norm": step.grad_norm or 0.0})
        if self.router_load is not None:  # collective: every rank trains every mini-batch
            metrics.update(self.router_load.step_metrics())
        return metrics

    def _student_forward_head(self, hidden: torch.Tensor, micro_batch: PackedMicroBatch,
                              student: dict[int, StudentResult], teacher: dict[int, TeacherResult]) -> TopKLogprobs:
        """The training head when this forward also stands in for the old-policy pass: the
        student's top-K (diagnostics, and the set when topk_source="student") in the same call."""
        indices = [key[1] for key in micro_batch.keys]
        distill = METHODS[self.settings.objective.method].distills
        student_set = distill and self.settings.topk_source == "student"
        set_ids = (torch.cat([teacher[i].set_ids for i in indices]).to(hidden.device)
                   if distill and not student_set else None)
        out = self.head(hidden, k=self.settings.top_k, gather_ids=set_ids,
                        sampled_ids=micro_batch.target_ids.to(hidden.device))
        student.update(_student_results(out, micro_batch))
        if student_set:
            self._score_deferred_sets(indices, teacher, out.topk_ids.detach())
            out.gathered_logprobs = out.topk_logprobs  # the student's log-probs on its own top-K
        return out

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
        if METHODS[objective.method].distills:
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


def _student_results(out: TopKLogprobs, micro_batch: PackedMicroBatch) -> dict[int, StudentResult]:
    """Per-sample old-policy results of a head output (detached)."""
    sampled = split_per_sequence(out.sampled_logprobs.detach(), micro_batch)
    ids = split_per_sequence(out.topk_ids, micro_batch)
    logp = split_per_sequence(out.topk_logprobs.detach(), micro_batch)
    return {key[1]: StudentResult(sampled[key], ids[key], logp[key]) for key in micro_batch.keys}


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
