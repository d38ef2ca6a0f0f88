"""The CPU compatibility layer: each fix it claims, checked in a fresh process.

The layer pushes a global torch function mode, so every check runs in a spawned process
(megacredit.utils.spawn.run_distributed) and never leaks into the pytest process.
"""

import pytest
import torch

from megacredit.utils.spawn import run_distributed

pytestmark = pytest.mark.distributed


def _device_rewrites(rank, world_size):
    from megacredit.megatron import cpu_compat

    assert cpu_compat.enable_cpu_compat() is True
    assert cpu_compat.enable_cpu_compat() is True  # idempotent
    made = {
        "empty_str": torch.empty(3, device="cuda").device.type,
        "zeros_index": torch.zeros(2, device="cuda:0").device.type,
        "ones_device_obj": torch.ones(2, device=torch.device("cuda")).device.type,
        "int_device": torch.full((2,), 1.0, device=0).device.type,
        "current_device": torch.arange(3, device=torch.cuda.current_device()).device.type,
        "to_cuda": torch.ones(2).to("cuda").device.type,
        "tensor_cuda": torch.ones(2).cuda().device.type,
    }
    with torch.cuda.stream(torch.cuda.Stream()):
        torch.cuda.synchronize()
    return made


def test_cuda_device_arguments_land_on_cpu():
    (made,) = run_distributed(_device_rewrites, world_size=1)
    assert set(made.values()) == {"cpu"}, made


def _rng_tracker(rank, world_size):
    from megatron.core import parallel_state, tensor_parallel

    from megacredit.megatron import cpu_compat

    cpu_compat.enable_cpu_compat()
    parallel_state.initialize_model_parallel(1, 1, create_gloo_process_groups=False)
    tensor_parallel.model_parallel_cuda_manual_seed(123)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    outside_before = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(4)
    with tracker.fork():
        second = torch.rand(4)
    outside_after = torch.get_rng_state()
    # The tensor-parallel stream is seeded with seed + 2718 + tp_rank (Megatron's rule).
    expected = torch.rand(8, generator=torch.Generator().manual_seed(123 + 2718))
    return first, second, expected, bool(torch.equal(outside_before, outside_after))


def test_rng_tracker_forks_a_separate_cpu_stream():
    ((first, second, expected, outside_unchanged),) = run_distributed(_rng_tracker, world_size=1)
    torch.testing.assert_close(torch.cat([first, second]), expected, rtol=0, atol=0)
    assert outside_unchanged


def _clip(rank, world_size):
    from megatron.core.optimizer import optimizer as megatron_optimizer

    from megacredit.megatron import cpu_compat

    cpu_compat.enable_cpu_compat()
    params = [torch.nn.Parameter(torch.randn(5, generator=torch.Generator().manual_seed(i))) for i in range(3)]
    for i, param in enumerate(params):
        param.grad = torch.randn(5, generator=torch.Generator().manual_seed(10 + i)) * 10
    reference = [p.grad.clone() for p in params]
    total_norm = torch.linalg.vector_norm(torch.cat(reference)).item()
    megatron_optimizer.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=total_norm)
    return [p.grad for p in params], reference, total_norm


def test_gradient_clipping_matches_the_formula():
    ((clipped, reference, total_norm),) = run_distributed(_clip, world_size=1)
    scale = 1.0 / (total_norm + 1e-6)
    for got, ref in zip(clipped, reference):
        torch.testing.assert_close(got, ref * scale, rtol=1e-6, atol=1e-7)
    assert torch.linalg.vector_norm(torch.cat(clipped)).item() == pytest.approx(1.0, rel=1e-5)
