"""megacredit's fused-RoPE kernel equals Megatron-Core's unfused RoPE bit for bit (values and
gradients), for packed (THD) rows and for sbhd batches, in fp32 and bf16."""

import pytest
import torch

from megacredit.megatron import rope_kernel


class _SingleRankGroup:
    """What Megatron's unfused THD RoPE asks of its context-parallel group: size 1, rank 0."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


def _freqs(kv_channels: int, max_len: int, rotary_percent: float = 1.0) -> torch.Tensor:
    """The table Megatron's RotaryEmbedding builds (non-interleaved): [max_len, 1, 1, d_rot]."""
    dim = int(kv_channels * rotary_percent)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return torch.cat((angles, angles), dim=-1)[:, None, None, :]


def _value_and_grad(fn, t: torch.Tensor):
    t = t.clone().requires_grad_(True)
    out = fn(t)
    weights = torch.linspace(-1.0, 1.0, out.numel()).view_as(out).to(out.dtype)
    (out * weights).sum().backward()
    return out.detach(), t.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotary_percent", [1.0, 0.5])
def test_thd_equals_megatron_unfused(dtype, rotary_percent):
    from megatron.core.models.common.embeddings import rope_utils

    cu_seqlens = torch.tensor([0, 5, 14, 17, 24], dtype=torch.int32)
    freqs = _freqs(16, 9, rotary_percent)
    t = torch.randn(24, 3, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    want = _value_and_grad(lambda x: rope_utils._apply_rotary_pos_emb_thd(x, cu_seqlens, freqs,
                                                                          cp_group=_SingleRankGroup()), t)
    got = _value_and_grad(lambda x: rope_kernel.rope_thd(x, cu_seqlens, freqs), t)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sbhd_equals_megatron_unfused(dtype):
    from megatron.core.models.common.embeddings import rope_utils

    freqs = _freqs(8, 6)
    t = torch.randn(6, 2, 4, 8, generator=torch.Generator().manual_seed(1)).to(dtype)
    want = _value_and_grad(lambda x: rope_utils._apply_rotary_pos_emb_bshd(x, freqs), t)
    got = _value_and_grad(lambda x: rope_kernel.rope_sbhd(x, freqs), t)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_cache_follows_the_packed_row():
    """cos/sin are reused for the same (freqs, cu_seqlens) and rebuilt for a new packed row."""
    freqs = _freqs(8, 8)
    t = torch.randn(4, 2, 8).repeat(2, 1, 1)  # the same four tokens twice
    first = rope_kernel.rope_thd(t, torch.tensor([0, 8], dtype=torch.int32), freqs)
    second = rope_kernel.rope_thd(t, torch.tensor([0, 4, 8], dtype=torch.int32), freqs)
    assert not torch.equal(first[4:], second[4:])  # positions restart at 4 in the second row
    torch.testing.assert_close(second[4:], first[:4], rtol=0, atol=0)


def test_unsupported_layouts_raise():
    freqs = _freqs(8, 4)
    with pytest.raises(ValueError, match="rotary_interleaved"):
        rope_kernel.rope_sbhd(torch.randn(4, 1, 2, 8), freqs, interleaved=True)
    with pytest.raises(ValueError, match="context_parallel"):
        rope_kernel.rope_thd(torch.randn(4, 2, 8), torch.tensor([0, 4], dtype=torch.int32), freqs, cp_size=2)
