"""Validation of the rollout-engine and rollout-IS settings: each error names the key and the fix."""

from __future__ import annotations

import pytest

from megacredit.config import ConfigError, load_config


@pytest.mark.parametrize("overrides,message", [
    (["rollout.placement=remote"], "the embedded engine runs inside the trainer"),
    (["rollout.engine=vllm", "rollout.placement=remote"], "'rollout.urls' = [] is invalid: placement=remote needs"),
    (["rollout.engine=vllm", "rollout.urls=[http://a:1]"], "only read with rollout.placement=remote"),
    (["rollout.engine=vllm", "rollout.placement=remote", "rollout.urls=[a:1]"], "must start with http://"),
    (["rollout.engine=vllm", "rollout.placement=remote", "rollout.urls=[http://a:1]",
      "rollout.router_url=http://r:2"], "vLLM has no router"),
    (["rollout.engine=sglang", "rollout.router_url=http://r:2"], "only used with rollout.placement=remote"),
    (["rollout.sync_bucket_mb=0"], "rollout.sync_bucket_mb"),
    (["rollout.engine=sglang", "rollout.placement=remote", "rollout.urls=[http://a:1]", "rollout.sync_transport=shm"],
     "shm carries weights to remote vLLM servers only"),
    (["rollout.sync_transport=nfs"], "rollout.sync_transport"),
    (["rollout.check_weight_sync_every=-1"], "0 = never check"),
    (["rollout.check_weight_sync_tolerance=0"], "rollout.check_weight_sync_tolerance"),
    (["rollout.engine_tensor_parallel_size=0"], "rollout.engine_tensor_parallel_size"),
    (["algorithm.rollout_is_cap=0"], "algorithm.rollout_is_cap"),
])
def test_bad_engine_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(None, overrides)
    assert message in str(info.value)


def test_valid_engine_settings_load():
    cfg = load_config(None, ["rollout.engine=vllm", "rollout.placement=remote",
                             "rollout.urls=[http://10.0.0.5:8000, http://10.0.0.6:8000]",
                             "algorithm.rollout_is=sequence", "algorithm.rollout_is_cap=3.0"])
    assert cfg.rollout.urls == ["http://10.0.0.5:8000", "http://10.0.0.6:8000"]
    assert cfg.algorithm.rollout_is == "sequence" and cfg.rollout.check_weight_sync_every == 10
    with pytest.raises(ConfigError, match="rollout_is"):
        load_config(None, ["algorithm.rollout_is=geometric"])


def test_colocated_engines_on_part_of_the_job_are_refused_with_the_way_out():
    from types import SimpleNamespace

    from megacredit.trainer.builder import build_engine

    cfg = load_config(None, ["rollout.engine=vllm"])
    with pytest.raises(NotImplementedError, match="rollout.placement=remote"):
        build_engine(cfg, source=None, ctx=SimpleNamespace(rank=0, world_size=2))
