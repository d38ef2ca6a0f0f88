"""SGLang 0.5.23 servers as remote engines (``python -m sglang.launch_server --device cpu``), for
real, weights by ``update_weights_from_distributed`` over a gloo group.

Two servers on SmolLM2-135M-Instruct (float32) are started once for the module (subprocesses
on free ports, each in its own process group, stopped by PID). Tests, in this order:

* the two servers split a step's prompts and the gathered batch equals one server's, prompt by
  prompt in prompt order (docs/engines.md), token for token with greedy decoding; sampled
  batches keep the order but not the tokens, since SGLang ignores ``sampling_seed`` without
  ``--enable-deterministic-inference``, which 0.5.23 refuses with the CPU's torch-native attention;
* the trainer with ``rollout.placement=remote`` over both servers: sync, one SDPO step,
  sync: the servers' log-probs of a fixed sequence equal megacredit's within 1e-3 (float32 on
  both sides; measured 1.2e-6 to 1.6e-6) and moved by more than 20 times that; a wrong shape or an
  unknown name raises before anything moves; an update SGLang's own loader refuses (a wrong shape
  sent past megacredit's manifest check) raises ``WeightSyncError`` with SGLang's message and
  the servers keep their weights; a server that refuses before receiving (its update session
  gone) fails the update in seconds instead of leaving the trainer in a broadcast nobody
  receives;
* a short training run over both servers with the sync check on every sync logs the sync/ and
  mismatch figures.
"""

from __future__ import annotations

import json

import pytest

from engine_scenarios import (
    SmolLM2EngineTests,
    smollm2_engine_config,
    sync_step_and_refused_updates,
    training_steps_with_sync_and_mismatch,
)
from megacredit.utils.spawn import run_distributed
from sglang_helpers import sglang_servers
from trainer_helpers import tiny_overrides, train_and_read_records

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TOLERANCE = 1e-3
PROMPTS = [[1, 504, 3458, 282], [1, 33, 44], [1, 7, 8, 9, 10], [1, 600]]


@pytest.fixture(scope="module")
def servers(smollm2_dir, tmp_path_factory):
    with sglang_servers(smollm2_dir, tmp_path_factory.mktemp("sglang_logs")) as started:
        yield started


def _outputs(outputs, with_tokens=True):
    return [(o.prompt_index, o.prompt_ids, o.token_ids if with_tokens else len(o.token_ids)) for o in outputs]


def test_two_servers_split_the_prompts_and_equal_one_server(servers):
    from megacredit.rollout.base import SamplingParams
    from megacredit.rollout.sglang_server import SGLangServerEngine

    both, one = SGLangServerEngine([s.url for s in servers]), SGLangServerEngine([servers[0].url])
    greedy = SamplingParams(temperature=0, max_new_tokens=6, n=2, seed=1234, stop_token_ids=())
    split, whole = both.generate(PROMPTS, greedy), one.generate(PROMPTS, greedy)
    assert [o.prompt_index for o in split] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert _outputs(split) == _outputs(whole)
    for a, b in zip(split, whole):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    # the second half really went to the second server: it alone gives the same for prompts 2..3
    alone = SGLangServerEngine([servers[1].url]).generate(PROMPTS[2:], greedy)
    assert [o.token_ids for o in alone] == [o.token_ids for o in whole[4:]]
    sampled = SamplingParams(temperature=1.0, max_new_tokens=4, n=2, seed=1234, stop_token_ids=())
    assert _outputs(both.generate(PROMPTS, sampled), False) == _outputs(one.generate(PROMPTS, sampled), False)
    for engine in (both, one):
        engine.shutdown()


def _refused_by_sglangs_loader(engine, sequence, greedy_tokens, norm_size):
    """A wrong shape sent past megacredit's manifest check (the engine's low-level
    ``load_weights``, inside an update it opened): both servers receive it, SGLang's loader
    refuses, the answer is success=False; winding the update down (session closed, generation
    continued) leaves the servers on their weights."""
    import torch

    from megacredit.rollout.base import SamplingParams, WeightSyncError

    before, out = engine.score_logprobs([sequence])[0], {}
    engine.begin_weight_update()
    try:
        engine.load_weights([("model.norm.weight", torch.zeros(norm_size + 1))])
        engine.finish_weight_update()
    except WeightSyncError as error:
        out["loader_refused"] = str(error)
        engine.abort_weight_update()
    greedy = SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=())
    out["loader_refusal_changed_nothing"] = (engine.score_logprobs([sequence])[0] == before and
                                             engine.generate([sequence[:12]], greedy)[0].token_ids == greedy_tokens)
    return out


