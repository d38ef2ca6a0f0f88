"""Qwen3-MoE through the bridge: Megatron-Core (megacredit's MoE spec, expert parallelism) ==
transformers' ``Qwen3MoeForCausalLM``.

Reference: transformers' own model on a tiny random Qwen3-MoE config (2 layers, 4 experts,
top-2 with renormalised weights, hidden 64, vocab 101), every parameter perturbed (router
included, so the routing is far from uniform). test_routing_changes_the_logits shows that the
top-k renormalisation and the choice of experts change transformers' logits, so the parity below
can fail on a wrong router mapping or a wrong expert order.

Layouts on 2 gloo processes: TP=1 (DP=2, every expert on both ranks), EP=2 (experts 0-1 on rank
0, 2-3 on rank 1, tokens moved by Megatron's all-to-all dispatcher), TP=2 and TP=2 x EP=2
(attention split over TP, experts over EP on the same two ranks). Checks:
- logits (full vocabulary) equal HF's within 1e-4 (fp32; the expert outputs are summed in
  another order);
- export(load(hf)) == the HF checkpoint's tensors (per-expert names) bitwise, on rank 0 (the
  default and ``receivers="stage"``) and with ``receivers="all"`` on both ranks: the export
  gathers the experts held by other EP ranks;
- in a training forward (TP=1 and EP=2; Megatron refuses MoE training at TP>1 without sequence
  parallelism), Megatron's load-balancing loss and the router's expert loads, as
  megacredit/megatron/moe.py logs them, equal an independent computation from transformers'
  router logits (1e-5 relative).
"""

from __future__ import annotations

import pytest
import torch

from megacredit.utils.spawn import run_distributed
from megatron_test_helpers import perturbed_hf_model

pytestmark = pytest.mark.distributed

LOGITS_ATOL = 1e-4
VOCAB = 101
LAYOUTS = {"tp1": (1, 1), "ep2": (1, 2), "tp2": (2, 1), "tp2_ep2": (2, 2)}
"""layout -> (TP, EP), PP=1, 2 processes."""
TRAINING_LAYOUTS = ("tp1", "ep2")
BUCKET_BYTES = 2 * 64 * 64 * 4


def _input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(7))


def _hf_model():
    return perturbed_hf_model("qwen3_moe", seed=18, num_layers=2)


def _router_metrics(model, ctx) -> dict:
    """Megatron's MoE diagnostics of one training forward of ``_input_ids()`` on every rank."""
    from megacredit.megatron.moe import RouterLoad
    from megatron_probes import forward_logits

    load = RouterLoad([model])
    model.train()
    forward_logits(model, _input_ids()).sum().backward()
    model.eval()
    return load.step_metrics()


def _run_layouts(rank, world_size, hf_dir):
    from transformers import AutoConfig

    from megacredit.megatron.bridge import iter_hf_weight_buckets, load_hf_weights
    from megacredit.megatron.distributed import initialize
    from megacredit.megatron.model_provider import build_gpt_model
    from megatron_probes import pipeline_forward_logits

    results = {}
    hf_config = AutoConfig.from_pretrained(hf_dir)
    for layout, (tp, ep) in LAYOUTS.items():
        ctx = initialize(tp, 1, seed=1, expert_model_parallel_size=ep)
        model = build_gpt_model(hf_config, ctx)
        load_hf_weights([model], hf_dir, hf_config, ctx)
        model.eval()  # Megatron's MoE layer refuses a training forward at TP > 1 without SP
        local_experts = sorted({int(name.split("local_experts.")[1].split(".")[0])
                                for name, _ in model.named_parameters() if "local_experts." in name})
        results[layout] = dict(
            logits=pipeline_forward_logits([model], _input_ids()),
            buckets=list(iter_hf_weight_buckets([model], hf_config, ctx, BUCKET_BYTES)),
            everywhere=list(iter_hf_weight_buckets([model], hf_config, ctx, BUCKET_BYTES, receivers="all")),
            stage=list(iter_hf_weight_buckets([model], hf_config, ctx, BUCKET_BYTES, receivers="stage")),
            local_experts=local_experts, ep=(ctx.ep_size, ctx.ep_rank),
            router=_router_metrics(model, ctx) if layout in TRAINING_LAYOUTS else None,
        )
    return results


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    hf_dir = tmp_path_factory.mktemp("moe") / "hf"
    model = _hf_model()
    model.save_pretrained(hf_dir)
    return model, run_distributed(_run_layouts, world_size=2, hf_dir=str(hf_dir))


