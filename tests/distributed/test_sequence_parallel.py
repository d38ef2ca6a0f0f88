"""Sequence parallelism changes no number: a full CREDIT step at TP=2 with SP equals TP=2 without
it and TP=1, and likewise at TP=2 x PP=2 (4 gloo processes).

One step through the production path (``build_actor`` from a config, ``passes_and_update``):
the sync-check probe (``actor.score_sequences``), the old-policy pass, the teacher pass with one
contrastive sequence per sample (a teacher that differs from the policy, swapped in), the
training forward/backward of the CREDIT loss, Megatron's Adam step (clipping active). The model
is a tiny random Qwen3 (QK norm: its norms are marked sequence-parallel too). The packed rows
hold an odd number of tokens (students 7 + 8 + 10 and 9; teacher + contrastive groups 21, 23,
27, 25), so with SP the actor pads them to a multiple of TP, and Megatron's sequence scatter and
the pipeline's fixed shapes see even rows. Compared: the probe's and the passes' log-probs, the
teacher's top-K ids, the loss, the gradient norm, every gradient and every updated weight, as
full Hugging Face-named tensors (the bridge's export), against the TP=1 process and against the
same layout without SP.

Tolerance: rtol 1e-5, atol 1e-6 (fp32; the layouts differ only in the order of the sums: split
matmuls, all-reduce vs reduce-scatter of partial sums; gradients are clipped by the same norm).
Adam's epsilon is 1e-4: the first Adam step is lr * g / (|g| + eps), with the default 1e-8 that is
lr * sign(g), and a gradient element near 0 flips its step on a rounding difference (seen: one
of 8192 elements of a TP=2 run, SP or not, moved by 1.2e-5 = 1.2 % of lr).
The SP runs are checked to have run on sequence shards (the norms saw half of every row).
"""

from __future__ import annotations

import types

import pytest
import torch

from megacredit.utils.spawn import run_distributed

pytestmark = pytest.mark.distributed
VOCAB, TOP_K, BUDGET = 96, 5, 32
RESPONSE_LENGTHS = (3, 4, 6, 5)
"""Students of 7, 8, 10 and 9 tokens: packed rows of 25 and 9 under the 32-token budget."""
PROBE = ((5, 17, 33, 8, 61, 40, 12), (9, 70, 3, 44, 21, 6, 80, 15, 27, 55, 38, 91))
"""Two sequences of the sync-check probe, one packed row of 19 tokens."""
LAYOUTS = {"tp2": (2, 1, False), "tp2_sp": (2, 1, True), "tp2pp2": (2, 2, False), "tp2pp2_sp": (2, 2, True)}
"""name: (TP, PP, sequence parallel)."""
RTOL, ATOL = 1e-5, 1e-6
CLIP_GRAD = 0.5
"""Below the step's gradient norm (about 0.78): clipping is active."""


def _hf_config():
    from megacredit.models.tiny import tiny_config

    return tiny_config("qwen3", vocab_size=VOCAB)


def _config(tp: int, pp: int, sequence_parallel: bool):
    from megacredit.config import load_config

    return load_config(None, [
        "algorithm.name=credit", f"algorithm.sdpo.top_k={TOP_K}", "algorithm.credit.num_contrastive=1",
        "algorithm.group_size=2", "data.prompts_per_step=2", "training.ppo_mini_batch_size=2",
        f"parallel.micro_batch_tokens={BUDGET}", "rollout.max_seq_len=32", "rollout.max_new_tokens=8",
        "model.name_or_path=tiny", "optimizer.lr=1e-3", f"optimizer.clip_grad={CLIP_GRAD}", "optimizer.eps=1e-4",
        f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}",
        f"parallel.sequence_parallel={str(sequence_parallel).lower()}"], check_paths=False)


def _record_norm_rows(chunks) -> tuple[list[int], object]:
    """The rows (tokens on this rank) the first layer's input norm sees, one entry per forward,
    and the hook's handle."""
    from megacredit.megatron.rl_passes import unwrap

    seen: list[int] = []
    norm = unwrap(chunks[0]).decoder.layers[0].input_layernorm
    return seen, norm.register_forward_hook(lambda module, inputs, output: seen.append(int(inputs[0].shape[0])))