def _session_vanishes(url, model_dir, norm_size):
    """The server's update session is closed behind the trainer's back (as after a server
    restart): the server refuses the bucket before receiving it; the update must fail within
    seconds, not wait in the broadcast."""
    import time

    import torch

    from megacredit.rollout.base import WeightSyncError
    from megacredit.rollout.sglang_server import SGLangServerEngine
    from megacredit.rollout.weight_group import free_port

    engine = SGLangServerEngine([url], model_path=model_dir, sync_backend="gloo", update_timeout=120)
    engine.connect_weight_sync("127.0.0.1", free_port(), group_name="megacredit_vanishing", backend="gloo")

    def buckets():
        engine.client.post(url, "/end_weight_update", {})
        yield [("model.norm.weight", torch.ones(norm_size))]

    start, out = time.monotonic(), {}
    try:
        engine.update_weights_from_buckets(buckets(), {"model.norm.weight": (norm_size,)})
    except WeightSyncError as error:
        out["vanished"] = str(error)
    out["vanished_seconds"] = time.monotonic() - start
    engine._pool.shutdown(wait=False)  # the abandoned group's send stays pending until its timeout
    return out


def _remote_scenario(rank, world_size, run_dir, urls, model_dir):
    from megacredit.trainer.loop import setup

    run, train_records, _ = setup(smollm2_engine_config(run_dir, "sdpo", **{
        "rollout.engine": "sglang", "rollout.placement": "remote", "rollout.urls": json.dumps(urls)}))
    out = sync_step_and_refused_updates(run, train_records)
    norm_size = run.hf_config.hidden_size
    out.update(_refused_by_sglangs_loader(run.engine, out["sequence"], out["greedy"], norm_size))
    out.update(_session_vanishes(urls[1], model_dir, norm_size))
    run.engine.shutdown()
    return out


@pytest.fixture(scope="module")
def remote(servers, smollm2_dir, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("sglang_remote"))
    return run_distributed(_remote_scenario, world_size=1, timeout=900, run_dir=run_dir,
                           urls=[s.url for s in servers], model_dir=str(smollm2_dir))[0]


class TestSGLangRemote(SmolLM2EngineTests):
    engine_type = "EnginePool"  # one SGLangServerEngine per server (no router)
    scenario_fixture = "remote"
    tolerance = TOLERANCE


def test_an_update_sglangs_loader_refuses_raises_with_its_message(remote):
    message = remote["loader_refused"]
    assert "SGLang update_weights_from_distributed on http://127.0.0.1" in message
    assert "Attempted to load weight (torch.Size([577])) into parameter (torch.Size([576]))" in message
    assert remote["loader_refusal_changed_nothing"]


def test_a_server_refusing_before_receiving_fails_the_update_in_seconds(remote):
    assert "must run between begin_weight_update() and end_weight_update()" in remote["vanished"]
    assert remote["vanished_seconds"] < 30, remote["vanished_seconds"]


def test_a_short_remote_training_run_over_two_servers(servers, tmp_path):
    overrides = tiny_overrides("grpo", tmp_path, steps=2, **{
        "model.name_or_path": "smollm2-135m-instruct", "rollout.engine": "sglang",
        "rollout.placement": "remote", "rollout.urls": json.dumps([s.url for s in servers]),
        "rollout.check_weight_sync_every": 1, "algorithm.rollout_is": "sequence"})
    records = run_distributed(train_and_read_records, world_size=1, timeout=900, overrides=overrides)[0]
    for record in training_steps_with_sync_and_mismatch(records, TOLERANCE):
        assert record["sync/bytes"] > 5e8 and "train/rollout_is_clip_frac" in record
