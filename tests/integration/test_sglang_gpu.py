"""SGLang on a GPU, for real: the check that turns the SGLang adapter from UNVERIFIED into
verified. Skipped (with the reason) without CUDA or without the ``sglang`` package, i.e. always
on the CPU machines megacredit is developed on; run it on a GPU node:

    pip install 'megacredit[sglang]'
    pytest -q tests/integration/test_sglang_gpu.py

On SmolLM2-135M-Instruct (bf16 engine, fp32 transformers reference), it checks that the
colocated ``sglang.Engine`` scores a probe like transformers; after a checked weight update from
perturbed weights (flattened buckets over CUDA IPC) it scores like transformers with those
weights; a wrong name leaves the previous weights; release / resume keep the weights; and, with
two GPUs, a remote ``sglang.launch_server`` receives the same update by NCCL broadcast.
Tolerance: bf16 engine vs fp32 reference, max |delta log p| <= 0.25 and mean <= 0.05 nats.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="SGLang needs a CUDA GPU; none here"),
    pytest.mark.skipif(importlib.util.find_spec("sglang") is None,
                       reason="sglang is not installed (GPU-only: pip install 'megacredit[sglang]')"),
]

MAX_TOL, MEAN_TOL = 0.25, 0.05
PROBE = [[1, 504, 3458, 314, 253, 3575, 282, 4649, 47, 2], [1, 57, 33, 57, 27, 238, 37, 2]]


def _reference_logprobs(model, sequences):
    out = []
    with torch.no_grad():
        for sequence in sequences:
            ids = torch.tensor([sequence], device=model.device)
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
            out.append(logp.gather(-1, ids[0, 1:, None]).squeeze(-1).tolist())
    return out


def _assert_close(got, expected):
    diffs = torch.tensor([abs(a - b) for g, e in zip(got, expected) for a, b in zip(g, e)])
    assert diffs.max() <= MAX_TOL and diffs.mean() <= MEAN_TOL, (diffs.max(), diffs.mean())


def _perturbed_pairs(model, scale=0.05, seed=0):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    pairs = []
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # tied: not in the checkpoint, follows model.embed_tokens.weight
        noise = torch.randn(tensor.shape, generator=generator) * scale * tensor.float().std().clamp(min=1e-3).cpu()
        pairs.append((name, (tensor.float().cpu() + noise).to(tensor.dtype)))
    return pairs


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM

    from megacredit.models.smollm2 import smollm2_hf_dir

    folder = smollm2_hf_dir()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).cuda().eval()
    return folder, model


def _colocated(folder):
    from megacredit.rollout.sglang import SGLangRolloutEngine

    memory_saver = importlib.util.find_spec("torch_memory_saver") is not None
    engine = SGLangRolloutEngine(folder, dtype="bfloat16", mem_fraction_static=0.3, memory_saver=memory_saver)
    return engine, memory_saver


def test_colocated_engine_scores_updates_and_refuses_bad_names(smollm2):
    from megacredit.rollout.base import SamplingParams, manifest_of, rebucket

    folder, reference = smollm2
    engine, memory_saver = _colocated(folder)
    try:
        _assert_close(engine.score_logprobs(PROBE), _reference_logprobs(reference, PROBE))
        outputs = engine.generate([PROBE[0][:5]], SamplingParams(temperature=1.0, max_new_tokens=8, n=2, seed=3))
        assert len(outputs) == 2 and all(o.token_ids and max(o.logprobs) <= 0 for o in outputs)

        pairs = [(n, t.cuda().to(torch.bfloat16)) for n, t in _perturbed_pairs(reference)]
        before = engine.score_logprobs(PROBE)
        bad = pairs[:-1] + [(pairs[-1][0] + "_typo", pairs[-1][1])]
        with pytest.raises(KeyError, match="Nothing was copied"):
            engine.update_weights_from_buckets(rebucket(bad, 32 * 2**20), manifest_of(bad))
        assert engine.score_logprobs(PROBE) == before  # previous weights in place

        engine.update_weights_from_buckets(rebucket(pairs, 32 * 2**20), manifest_of(pairs))
        reference.load_state_dict({n: t.float() for n, t in pairs}, strict=False)
        expected = _reference_logprobs(reference, PROBE)
        after = engine.score_logprobs(PROBE)
        _assert_close(after, expected)
        assert max(abs(a - b) for x, y in zip(after, before) for a, b in zip(x, y)) > 4 * MAX_TOL
        if memory_saver:
            engine.sleep()
            engine.wake()
            _assert_close(engine.score_logprobs(PROBE), expected)
    finally:
        engine.shutdown()


def _wait_healthy(url, process, seconds=600):
    from megacredit.rollout.http_json import JSONClient

    JSONClient(5).wait_healthy(url, "/health", timeout=seconds, alive=lambda: process.poll() is None)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="the NCCL path needs 2 GPUs (trainer + server)")
def test_remote_server_receives_an_nccl_broadcast_update(smollm2):
    from megacredit.rollout.base import manifest_of, rebucket
    from megacredit.rollout.sglang_server import SGLangServerEngine
    from megacredit.rollout.weight_group import free_port

    folder, reference = smollm2  # the reference (and this process, rank 0 of the group) is on GPU 0
    port = free_port()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "1", "SGLANG_RETURN_ORIGINAL_LOGPROB": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "sglang.launch_server", "--model-path", str(folder), "--host", "127.0.0.1",
         "--port", str(port), "--dtype", "bfloat16", "--mem-fraction-static", "0.3"],
        env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, server)
        engine = SGLangServerEngine([url], model_path=folder)
        engine.connect_weight_sync("127.0.0.1", free_port(), group_name="megacredit_pp0", backend="nccl")
        pairs = [(n, t.cuda().to(torch.bfloat16)) for n, t in _perturbed_pairs(reference, seed=1)]
        engine.update_weights_from_buckets(rebucket(pairs, 32 * 2**20), manifest_of(pairs))
        reference.load_state_dict({n: t.float() for n, t in pairs}, strict=False)
        _assert_close(engine.score_logprobs(PROBE), _reference_logprobs(reference, PROBE))
        engine.shutdown()
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server's own process group: only what we started
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
