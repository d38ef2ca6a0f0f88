"""TP=2, PP=2 and DP=2 (2 gloo processes each) equal TP=1 on the same batch: loss, gradients and
the parameters after one Adam step (Megatron DDP + Megatron optimizer, clip_grad active), all
through the production driver ``megacredit.megatron.rl_passes.run_packed_schedule`` and its
``VocabHead`` (loss: token-mean NLL of the response tokens, megatron_test_helpers.response_nll).

Independent reference: one process (TP=1, PP=1, DP=1) running the WHOLE batch packed as a single
micro-batch. The parallel runs pack it into 4 micro-batches of one sequence (2 per replica at
DP=2) whose response lengths differ (12 and 9 tokens), so a per-micro-batch or per-replica mean,
or a wrong ``num_microbatches * dp_size`` loss scaling, would be caught. Everything is compared as
full Hugging Face-named tensors (the bridge's export, applied to the DDP fp32 gradient buffers for
gradients), so the comparison does not depend on the layout. Weights come from one tiny random HF
Llama saved once by the test (vocab 101, padded per TP). Tolerance 1e-5 (fp32; only the
summation order differs between layouts).
"""

from __future__ import annotations

import pytest
import torch

from megacredit.utils.spawn import run_distributed
from megatron_test_helpers import (
    NUM_SEQUENCES, export_full, fixed_tokens, grads_as_params, response_start, tiny_llama_config,
)

pytestmark = pytest.mark.distributed
TOL = dict(rtol=1e-5, atol=1e-5)
CLIP_GRAD = 0.5
LAYOUTS = {"tp2": dict(tp=2, pp=1), "pp2": dict(tp=1, pp=2), "dp2": dict(tp=1, pp=1)}


def _one_step(hf_dir, tp, pp, rows_per_micro_batch):
    """Load the HF weights, forward/backward the fixed batch, export grads, Adam step, export."""
    from megacredit.megatron import distributed
    from megacredit.megatron.bridge import load_hf_weights
    from megacredit.megatron.optimizer import (
        OptimizerSettings, build_optimizer, optimizer_step, wrap_with_ddp, zero_grads,
    )
    from megatron_test_helpers import build_model, schedule_loss

    ctx = distributed.initialize(tp, pp, seed=1234)
    hf_config = tiny_llama_config(num_layers=2)
    chunks = build_model(ctx)
    load_hf_weights(chunks, hf_dir, hf_config, ctx)
    chunks = wrap_with_ddp(chunks)
    settings = OptimizerSettings(lr=1e-3, adam_eps=1e-4, weight_decay=0.1, clip_grad=CLIP_GRAD)
    optimizer = build_optimizer(chunks, settings)
    tokens = fixed_tokens(0)
    forward_only_loss = schedule_loss(chunks, ctx, tokens, rows_per_micro_batch, forward_only=True)
    zero_grads(chunks, optimizer)
    loss = schedule_loss(chunks, ctx, tokens, rows_per_micro_batch)
    with grads_as_params(chunks):
        grads = export_full(chunks, hf_config, ctx)
    step = optimizer_step(optimizer)
    params_after = export_full(chunks, hf_config, ctx)
    return dict(loss=loss, forward_only_loss=forward_only_loss, grads=grads,
                params_after=params_after, grad_norm=step.grad_norm, success=step.success)


def _reference(rank, world_size, hf_dir):
    return _one_step(hf_dir, tp=1, pp=1, rows_per_micro_batch=NUM_SEQUENCES)


def _parallel_layouts(rank, world_size, hf_dir):
    results = {name: _one_step(hf_dir, rows_per_micro_batch=1, **layout) for name, layout in LAYOUTS.items()}
    return results if rank == 0 else None


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(num_layers=2))
    path = tmp_path_factory.mktemp("hf_tiny")
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def results(hf_dir):
    (reference,) = run_distributed(_reference, world_size=1, hf_dir=hf_dir)
    parallel = run_distributed(_parallel_layouts, world_size=2, hf_dir=hf_dir)[0]
    return reference, parallel


def test_reference_is_meaningful(results):
    reference, _ = results
    assert reference["success"]
    # the loss is a real cross entropy near log(101) for a random model, and clipping is active
    assert 3.0 < reference["loss"] < 7.0
    assert reference["grad_norm"] > CLIP_GRAD
    assert reference["forward_only_loss"] == pytest.approx(reference["loss"], rel=1e-6)
    assert len(reference["grads"]) == 2 + 9 * 2 + 1  # embed, lm_head, 9 per layer, final norm
    assert all(g.abs().sum() > 0 for g in reference["grads"].values())


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_loss_matches_tp1(results, layout):
    reference, parallel = results
    assert parallel[layout]["loss"] == pytest.approx(reference["loss"], abs=1e-5)
    assert parallel[layout]["forward_only_loss"] == pytest.approx(reference["loss"], abs=1e-5)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_gradients_match_tp1(results, layout):
    reference, parallel = results
    got = parallel[layout]["grads"]
    assert got.keys() == reference["grads"].keys()
    for name, expected in reference["grads"].items():
        torch.testing.assert_close(got[name], expected, **TOL, msg=lambda m: f"{layout} {name}: {m}")
    assert parallel[layout]["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_adam_step_with_clipping_matches_tp1(results, layout):
    reference, parallel = results
    for name, expected in reference["params_after"].items():
        torch.testing.assert_close(parallel[layout]["params_after"][name], expected, **TOL,
                                   msg=lambda m: f"{layout} {name}: {m}")


def test_tp1_step_follows_the_clipped_adamw_formula(results, hf_dir):
    """Direct formula (first AdamW step, bias-corrected): g_c = g * clip / (||g|| + 1e-6),
    p' = p (1 - lr wd) - lr g_c / (|g_c| + eps); Megatron exempts 1-D params (norms) from wd."""
    from safetensors.torch import load_file

    reference, _ = results
    initial = load_file(f"{hf_dir}/model.safetensors")
    grads = reference["grads"]
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()
    assert reference["grad_norm"] == pytest.approx(norm, rel=1e-6)
    lr, eps, weight_decay = 1e-3, 1e-4, 0.1
    for name, grad in grads.items():
        clipped = grad * (CLIP_GRAD / (norm + 1e-6))
        decay = weight_decay if grad.dim() > 1 else 0.0
        expected = initial[name] * (1 - lr * decay) - lr * clipped / (clipped.abs() + eps)
        torch.testing.assert_close(reference["params_after"][name], expected, rtol=1e-6, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


def test_reference_loss_equals_transformers_cross_entropy(results, hf_dir):
    """Independent of Megatron and of the packing: transformers' own Llama on the batch (one
    unpacked row per sequence), token-mean CE over the response tokens. Also proves the padded
    vocabulary columns (101 -> 128) are masked out."""
    from transformers import LlamaForCausalLM

    reference, _ = results
    model = LlamaForCausalLM.from_pretrained(hf_dir).eval()
    tokens = fixed_tokens(0)
    labels = tokens[:, 1:].clone()
    for row in range(len(tokens)):
        labels[row, : response_start(row) - 1] = -100  # position p predicts token p + 1
    with torch.no_grad():
        logits = model(input_ids=tokens[:, :-1]).logits.double()
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert (labels != -100).sum() == 12 + 9 + 12 + 9
    assert reference["loss"] == pytest.approx(expected.item(), abs=1e-5)
