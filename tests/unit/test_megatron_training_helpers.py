"""Input validation of megacredit.megatron.optimizer and .schedule (no processes spawned; the
numerical behaviour is tested at TP/PP/DP in tests/distributed/test_parallel_equivalence.py)."""

import pytest
import torch

from megacredit.megatron.optimizer import OptimizerSettings, build_optimizer
from megacredit.megatron.schedule import _micro_batch_shape, model_inputs


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
def test_distributed_optimizer_is_refused_on_cpu():
    with pytest.raises(ValueError, match="use_distributed_optimizer=True needs CUDA"):
        build_optimizer([], OptimizerSettings(use_distributed_optimizer=True))


def test_micro_batches_need_input_ids_of_one_shape_under_pp():
    ids = torch.zeros(2, 5, dtype=torch.long)
    assert _micro_batch_shape([{"input_ids": ids}, {"input_ids": ids}], pipelined=True) == (2, 5)
    with pytest.raises(ValueError, match="empty"):
        _micro_batch_shape([], pipelined=False)
    with pytest.raises(KeyError, match=r"micro_batches\[1\] has no 'input_ids'"):
        _micro_batch_shape([{"input_ids": ids}, {"tokens": ids}], pipelined=False)
    with pytest.raises(ValueError, match=r"must be \[batch, seq\]"):
        _micro_batch_shape([{"input_ids": ids[0]}], pipelined=False)
    mixed = [{"input_ids": ids}, {"input_ids": torch.zeros(2, 7, dtype=torch.long)}]
    assert _micro_batch_shape(mixed, pipelined=False) == (2, 5)
    with pytest.raises(ValueError, match="same \\[batch, seq\\] shape"):
        _micro_batch_shape(mixed, pipelined=True)


def test_model_inputs_default_to_positions_and_a_causal_mask():
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    inputs = model_inputs({"input_ids": ids}, torch.device("cpu"))
    assert torch.equal(inputs["position_ids"], torch.tensor([[0, 1, 2], [0, 1, 2]]))
    # Megatron convention: True = masked; position i must not see j > i
    assert torch.equal(inputs["attention_mask"][0, 0], torch.ones(3, 3, dtype=torch.bool).triu(1))
    own = model_inputs({"input_ids": ids, "position_ids": ids * 0}, torch.device("cpu"))
    assert torch.equal(own["position_ids"], torch.zeros_like(ids))
