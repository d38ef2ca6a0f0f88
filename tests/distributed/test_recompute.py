"""Activation recompute (``parallel.recompute``) changes what the backward keeps, not what it computes.

At TP=2 and at PP=2 (2 gloo processes each; a 4-layer tiny Llama, so a pipeline stage holds 2
layers) the training pass of the production driver (``run_packed_schedule``, 4 packed
micro-batches of different lengths, Megatron DDP) runs from the same weights with no recompute,
selective recompute of both submodules megacredit allows (core_attn, mlp; config/validation.py
says why not layernorm),
and full recompute (uniform in units of 1 and of 2 layers, block of 1 layer). Each recompute run
must really recompute (forward hooks count the recomputed modules' calls: twice per micro-batch)
and give the loss and every gradient (the DDP fp32 ``main_grad`` buffers) of the run without it.
Tolerance 1e-6 relative: the recomputed forward runs the same kernels on the same shapes, but
autograd may add a parameter's gradient contributions in another order (measured: 0, bit-equal).
The peak memory it saves is measured in benchmarks/memory_knobs.py (benchmarks/README.md).
"""

import pytest
import torch

from megacredit.megatron.model_provider import recompute_overrides
from megacredit.utils.spawn import run_distributed
from megatron_test_helpers import fixed_tokens

pytestmark = pytest.mark.distributed
NUM_LAYERS = 4
SETTINGS = {
    "none": recompute_overrides("none"),
    "selective": recompute_overrides("selective", modules=("core_attn", "mlp")),
    "full_uniform_1": recompute_overrides("full", "uniform", 1),
    "full_uniform_2": recompute_overrides("full", "uniform", 2),
    "full_block_1": recompute_overrides("full", "block", 1),
}
RECOMPUTED = {"selective": ("core_attention", "mlp"), "full_uniform_1": ("layer",), "full_uniform_2": ("layer",),
              "full_block_1": ("first_layer",)}
"""The modules whose forward calls double under each setting (see _count_calls)."""


def _count_calls(model) -> dict[str, list[int]]:
    """Forward calls of the first layer of this stage, of every layer, of its core attention and MLP."""
    layers = list(model.decoder.layers)
    counts = {"first_layer": [0], "layer": [0], "core_attention": [0], "mlp": [0]}

    def counter(name):
        def hook(module, args, output):
            counts[name][0] += 1
        return hook

    layers[0].register_forward_hook(counter("first_layer"))
    for layer in layers:
        layer.register_forward_hook(counter("layer"))
        layer.self_attention.core_attention.register_forward_hook(counter("core_attention"))
        layer.mlp.register_forward_hook(counter("mlp"))
    return counts


def _train_pass(ctx, overrides, initial_state):
    from megacredit.megatron.optimizer import wrap_with_ddp
    from megatron_test_helpers import build_model, schedule_loss

    chunks = build_model(ctx, NUM_LAYERS, **overrides)
    if initial_state is not None:
        chunks[0].load_state_dict(initial_state)
    state = {k: v.clone() for k, v in chunks[0].state_dict().items() if v is not None}
    counts = _count_calls(chunks[0])
    chunks = wrap_with_ddp(chunks)
    loss = schedule_loss(chunks, ctx, fixed_tokens(0), rows_per_micro_batch=1)
    grads = [p.main_grad.clone() for chunk in chunks for p in chunk.parameters()]
    return dict(loss=loss, grads=grads, calls={k: v[0] for k, v in counts.items()}), state


def _every_setting(rank, world_size, tp, pp):
    from megacredit.megatron import distributed

    ctx = distributed.initialize(tp, pp, seed=11)
    results, initial = {}, None
    for name, overrides in SETTINGS.items():
        results[name], state = _train_pass(ctx, overrides, initial)
        initial = initial or state
    return results


@pytest.fixture(scope="module", params=[(2, 1), (1, 2)], ids=["tp2", "pp2"])
def layout(request):
    tp, pp = request.param
    return run_distributed(_every_setting, world_size=2, tp=tp, pp=pp)


@pytest.mark.parametrize("setting", [name for name in SETTINGS if name != "none"])
def test_recompute_really_recomputes(layout, setting):
    for rank_results in layout:
        plain, recomputed = rank_results["none"]["calls"], rank_results[setting]["calls"]
        for module in RECOMPUTED[setting]:
            assert recomputed[module] == 2 * plain[module] > 0, (setting, module, plain, recomputed)


@pytest.mark.parametrize("setting", [name for name in SETTINGS if name != "none"])
def test_loss_and_gradients_equal_no_recompute(layout, setting):
    for rank, rank_results in enumerate(layout):
        reference, got = rank_results["none"], rank_results[setting]
        assert got["loss"] == pytest.approx(reference["loss"], rel=1e-6)
        assert len(got["grads"]) == len(reference["grads"])
        with_gradient = sum(int(g.abs().sum() > 0) for g in reference["grads"])
        assert with_gradient > 0.9 * len(reference["grads"]), (rank, with_gradient)  # not a vacuous comparison
        for index, (grad, expected) in enumerate(zip(got["grads"], reference["grads"])):
            torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-9,
                                       msg=lambda m: f"{setting} rank {rank} parameter {index}: {m}")
