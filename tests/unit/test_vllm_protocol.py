"""The vLLM adapters' pure pieces: request bodies, answer parsing, bucket encoding, unpacking
fused parameters. (The engines themselves run for real in tests/integration/test_vllm_*.py.)"""

from __future__ import annotations

import pytest
import torch

from megacredit.rollout.base import SamplingParams, request_seed
from megacredit.rollout.vllm import decode_bucket, encode_bucket, request_sampling_kwargs, unpack_weights
from megacredit.rollout.vllm_server import completion_request, parse_completion, parse_prompt_logprobs


def test_each_request_carries_the_seed_of_its_index_in_the_whole_batch():
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=5, max_new_tokens=8, n=3, seed=17,
                            seed_offset=4, stop_token_ids=(2,))
    body = completion_request("m", [1, 2, 3], params, index=1)
    assert body == {"model": "m", "prompt": [1, 2, 3], "return_token_ids": True, "skip_special_tokens": False,
                    "n": 3, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "max_tokens": 8,
                    "seed": request_seed(17, 5), "logprobs": 0, "stop_token_ids": [2]}
    unseeded = completion_request("m", [1], SamplingParams(seed=None, stop_token_ids=()), index=0)
    assert "seed" not in unseeded and unseeded["ignore_eos"] is True
    assert request_sampling_kwargs(SamplingParams(seed=3), 0)["seed"] == 3


def test_completion_answers_are_parsed_in_choice_order():
    answer = {"choices": [
        {"index": 1, "token_ids": [7, 2], "finish_reason": "stop", "logprobs": {"token_logprobs": [-0.5, -0.25]}},
        {"index": 0, "token_ids": [9], "finish_reason": "length", "logprobs": {"token_logprobs": [-1.0]}}]}
    outs = parse_completion(answer, prompt_index=4, prompt=[1, 2])
    assert [(o.prompt_index, o.token_ids, o.logprobs, o.finish_reason) for o in outs] == [
        (4, [9], [-1.0], "length"), (4, [7, 2], [-0.5, -0.25], "stop")]
    answer["choices"][0]["finish_reason"] = "abort"
    with pytest.raises(RuntimeError, match="abort"):
        parse_completion(answer, 0, [1])


def test_prompt_logprobs_pick_the_given_tokens():
    answer = {"choices": [{"prompt_logprobs": [
        None, {"5": {"logprob": -2.0, "rank": 3}, "9": {"logprob": -0.1, "rank": 1}},
        {"6": {"logprob": -0.75, "rank": 1}}]}]}
    assert parse_prompt_logprobs(answer, [1, 5, 6]) == [-2.0, -0.75]


def test_buckets_survive_the_text_encoding():
    pairs = [("a.weight", torch.randn(3, 4)), ("b.bias", torch.arange(5, dtype=torch.bfloat16))]
    decoded = dict(decode_bucket(encode_bucket(pairs)))
    for name, tensor in pairs:
        assert decoded[name].dtype == tensor.dtype
        torch.testing.assert_close(decoded[name], tensor, atol=0, rtol=0)


def test_fused_parameters_are_split_back_into_hf_tensors():
    q, k, v = torch.randn(8, 4), torch.randn(2, 4), torch.randn(2, 4)
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    weights = {"model.layers.0.self_attn.qkv_proj.weight": torch.cat([q, k, v]),
               "model.layers.0.mlp.gate_up_proj.weight": torch.cat([gate, up]),
               "model.norm.weight": torch.ones(4)}
    packing = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    manifest = {"model.layers.0.self_attn.q_proj.weight": (8, 4), "model.layers.0.self_attn.k_proj.weight": (2, 4),
                "model.layers.0.self_attn.v_proj.weight": (2, 4), "model.layers.0.mlp.gate_proj.weight": (6, 4),
                "model.layers.0.mlp.up_proj.weight": (6, 4), "model.norm.weight": (4,)}
    out = unpack_weights(weights, packing, manifest)
    assert sorted(out) == sorted(manifest)
    for name, tensor in [("self_attn.q_proj", q), ("self_attn.v_proj", v), ("mlp.up_proj", up)]:
        torch.testing.assert_close(out[f"model.layers.0.{name}.weight"], tensor, atol=0, rtol=0)
    # Without a manifest the fused tensors cannot be split and are left out.
    assert sorted(unpack_weights(weights, packing, None)) == ["model.norm.weight"]
