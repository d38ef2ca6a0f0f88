"""SGLang servers that die, for real: two SGLang 0.5.23 servers of SmolLM2-135M-Instruct
(``launch_server --device cpu``, started for this module only, since its tests kill them, and
stopped by PID) behind the EnginePool the trainer builds for ``rollout.urls`` without a router.

* ``megacredit train`` over both servers, one SIGKILLed (its process group) while it generates
  step 2: the run completes on the other, logs the fault (engine, cause), counts it in
  rollout/engine_faults, and every step's metrics equal those of the same run without the fault.
  Decoding is greedy (``rollout.top_k=1``): SGLang 0.5.23 on the CPU ignores the per-request
  ``sampling_seed`` (it needs ``--enable-deterministic-inference``, which it refuses with the
  CPU's torch-native attention), so two sampled runs differ with or without a fault (see
  test_sglang_server_cpu.py and docs/reliability.md); greedy tokens are the same on every server.
  SDPO, whose distillation loss does not vanish when a group's samples agree.
* A server megacredit started (the engine holds its launcher) is restarted by the pool after it
  died and rejoins with the next weight update.
* Its only server SIGKILLed after step 1: the run stops with one line and exit status 3 within
  a bound.
"""

from __future__ import annotations

import json

import pytest

from engine_fault_helpers import check_a_kill_mid_generation, check_a_kill_of_the_only_server, kill_server
from sglang_helpers import sglang_servers
from trainer_helpers import tiny_overrides

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PROMPTS = [[1, 504, 3458, 282], [1, 33, 44], [1, 7, 8, 9, 10], [1, 600]]


@pytest.fixture(scope="module")
def servers(smollm2_dir, tmp_path_factory):
    with sglang_servers(smollm2_dir, tmp_path_factory.mktemp("sglang_fault_logs")) as started:
        yield started


def _overrides(run_dir, urls: list[str]) -> list[str]:
    return tiny_overrides("sdpo", run_dir, steps=3, **{
        "model.name_or_path": "smollm2-135m-instruct", "rollout.engine": "sglang", "rollout.placement": "remote",
        "rollout.urls": json.dumps(urls), "rollout.top_k": 1})


@pytest.mark.timeout(1800)
def test_a_server_killed_mid_generation_leaves_the_run_complete_and_its_metrics_equal(servers, tmp_path):
    check_a_kill_mid_generation(tmp_path, _overrides, servers)


@pytest.mark.timeout(1200)
def test_a_server_megacredit_started_is_restarted_and_rejoins_with_the_next_update(servers, smollm2_dir):
    """An engine given its server (``SGLangServerEngine([url], server=...)``): the dead server's
    prompts go to the other (greedy: the same tokens as the other alone), the pool restarts it (by
    PID, a new process on the same port), and it rejoins at the next weight update, a new broadcast
    group, and takes that update (the whole checkpoint, its final norm scaled): both servers then
    score alike (1e-4) and unlike before it."""
    from safetensors import safe_open

    from megacredit.rollout.base import SamplingParams, manifest_of, rebucket
    from megacredit.rollout.pool import EnginePool
    from megacredit.rollout.sglang_server import SGLangServerEngine

    if servers[1].running:  # killed by the test before, unless run alone
        kill_server(servers[1])
    if not servers[0].running:
        servers[0].start()
    engines = [SGLangServerEngine([servers[0].url], model_path=smollm2_dir, sync_backend="gloo"),
               SGLangServerEngine([servers[1].url], model_path=smollm2_dir, sync_backend="gloo", server=servers[1])]
    pool = EnginePool(engines)
    try:
        greedy = SamplingParams(temperature=0, max_new_tokens=6, n=2, stop_token_ids=())
        survived = pool.generate(PROMPTS, greedy)
        assert [o.token_ids for o in survived] == [o.token_ids for o in engines[0].generate(PROMPTS, greedy)]
        faults = pool.take_faults()
        assert [(f.engine, f.during) for f in faults] == [(f"engine 1 ({servers[1].url})", "generate")], faults
        pool._restarts[1].join(600)
        assert servers[1].running and pool.engines == [engines[0]]
        sequence = PROMPTS[0] + [11, 12, 13, 14]
        before = engines[0].score_logprobs([sequence])[0]
        # the whole checkpoint: server 0 holds the trained weights of the test before
        with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as weights:
            pairs = [(name, weights.get_tensor(name).float()) for name in weights.keys()]
        pairs = [(name, t * 1.5 if name == "model.norm.weight" else t) for name, t in pairs]
        pool.update_weights_from_buckets(rebucket(pairs, 100 << 20), manifest_of(pairs))
        assert pool.engines == engines and pool.take_faults() == []
        first, second = (engine.score_logprobs([sequence])[0] for engine in engines)
        assert max(abs(a - b) for a, b in zip(first, second)) < 1e-4
        assert max(abs(a - b) for a, b in zip(first, before)) > 1e-2
    finally:
        pool.shutdown()


@pytest.mark.timeout(1200)
def test_every_server_killed_stops_the_run_with_one_line(servers, tmp_path):
    """The run's only server: server 0."""
    server = servers[0]
    if not server.running:
        server.start()
    check_a_kill_of_the_only_server(tmp_path / "run", _overrides(tmp_path / "run", [server.url]), server)
