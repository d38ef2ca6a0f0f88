"""The whole RL loop on the families with a layer of their own: OLMo-3 and Qwen3-MoE.

Two CREDIT steps (teacher and contrastive passes through Megatron's schedule, the update, the
weight sync into the embedded engine) on a tiny random model of each family, once in one process
and once on 2 gloo processes in another layout. The per-step loss and gradient norm must equal the
single process's within 1e-4 (split matmuls and all-reduces; the same tolerance as
tests/integration/test_trainer_parallel.py), the rewards exactly (the rollouts are regenerated from
synced weights with the same seeds). Every sync is checked: the embedded engine's log-probs of a
probe after the export equal the trainer's within 1e-4 (``sync/probe_logprob_diff``; float32 on
both sides, transformers' kernels vs Megatron's).

OLMo-3: 4 layers (3 in a sliding window of 4 tokens, one full); the prompts are longer than the
window. Layout: TP=2.

Qwen3-MoE: 4 experts, top-2, split over EP=2 (TP=1, DP=2: each rank holds 2 experts of every
layer, tokens travel by Megatron's all-to-all dispatcher over gloo). The load-balancing loss is
off here (``model.moe_aux_loss_coeff=0``): Megatron computes it per micro-batch, and DP=2 trains
on other micro-batches than one process, so with it the gradients would differ by design
(tests/distributed/test_moe.py checks the loss itself). The router statistics are logged.
Second layout: TP=2 x EP=2 with sequence parallelism (Megatron's MoE layer trains at TP > 1 only
with it), on the same 2 ranks (DP=1). Its packed rows are padded to a multiple of TP, and the
padding tokens are routed too, so its expert loads are not compared with one process's.
"""

from __future__ import annotations

import math

import pytest

from megacredit.utils.spawn import run_distributed
from trainer_helpers import tiny_overrides, train_runs

pytestmark = [pytest.mark.integration, pytest.mark.distributed]

TOLERANCE = 1e-4
FAMILIES = {
    "olmo3": ({"model.tiny.architecture": "olmo3", "model.tiny.num_hidden_layers": 4},
              {"tp2": {"parallel.tensor_model_parallel_size": 2}}),
    "qwen3_moe": ({"model.tiny.architecture": "qwen3_moe", "model.moe_aux_loss_coeff": 0.0},
                  {"ep2": {"parallel.expert_model_parallel_size": 2},
                   "tp2_ep2_sp": {"parallel.tensor_model_parallel_size": 2, "parallel.expert_model_parallel_size": 2,
                                  "parallel.sequence_parallel": True}}),
}
"""family -> (its tiny model, {layout name: the 2-process layout})."""


def _overrides(root, family: str, layout: dict) -> list[str]:
    architecture, _ = FAMILIES[family]
    return tiny_overrides("credit", root, steps=2, **architecture, **layout,
                          **{"rollout.check_weight_sync_every": 1})


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_runs(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    (single,) = run_distributed(train_runs, world_size=1, runs=[("single", _overrides(root / "single", family, {}))])
    layouts = FAMILIES[family][1]
    parallel = run_distributed(train_runs, world_size=2,
                               runs=[(name, _overrides(root / name, family, layout)) for name, layout in layouts.items()])[0]
    return single["single"], parallel


def test_credit_steps_equal_the_single_process(family_runs):
    single, parallel = family_runs
    for layout, run in parallel.items():
        assert sorted(single) == sorted(run) == [1, 2], layout
        for step, reference in single.items():
            got = run[step]
            assert got["rollout/reward_mean"] == reference["rollout/reward_mean"], f"{layout} step {step}: rollouts"
            assert math.isfinite(reference["train/loss"]) and reference["train/grad_norm"] > 0
            assert "teacher/s_t" in reference  # CREDIT's contrastive pass ran
            for name in ("train/loss", "train/grad_norm"):
                assert got[name] == pytest.approx(reference[name], abs=TOLERANCE, rel=TOLERANCE), \
                    f"{layout} step {step} {name}"


def test_the_embedded_engine_gets_the_trainers_log_probs(family_runs):
    single, parallel = family_runs
    for layout, run in {"single": single, **parallel}.items():
        for step, record in run.items():
            assert record["sync/probe_logprob_diff"] < 1e-4, f"{layout} step {step}: {record['sync/probe_logprob_diff']}"


def test_moe_runs_log_the_router_statistics(family_runs, request):
    """Qwen3-MoE logs its router's statistics; a dense family logs none."""
    single, parallel = family_runs
    if request.node.callspec.params["family_runs"] != "qwen3_moe":
        assert not any(key.startswith("moe/") for run in (single, *parallel.values())
                       for record in run.values() for key in record)
        return
    for run in (single, *parallel.values()):
        for record in run.values():
            assert 1.0 <= record["moe/expert_load_max"] <= 2.0  # at most all tokens on 2 of 4 experts
            assert 0.0 <= record["moe/expert_load_min"] <= 1.0
            assert "moe/load_balancing_loss" not in record  # coefficient 0: not computed
    for step in single:  # the same tokens routed the same way, counted on one rank or two (no padding at EP=2)
        assert parallel["ep2"][step]["moe/expert_load_max"] == pytest.approx(single[step]["moe/expert_load_max"], rel=1e-9)
