"""The trainer's weight sync and its check, on the embedded engine (tiny model, one process):
a corrupted engine tensor stops the run with an error naming that tensor's layer; an engine
whose parameters do not fit the export is refused before anything is copied."""

from __future__ import annotations

from pathlib import Path

import pytest

from megacredit.utils.spawn import run_distributed
from trainer_helpers import tiny_overrides

pytestmark = pytest.mark.integration


def _scenario(rank, world_size, run_dir):
    import torch

    from megacredit.models.tiny import tiny_config
    from megacredit.rollout.base import WeightSyncError
    from megacredit.rollout.embedded import EmbeddedRolloutEngine
    from megacredit.config import load_config
    from megacredit.trainer.loop import setup
    from megacredit.trainer.weight_sync import sync_weights

    cfg = load_config(None, tiny_overrides("grpo", Path(run_dir), **{"rollout.check_weight_sync_every": 1}))
    run, _, _ = setup(cfg)
    out = {"first": sync_weights(run)}
    name = "model.layers.1.mlp.down_proj.weight"
    with torch.no_grad():
        run.engine.model.get_parameter(name).add_(0.5)
    try:
        sync_weights(run)  # re-syncs the right weights first: the check must then pass
        out["resync_heals"] = True
        run.engine.model.get_parameter(name).data.add_(0.5)
        from megacredit.trainer.weight_sync import check_weight_sync

        check_weight_sync(run, 99)
    except WeightSyncError as error:
        out["error"] = str(error)
    # An engine built for another vocabulary: refused before any copy, old weights kept.
    wrong = EmbeddedRolloutEngine.from_config(tiny_config("llama", vocab_size=97, hidden_size=64))
    before = {n: p.clone() for n, p in wrong.model.named_parameters()}
    run.engine = wrong
    try:
        sync_weights(run)
    except (KeyError, ValueError) as error:
        out["manifest_error"] = str(error)
    out["untouched"] = all(torch.equal(p, before[n]) for n, p in wrong.model.named_parameters())
    return out


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    return run_distributed(_scenario, world_size=1, run_dir=str(tmp_path_factory.mktemp("sync_check")))[0]


def test_a_good_sync_passes_the_check_and_logs_sync_metrics(scenario):
    first = scenario["first"]
    assert first["sync/probe_logprob_diff"] < 1e-4  # tolerance 0.05; float32 gives ~1e-6
    assert first["sync/bytes"] > 0 and first["sync/gb_per_s"] > 0
    assert scenario["resync_heals"]


def test_a_corrupted_engine_tensor_is_named(scenario):
    error = scenario["error"]
    assert "weight sync check failed after sync 99" in error
    assert "'model.layers.1.mlp.down_proj.weight' (layer 1)" in error


def test_an_engine_that_does_not_fit_is_refused_before_any_copy(scenario):
    assert "Nothing was copied" in scenario["manifest_error"]
    assert "model.embed_tokens.weight" in scenario["manifest_error"]
    assert scenario["untouched"]
