"""The weight-sync probe comparison and the error that names the differing tensor."""

from __future__ import annotations

import pytest
import torch

from megacredit.rollout.sync_check import (
    compare_probe,
    largest_weight_difference,
    layer_of,
    probe_token_ids,
    sync_check_error,
)


def test_compare_probe_means_and_worst_token():
    result = compare_probe([-1.0, -2.0, -3.0], [-1.0, -2.5, -3.1], tolerance=0.25)
    assert result.mean_abs_diff == pytest.approx(0.2) and result.max_abs_diff == pytest.approx(0.5)
    assert result.worst_position == 2 and result.ok  # token 2 of the probe (token 0 is not scored)
    assert not compare_probe([-1.0, float("nan")], [-1.0, -1.0], tolerance=1.0).ok
    with pytest.raises(ValueError, match="differ in length"):
        compare_probe([-1.0], [-1.0, -2.0], 0.1)


def test_largest_weight_difference_and_layer_names():
    reference = [("model.layers.3.mlp.down_proj.weight", torch.zeros(2, 2)),
                 ("model.embed_tokens.weight", torch.zeros(4, 2)),
                 ("model.norm.weight", torch.zeros(2))]
    engine = {"model.layers.3.mlp.down_proj.weight": torch.full((2, 2), 0.5),
              "model.embed_tokens.weight": torch.full((4, 2), 0.01),
              "model.norm.weight": torch.zeros(3)}  # another shape: not comparable, skipped
    assert largest_weight_difference(iter(reference), engine) == ("model.layers.3.mlp.down_proj.weight", 0.5)
    assert largest_weight_difference(iter(reference), {}) is None
    assert layer_of("model.layers.12.self_attn.q_proj.weight") == "layer 12"
    assert layer_of("model.embed_tokens.weight") == "the input embedding"
    assert layer_of("lm_head.weight") == "the LM head" and layer_of("model.norm.weight") == "the final norm"


def test_error_message_names_the_tensor_or_says_why_not():
    failed = compare_probe([-1.0, -5.0], [-1.0, -1.0], tolerance=0.05)
    named = sync_check_error("engine 0 (X)", failed, 3, ("model.layers.7.mlp.up_proj.weight", 0.8), True)
    assert "sync 3" in named and "'model.layers.7.mlp.up_proj.weight' (layer 7)" in named
    assert "rollout.check_weight_sync_tolerance=0.05" in named
    assert "cannot read its weights back" in sync_check_error("e", failed, 0, None, False)
    assert "equals the trainer's" in sync_check_error("e", failed, 0, ("a", 0.0), True)


def test_probe_tokens_with_the_real_tokenizer():
    from megacredit.trainer.builder import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct", "~/.cache/megacredit")
    ids = probe_token_ids(tokenizer)
    assert len(ids) > 20 and all(isinstance(i, int) for i in ids)
    assert ids == probe_token_ids(tokenizer)  # fixed
