"""Input validation of megacredit.megatron.optimizer and rl_passes.run_packed_schedule (no
processes spawned; the numerical behaviour is tested at TP/PP/DP in
tests/distributed/test_parallel_equivalence.py)."""

from types import SimpleNamespace

import pytest
import torch

from megacredit.megatron import rl_passes
from megacredit.megatron.optimizer import OptimizerSettings
from megacredit.data.packing import SequenceToPack, pack_sequences


@pytest.mark.parametrize("field,value,message", [
    ("lr", -1.0, "lr must be >= 0"),
    ("clip_grad", -0.5, "clip_grad must be >= 0"),
    ("adam_beta1", 1.0, "adam_beta1 must be in"),
    ("adam_beta2", -0.1, "adam_beta2 must be in"),
])
def test_optimizer_settings_name_the_bad_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        OptimizerSettings(**{field: value})


def test_bf16_and_fp16_are_exclusive():
    with pytest.raises(ValueError, match="at most one of bf16 and fp16"):
        OptimizerSettings(bf16=True, fp16=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only restriction")
def _stage(calculate_per_token_loss: bool = False) -> torch.nn.Module:
    """A stand-in model chunk: run_packed_schedule validates before it runs anything."""
    stage = torch.nn.Linear(2, 2)
    stage.config = SimpleNamespace(calculate_per_token_loss=calculate_per_token_loss, sequence_parallel=False)
    return stage


def _packed(*lengths: int):
    groups = [[SequenceToPack((index,), tuple(range(length)), 1)] for index, length in enumerate(lengths)]
    return pack_sequences(groups, token_budget=max(lengths))


def _never_called(hidden, micro_batch):
    raise AssertionError("the callback must not run")


def test_pipeline_stages_need_equal_packed_lengths(monkeypatch):
    monkeypatch.setattr(rl_passes, "_pp_size", lambda: 2)
    with pytest.raises(ValueError, match=r"pipeline parallelism needs equal packed lengths, got \[3, 5\]"):
        rl_passes.run_packed_schedule([_stage()], _packed(5, 3), _never_called, forward_only=True)


def test_training_refuses_megatron_per_token_loss():
    with pytest.raises(ValueError, match="calculate_per_token_loss=False"):
        rl_passes.run_packed_schedule([_stage(True)], _packed(4, 4), _never_called, forward_only=False)


def test_no_micro_batches_run_nothing():
    assert rl_passes.run_packed_schedule([_stage()], [], _never_called, forward_only=False) == []
