"""SGLang on a GPU: what the CPU tests (tests/sglang_cpu/, real SGLang 0.5.23 on the CPU) cannot
show. GPU ONLY, UNVERIFIED: never ran (no GPU here). Skipped, with the reason, without CUDA or
without the ``sglang`` package, i.e. always in the CPU environments; on a GPU node:

    pip install 'megacredit[sglang]'       # in an environment whose torch SGLang accepts (docs/engines.md)
    pytest -q tests/integration/test_sglang_gpu.py

What it adds to the CPU tests: the colocated engine's update through CUDA-IPC handles (a CPU bucket
goes through shared memory instead), ``release_memory_occupation`` / ``resume_memory_occupation``
around training (need ``torch_memory_saver`` and CUDA), a bf16 engine against an fp32 reference,
and, with two GPUs, a remote ``sglang.launch_server`` receiving the update by NCCL broadcast.
Tolerance: bf16 engine vs fp32 reference, max |delta log p| <= 0.25 and mean <= 0.05 nats.
"""

from __future__ import annotations

import importlib.util

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


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="the NCCL path needs 2 GPUs (trainer + server)")
def test_remote_server_receives_an_nccl_broadcast_update(smollm2):
    from megacredit.rollout.base import manifest_of, rebucket
    from megacredit.rollout.sglang_server import SGLangServer, SGLangServerEngine
    from megacredit.rollout.weight_group import free_port

    folder, reference = smollm2  # the reference (and this process, rank 0 of the group) is on GPU 0
    server_args = {"dtype": "bfloat16", "mem_fraction_static": 0.3}
    with SGLangServer(folder, server_args=server_args, env={"CUDA_VISIBLE_DEVICES": "1"}) as server:
        engine = SGLangServerEngine([server.url], model_path=folder)
        engine.connect_weight_sync("127.0.0.1", free_port(), group_name="megacredit_pp0", backend="nccl")
        pairs = [(n, t.cuda().to(torch.bfloat16)) for n, t in _perturbed_pairs(reference, seed=1)]
        engine.update_weights_from_buckets(rebucket(pairs, 32 * 2**20), manifest_of(pairs))
        reference.load_state_dict({n: t.float() for n, t in pairs}, strict=False)
        _assert_close(engine.score_logprobs(PROBE), _reference_logprobs(reference, PROBE))
        engine.shutdown()