def _hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(_input_ids()).logits


def test_expert_parallel_ranks_hold_half_the_experts(moe_run):
    _, per_rank = moe_run
    assert [per_rank[r]["ep2"]["ep"] for r in (0, 1)] == [(2, 0), (2, 1)]
    assert [per_rank[r]["ep2"]["local_experts"] for r in (0, 1)] == [[0, 1], [0, 1]]  # local indices
    assert per_rank[0]["tp1"]["local_experts"] == [0, 1, 2, 3]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logits_equal_transformers(moe_run, layout):
    hf_model, per_rank = moe_run
    reference = _hf_logits(hf_model)
    for rank in (0, 1):
        logits = per_rank[rank][layout]["logits"]
        assert logits.shape == reference.shape
        torch.testing.assert_close(logits, reference, rtol=0, atol=LOGITS_ATOL)


def test_routing_changes_the_logits(moe_run):
    """Without renormalising the top-k weights, or with top-1, transformers' logits move by far
    more than the tolerance: the parity above checks Megatron's router settings."""
    from transformers import AutoModelForCausalLM

    hf_model, _ = moe_run
    reference = _hf_logits(hf_model)
    for change in (dict(norm_topk_prob=False), dict(num_experts_per_tok=1)):
        config = hf_model.config.to_dict() | change
        other = AutoModelForCausalLM.from_config(type(hf_model.config)(**config)).float().eval()
        other.load_state_dict(hf_model.state_dict())
        assert (_hf_logits(other) - reference).abs().max() > 100 * LOGITS_ATOL, change


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_export_of_load_is_bitwise_identical(moe_run, layout):
    from megacredit.rollout.expert_names import per_expert_views

    hf_model, per_rank = moe_run
    expected = per_expert_views(hf_model.state_dict())
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in expected  # checkpoint names
    exported = [pair for bucket in per_rank[0][layout]["buckets"] for pair in bucket]
    names = [name for name, _ in exported]
    assert len(names) == len(set(names)) and set(names) == set(expected)
    for name, tensor in exported:
        assert torch.equal(tensor, expected[name]), name
    assert per_rank[1][layout]["buckets"] == []
    # "stage" (remote engines: each stage's first TP / DP rank sends): rank 0 holds everything.
    assert [n for b in per_rank[0][layout]["stage"] for n, _ in b] == names and per_rank[1][layout]["stage"] == []
    assert all(torch.equal(t, expected[n]) for b in per_rank[0][layout]["stage"] for n, t in b)
    for rank in (0, 1):
        again = [pair for bucket in per_rank[rank][layout]["everywhere"] for pair in bucket]
        assert [n for n, _ in again] == names
        assert all(torch.equal(t, expected[n]) for n, t in again)


def _reference_router_metrics(hf_model) -> dict:
    """From transformers' router logits, independently of Megatron: per layer, the switch loss
    ``E / (k T^2) sum_e tokens_e probs_e`` and the expert loads tokens_e / mean_e tokens_e;
    means over layers."""
    config = hf_model.config
    experts, k = config.num_experts, config.num_experts_per_tok
    with torch.no_grad():
        router_logits = hf_model(_input_ids(), output_router_logits=True).router_logits
    losses, highs, lows = [], [], []
    for logits in router_logits:
        probs = torch.softmax(logits.double(), dim=-1)  # [T, E]
        chosen = torch.zeros_like(probs).scatter_(1, probs.topk(k, dim=-1).indices, 1.0)
        tokens = chosen.sum(dim=0)
        losses.append(float(experts / (k * len(probs) ** 2) * (tokens * probs.sum(dim=0)).sum()))
        highs.append(float(tokens.max() / tokens.mean()))
        lows.append(float(tokens.min() / tokens.mean()))
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return {"moe/load_balancing_loss": mean(losses), "moe/expert_load_max": mean(highs),
            "moe/expert_load_min": mean(lows)}


@pytest.mark.parametrize("layout", TRAINING_LAYOUTS)
def test_router_metrics_equal_an_independent_computation(moe_run, layout):
    hf_model, per_rank = moe_run
    reference = _reference_router_metrics(hf_model)
    assert reference["moe/expert_load_max"] > 1.1  # the routing is uneven: the loads measure something
    for rank in (0, 1):
        metrics = per_rank[rank][layout]["router"]
        assert metrics.keys() == reference.keys()
        for name, value in reference.items():
            assert metrics[name] == pytest.approx(value, rel=1e-5), name
