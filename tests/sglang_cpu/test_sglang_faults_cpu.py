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
* Its only server SIGKILLed after step 1: the run stops with one line and exit status 3 within
  a bound.
"""

from __future__ import annotations

import json

import pytest

from engine_fault_helpers import check_a_kill_mid_generation, check_a_kill_of_the_only_server
from sglang_helpers import sglang_servers
from trainer_helpers import tiny_overrides

pytestmark = [pytest.mark.integration, pytest.mark.slow]


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
def test_every_server_killed_stops_the_run_with_one_line(servers, tmp_path):
    """The run's only server: server 0 (the test before killed server 1)."""
    server = servers[0]
    if not server.running:
        server.start()
    check_a_kill_of_the_only_server(tmp_path / "run", _overrides(tmp_path / "run", [server.url]), server)
