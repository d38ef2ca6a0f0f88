"""SamplingParams validation and the pure sampling helpers."""

from __future__ import annotations

import pytest
import torch

from megacredit.rollout.base import RolloutOutput, SamplingParams
from megacredit.rollout.sampling import left_pad, positions_from_mask, sampling_logits


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature="hot"), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(n=0), "n"),
        (dict(seed=-1), "seed"),
        (dict(stop_token_ids=(2, -5)), "stop_token_ids"),
    ],
)
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises((ValueError, TypeError), match=rf"SamplingParams\.{field}\b"):
        SamplingParams(**kwargs)


def test_valid_sampling_params():
    params = SamplingParams(temperature=0, top_k=5, top_p=0.9, stop_token_ids=[2, 3], seed=0)
    assert params.greedy and params.stop_token_ids == (2, 3)
    assert not SamplingParams().greedy and SamplingParams().stop_token_ids is None


def test_rollout_output_lengths_must_agree():
    with pytest.raises(ValueError, match="same length"):
        RolloutOutput(0, [1], [2, 3], [-0.1], "length")


def test_left_padding_and_positions():
    input_ids, mask = left_pad([[7, 8, 9], [4]], pad_token_id=0)
    assert input_ids.tolist() == [[7, 8, 9], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    # Each row's first real token is at position 0; pads get 1 (masked out anyway).
    assert positions_from_mask(mask).tolist() == [[0, 1, 2], [1, 1, 0]]


def test_sampling_logits_written_out():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = torch.softmax(logits, -1)[0]  # [0.644, 0.237, 0.087, 0.032]
    tempered = sampling_logits(logits, SamplingParams(temperature=2.0))
    torch.testing.assert_close(tempered, logits / 2)
    top2 = sampling_logits(logits, SamplingParams(top_k=2))
    assert torch.isinf(top2[0, 2:]).all() and torch.isfinite(top2[0, :2]).all()
    # top_p = 0.7: token 0 alone has 0.644 < 0.7, so token 1 joins; mass 0.881 >= 0.7 stops.
    assert probs[0] < 0.7 <= probs[0] + probs[1]
    nucleus = sampling_logits(logits, SamplingParams(top_p=0.7))
    assert torch.isfinite(nucleus[0]).tolist() == [True, True, False, False]
    just_first = sampling_logits(logits, SamplingParams(top_p=0.6))
    assert torch.isfinite(just_first[0]).tolist() == [True, False, False, False]