def _unpadded_row_refusal(chunks) -> str:
    """The error of a pass given a packed row of 7 tokens, not padded to a multiple of TP."""
    from megacredit.data.packing import SequenceToPack, pack_sequences
    from megacredit.megatron.rl_passes import run_packed_schedule

    rows = pack_sequences([[SequenceToPack(("odd",), PROBE[0], 1)]], BUDGET)
    with pytest.raises(ValueError) as refusal:
        run_packed_schedule(chunks, rows, lambda hidden, micro_batch: {}, forward_only=True)
    return str(refusal.value)


def _credit_step(tp: int, pp: int, sequence_parallel: bool, policy_state: dict, teacher_state: dict) -> dict:
    """One CREDIT step at this layout; what this rank holds of it."""
    from megacredit.megatron.distributed import initialize
    from megacredit.trainer.builder import ModelSource, build_actor
    from megacredit.trainer.rl_step import passes_and_update
    from megacredit.trainer.run import RLRun
    from megatron_test_helpers import (
        export_full, four_sample_batch, grads_as_params, model_shards, random_sample_sequences,
    )

    ctx = initialize(tp, pp, seed=0)
    cfg, hf_config = _config(tp, pp, sequence_parallel), _hf_config()
    actor = build_actor(cfg, ctx, ModelSource(hf_config, types.SimpleNamespace(pad_token_id=0), policy_state))
    actor.teacher.load_state_tensors(model_shards(hf_config, teacher_state, ctx, sequence_parallel=sequence_parallel))
    rows_seen, hook = _record_norm_rows(actor.model_chunks)
    probe = actor.score_sequences(PROBE)
    samples = random_sample_sequences(torch.Generator().manual_seed(5), VOCAB, response_lengths=RESPONSE_LENGTHS)
    run = RLRun(cfg, ctx, actor, None, None, None, hf_config)
    passes = passes_and_update(run, 0, four_sample_batch(), samples, old_policy_from_training=False)
    hook.remove()
    with grads_as_params(actor.model_chunks):
        grads = export_full(actor.model_chunks, hf_config, ctx)
    params_after = export_full(actor.model_chunks, hf_config, ctx)
    marked = sum(bool(getattr(p, "sequence_parallel", False)) for chunk in actor.model_chunks for p in chunk.parameters())
    refusal = _unpadded_row_refusal(actor.model_chunks) if sequence_parallel else None
    reporter = ctx.is_last_stage and ctx.tp_rank == 0
    return dict(reporter=reporter, probe=probe if reporter else None, passes=passes if reporter else None,
                grads=grads, params_after=params_after, rows_seen=rows_seen, marked_params=marked, refusal=refusal)


def _merge(per_rank: list[dict]) -> dict:
    """Weights from global rank 0 (the export's receiver), pass results from the last stage."""
    (reporter,) = [result for result in per_rank if result["reporter"]]
    return {**per_rank[0], "probe": reporter["probe"], "passes": reporter["passes"]}


def _layouts(rank, world_size, names, policy_state, teacher_state):
    return {name: _credit_step(*LAYOUTS[name], policy_state, teacher_state) for name in names}


def _single_process(rank, world_size, policy_state, teacher_state):
    return _credit_step(1, 1, False, policy_state, teacher_state)


@pytest.fixture(scope="module")
def results():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    policy_state = AutoModelForCausalLM.from_config(_hf_config()).state_dict()
    torch.manual_seed(1)
    teacher_state = AutoModelForCausalLM.from_config(_hf_config()).state_dict()
    states = dict(policy_state=policy_state, teacher_state=teacher_state)
    (reference,) = run_distributed(_single_process, world_size=1, **states)
    out = {"tp1": reference, "initial": policy_state}
    for names, world_size in ((("tp2", "tp2_sp"), 2), (("tp2pp2", "tp2pp2_sp"), 4)):
        per_rank = run_distributed(_layouts, world_size=world_size, names=names, **states)
        out.update({name: _merge([ranks[name] for ranks in per_rank]) for name in names})
    return out


