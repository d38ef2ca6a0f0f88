"""Single-process vocab-parallel primitives vs a direct full-vocabulary computation (float64)."""

import math

import pytest
import torch

from megacredit.algorithms.topk import (
    log_tail_mass,
    vocab_parallel_logprobs_at,
    vocab_parallel_logsumexp,
    vocab_parallel_topk,
)

TOL = dict(rtol=1e-10, atol=1e-10)


def random_logits(n_rows=6, vocab=13, seed=0, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n_rows, vocab, generator=generator, dtype=torch.float64)


def test_logsumexp_matches_torch():
    logits = random_logits()
    torch.testing.assert_close(vocab_parallel_logsumexp(logits), torch.logsumexp(logits, -1), **TOL)


def test_topk_matches_full_vocabulary_topk_of_log_softmax():
    logits = random_logits(vocab=17)
    ids, logprobs = vocab_parallel_topk(logits, k=5)
    reference = torch.log_softmax(logits, -1).topk(5, dim=-1)
    assert ids.dtype == torch.long
    assert torch.equal(ids, reference.indices)
    torch.testing.assert_close(logprobs, reference.values, **TOL)


def test_logprobs_at_matches_log_softmax_gather_for_2d_and_1d_ids():
    logits = random_logits()
    ids = torch.randint(0, 13, (6, 4), generator=torch.Generator().manual_seed(1))
    direct = torch.log_softmax(logits, -1)
    torch.testing.assert_close(vocab_parallel_logprobs_at(logits, ids), direct.gather(-1, ids), **TOL)
    sampled = ids[:, 0]
    torch.testing.assert_close(
        vocab_parallel_logprobs_at(logits, sampled), direct[torch.arange(6), sampled], **TOL
    )


def test_gradients_match_autograd_of_direct_log_softmax():
    logits = random_logits().requires_grad_(True)
    ids = torch.randint(0, 13, (6, 3), generator=torch.Generator().manual_seed(2))
    weights = torch.randn(6, 3, dtype=torch.float64)
    (vocab_parallel_logprobs_at(logits, ids) * weights).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    (torch.log_softmax(logits, -1).gather(-1, ids) * weights).sum().backward()
    torch.testing.assert_close(ours, logits.grad, **TOL)


def test_topk_logprobs_are_differentiable_like_direct_gather():
    logits = random_logits().requires_grad_(True)
    ids, logprobs = vocab_parallel_topk(logits, k=4)
    weights = torch.randn(6, 4, dtype=torch.float64)
    ours = torch.autograd.grad((logprobs * weights).sum(), logits)[0]
    direct = torch.autograd.grad((torch.log_softmax(logits, -1).gather(-1, ids) * weights).sum(), logits)[0]
    torch.testing.assert_close(ours, direct, **TOL)


def test_padded_vocab_columns_are_masked_and_get_zero_gradient():
    real_vocab, padded_vocab = 13, 16
    logits = random_logits(vocab=padded_vocab)
    logits[:, real_vocab:] = 50.0  # garbage that would dominate if not masked
    logits.requires_grad_(True)
    direct = torch.log_softmax(logits[:, :real_vocab].detach(), -1)
    lse = vocab_parallel_logsumexp(logits, vocab_size=real_vocab)
    torch.testing.assert_close(lse, torch.logsumexp(logits[:, :real_vocab].detach(), -1), **TOL)
    ids, logprobs = vocab_parallel_topk(logits, k=real_vocab, vocab_size=real_vocab)
    assert int(ids.max()) < real_vocab
    torch.testing.assert_close(logprobs, direct.topk(real_vocab, -1).values, **TOL)
    logprobs.sum().backward()
    assert torch.all(logits.grad[:, real_vocab:] == 0)


def test_log_tail_mass_matches_direct_formula():
    logprobs = torch.log_softmax(random_logits(vocab=40, scale=1.0), -1)
    topk_logprobs = logprobs.topk(10, dim=-1).values
    direct = torch.log(1.0 - torch.exp(topk_logprobs).sum(-1))
    torch.testing.assert_close(log_tail_mass(topk_logprobs), direct, **TOL)


def test_log_tail_mass_is_accurate_when_mass_is_close_to_one():
    # Top-1 mass 1 - 1e-12: the naive log(1 - exp(a)) loses ~4 significant digits here.
    topk_logprobs = torch.tensor([[math.log1p(-1e-12)]], dtype=torch.float64)
    expected = torch.tensor([math.log(1e-12)], dtype=torch.float64)
    torch.testing.assert_close(log_tail_mass(topk_logprobs), expected, rtol=1e-9, atol=0)


def test_log_tail_mass_never_nan_when_mass_rounds_to_one():
    for dtype in (torch.float32, torch.float64):
        full = torch.log_softmax(random_logits(vocab=8).to(dtype), -1)  # K = V: mass is 1
        over = torch.zeros(2, 1, dtype=dtype) + 1e-7  # slightly above 1 after rounding
        for topk_logprobs in (full, over):
            topk_logprobs = topk_logprobs.clone().requires_grad_(True)
            tail = log_tail_mass(topk_logprobs)
            tail.sum().backward()
            assert torch.isfinite(tail).all() and torch.isfinite(topk_logprobs.grad).all()
            assert torch.all(tail <= math.log(torch.finfo(dtype).eps) + 1e-6)


def test_log_tail_mass_tiny_top_mass():
    topk_logprobs = torch.full((1, 3), -40.0, dtype=torch.float64)
    expected = torch.log1p(-3 * torch.exp(torch.tensor([-40.0], dtype=torch.float64)))
    torch.testing.assert_close(log_tail_mass(topk_logprobs), expected, rtol=1e-12, atol=1e-30)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x: vocab_parallel_topk(x, k=14), "k=14"),
        (lambda x: vocab_parallel_logprobs_at(x, torch.tensor([0, 1, 2, 3, 4, 13])), "global_ids"),
        (lambda x: vocab_parallel_logprobs_at(x, torch.zeros(6, 2)), "global_ids"),
        (lambda x: vocab_parallel_logsumexp(x, vocab_size=20), "vocab_size"),
        (lambda x: vocab_parallel_logsumexp(x[0]), "logits_shard"),
        (lambda x: vocab_parallel_logsumexp(x, vocab_start=3), "vocab_start"),
    ],
)
def test_bad_input_raises_a_named_error(call, message):
    with pytest.raises(ValueError, match=message):
        call(random_logits())
