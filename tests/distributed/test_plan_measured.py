"""``megacredit plan`` against the measured peak memory of CPU training (issue 20, item 3).

What is measured: the peak resident memory (VmHWM, reset through /proc/self/clear_refs) of each
rank over two training steps (a training pass over two packed micro-batches through Megatron's
schedule and the chunked vocab head, then the optimizer step and the EMA update) minus its
resident memory before the model is built, with glibc's mmap threshold pinned at 128 KiB so that
every tensor is its own mapping, unmapped at free: VmRSS then follows the live tensors (glibc's
default threshold grows, after which freed blocks stay resident and a peak reads low). That is
what the plan predicts: the model's weights, the DDP gradient buffer, Adam's state, the EMA
teacher, the activations a training pass keeps, the head's chunks (``kernels="cpu"``, no reserve).
The modules the first model build imports lazily are imported before the baseline.
What it also holds and the plan does not: allocator and gloo overheads, Adam's temporaries in the
step. Tolerance 15 % (issue 20), on each rank of a tiny Llama-shaped fp32 model at TP 1, TP 2
and PP 2 (the first PP stage holds two micro-batches in flight).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path

import pytest

from megacredit.utils.spawn import run_distributed

pytestmark = pytest.mark.distributed
TINY = dict(hidden_size=256, num_hidden_layers=4, intermediate_size=1024, num_attention_heads=8,
            num_key_value_heads=4, vocab_size=1024, tie_word_embeddings=False)
TOKENS, SEQUENCE, SEQUENCES = 2048, 512, 8
TOLERANCE = 0.15


def _resident(field: str) -> int:
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _measure(rank, world_size, tp, pp):
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    assert libc.mallopt(ctypes.c_int(-3), ctypes.c_int(128 * 1024))  # M_MMAP_THRESHOLD: fixed
    import torch

    from megacredit.data.packing import SequenceToPack, pack_sequences
    from megacredit.megatron import distributed
    from megacredit.megatron.model_provider import build_gpt_model
    from megacredit.megatron.optimizer import OptimizerSettings, build_optimizer, optimizer_step, wrap_with_ddp, zero_grads
    from megacredit.megatron.packed_attention import enable_packed_attention
    from megacredit.megatron.rl_passes import VocabHead, run_packed_schedule
    from megacredit.megatron.teacher import TeacherWeights
    from megacredit.models.tiny import tiny_config

    torch.set_num_threads(1)
    ctx = distributed.initialize(tp, pp, seed=0)
    generator = torch.Generator().manual_seed(0)
    groups = [[SequenceToPack(("s", i), tuple(torch.randint(0, 1024, (SEQUENCE,), generator=generator).tolist()), 1)]
              for i in range(SEQUENCES)]
    batches = pack_sequences(groups, token_budget=TOKENS)
    model_warmup = build_gpt_model(tiny_config("llama", max_position_embeddings=SEQUENCE,
                                               **{**TINY, "num_hidden_layers": pp}), ctx)
    # The first model built imports modules lazily (model families, MoE: about 40 MiB of code and
    # tables), which no plan counts: a throwaway one-layer-per-stage model is built first.
    del model_warmup
    Path("/proc/self/clear_refs").write_text("5")
    before = _resident("VmRSS")
    model = build_gpt_model(tiny_config("llama", max_position_embeddings=SEQUENCE, **TINY), ctx)
    enable_packed_attention(model)
    chunks = wrap_with_ddp([model])
    optimizer = build_optimizer(chunks, OptimizerSettings(lr=1e-3))
    teacher = TeacherWeights(chunks)
    head = VocabHead(chunks)

    def loss_fn(hidden, micro_batch):
        share = -head(hidden, sampled_ids=micro_batch.target_ids).sampled_logprobs.mean()
        return share, {"loss": share.detach()}

    for _ in range(2):
        zero_grads(chunks, optimizer)
        run_packed_schedule(chunks, batches, loss_fn, forward_only=False)
        optimizer_step(optimizer)
        teacher.after_optimizer_step(chunks)
    return {"stage": ctx.pp_rank, "micro_batches": len(batches),
            "peak": _resident("VmHWM") - before}


def _plan(tp, pp):
    from megacredit.config import load_config
    from megacredit.planning.report import make_plan

    tiny = [f"model.tiny.{k}={v}" for k, v in TINY.items()]
    cfg = load_config(None, ["model.name_or_path=tiny", "algorithm.name=credit", "rollout.max_seq_len=2048", "rollout.max_new_tokens=256", f"parallel.micro_batch_tokens={TOKENS}",
                             f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}",
                             *tiny], check_paths=False)
    return make_plan(cfg, gpus_per_node=tp * pp, reserve_gb=0.0, kernels="cpu")


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)], ids=["tp1", "tp2", "pp2"])
def test_plan_agrees_with_the_measured_peak(tp, pp):
    measured = run_distributed(_measure, world_size=tp * pp, timeout=1800, tp=tp, pp=pp)
    plan = _plan(tp, pp)
    for rank in measured:
        assert rank["micro_batches"] == 2
        predicted = plan.stages[rank["stage"]].training
        print(f"tp{tp} pp{pp} stage {rank['stage']}: measured {rank['peak'] / 2**20:.0f} MiB, "
              f"planned {predicted / 2**20:.0f} MiB, ratio {rank['peak'] / predicted:.3f}")
        assert abs(rank["peak"] / predicted - 1) <= TOLERANCE, (rank, predicted)