def _close(got, want, what: str) -> None:
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


PAIRS = [("tp2_sp", "tp2"), ("tp2_sp", "tp1"), ("tp2pp2_sp", "tp2pp2"), ("tp2pp2_sp", "tp1"),
         ("tp2", "tp1"), ("tp2pp2", "tp1")]


def test_the_reference_step_is_meaningful(results):
    reference = results["tp1"]
    metrics = reference["passes"].train_parts[0]
    assert metrics["train/loss"] > 1e-3  # teacher and policy differ: the distillation loss is not vacuous
    assert metrics["train/grad_norm"] > CLIP_GRAD
    assert sorted(reference["passes"].teacher) == [0, 1, 2, 3]
    assert all(t.contrastive_topk_logp.shape[0] == 1 for t in reference["passes"].teacher.values())
    assert all(grad.abs().sum() > 0 for grad in reference["grads"].values())
    assert all(not torch.equal(value, results["initial"][name]) for name, value in reference["params_after"].items())


def test_sequence_parallel_runs_on_sequence_shards(results):
    """Without SP every rank's norm sees whole rows (odd lengths at PP=1, the budget at PP=2);
    with SP it sees half of each row, padded up to even first. Every norm of the SP model is
    marked for the TP all-reduce of its gradient: per layer input, pre-MLP, q and k, and the
    final norm (on the last stage; global rank 0 holds the first stage at PP=2)."""
    for plain, sharded in (("tp2", "tp2_sp"), ("tp2pp2", "tp2pp2_sp")):
        whole = results[plain]["rows_seen"]
        assert results[sharded]["rows_seen"] == [(length + 1) // 2 for length in whole], sharded
        assert results[plain]["marked_params"] == 0
    assert sorted(set(results["tp2"]["rows_seen"])) == [9, 19, 21, 23, 25, 27]
    assert set(results["tp2pp2"]["rows_seen"]) == {BUDGET}
    assert results["tp2_sp"]["marked_params"] == 2 * 4 + 1
    assert results["tp2pp2_sp"]["marked_params"] == 4


def test_rows_not_divisible_by_tp_are_refused_in_one_line(results):
    for layout in ("tp2_sp", "tp2pp2_sp"):
        assert results[layout]["refusal"] == (
            "sequence parallelism needs packed lengths that divide by TP=2, got [7] "
            "(pack with pad_to_multiple=row_length_multiple(...))"), layout


@pytest.mark.parametrize("layout,reference", PAIRS)
def test_probe_and_passes_match(results, layout, reference):
    got, want = results[layout], results[reference]
    for index, expected in want["probe"].items():
        _close(got["probe"][index], expected, f"probe {index}")
    for index, expected in want["passes"].student.items():
        student = got["passes"].student[index]
        _close(student.sampled_logp, expected.sampled_logp, f"old-policy log-prob {index}")
        _close(student.topk_logp, expected.topk_logp, f"student top-K {index}")
    for index, expected in want["passes"].teacher.items():
        teacher = got["passes"].teacher[index]
        assert torch.equal(teacher.set_ids, expected.set_ids), index
        for field in ("topk_logp", "sampled_logp", "contrastive_topk_logp", "contrastive_sampled_logp"):
            _close(getattr(teacher, field), getattr(expected, field), f"teacher {field} {index}")


@pytest.mark.parametrize("layout,reference", PAIRS)
def test_training_step_matches(results, layout, reference):
    got, want = results[layout], results[reference]
    for name in ("train/loss", "train/grad_norm"):
        expected = want["passes"].train_parts[0][name]
        assert got["passes"].train_parts[0][name] == pytest.approx(expected, rel=RTOL, abs=ATOL), name
    assert got["grads"].keys() == want["grads"].keys()
    for name, expected in want["grads"].items():
        _close(got["grads"][name], expected, f"gradient {name}")
    for name, expected in want["params_after"].items():
        _close(got["params_after"][name], expected, f"updated {name}")
