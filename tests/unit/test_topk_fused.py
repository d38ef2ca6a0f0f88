"""Chunked top-K Functions vs a direct full-vocabulary computation; gradcheck; saved memory."""

import pytest
import torch

from megacredit.algorithms.topk import vocab_parallel_logprobs_at, vocab_parallel_topk
from megacredit.algorithms.topk_fused import (
    chunked_topk_logprobs_from_hidden,
    chunked_topk_logprobs_from_logits,
)

TOL = dict(rtol=1e-10, atol=1e-10)


def make_problem(n_rows=9, vocab=11, padded_vocab=None, hidden_size=5, n_gather=3, seed=0):
    """float64 hidden [N, H], weight [V_padded, H], gather ids [N, Kg], sampled ids [N]."""
    generator = torch.Generator().manual_seed(seed)
    padded_vocab = padded_vocab or vocab
    hidden = torch.randn(n_rows, hidden_size, generator=generator, dtype=torch.float64)
    weight = torch.randn(padded_vocab, hidden_size, generator=generator, dtype=torch.float64)
    gather_ids = torch.randint(0, vocab, (n_rows, n_gather), generator=generator)
    sampled_ids = torch.randint(0, vocab, (n_rows,), generator=generator)
    return hidden, weight, gather_ids, sampled_ids


def direct_outputs(logits, k, gather_ids, sampled_ids):
    """Plain full-vocabulary reference: log_softmax, torch.topk, gather."""
    logprobs = torch.log_softmax(logits, dim=-1)
    top = logprobs.topk(k, dim=-1)
    rows = torch.arange(logits.shape[0])
    return dict(
        topk_ids=top.indices,
        topk_logprobs=top.values,
        logsumexp=torch.logsumexp(logits, dim=-1),
        gathered_logprobs=logprobs.gather(-1, gather_ids),
        sampled_logprobs=logprobs[rows, sampled_ids],
    )


def scalar_loss(result, seed=5):
    """A fixed random linear combination of every differentiable output."""
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for name in ("topk_logprobs", "logsumexp", "gathered_logprobs", "sampled_logprobs"):
        value = result[name] if isinstance(result, dict) else getattr(result, name)
        total = total + (torch.randn(value.shape, generator=generator, dtype=value.dtype) * value).sum()
    return total


@pytest.mark.parametrize("chunk_size", [1, 4, 64])
@pytest.mark.parametrize("padded_vocab", [11, 14])
def test_hidden_path_matches_direct_values_and_gradients(chunk_size, padded_vocab):
    hidden, weight, gather_ids, sampled_ids = make_problem(padded_vocab=padded_vocab)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    ours = chunked_topk_logprobs_from_hidden(
        hidden, weight, k=4, gather_ids=gather_ids, sampled_ids=sampled_ids,
        chunk_size=chunk_size, vocab_size=11,
    )
    direct = direct_outputs(hidden @ weight[:11].T, 4, gather_ids, sampled_ids)
    assert torch.equal(ours.topk_ids, direct["topk_ids"])
    for name in ("topk_logprobs", "logsumexp", "gathered_logprobs", "sampled_logprobs"):
        torch.testing.assert_close(getattr(ours, name), direct[name], **TOL)
    our_grads = torch.autograd.grad(scalar_loss(ours), (hidden, weight))
    direct_grads = torch.autograd.grad(scalar_loss(direct), (hidden, weight))
    for our_grad, direct_grad in zip(our_grads, direct_grads):
        torch.testing.assert_close(our_grad, direct_grad, **TOL)
    assert torch.all(our_grads[1][11:] == 0)  # padded rows of the LM head get no gradient


@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_logits_path_matches_unchunked_primitives(chunk_size):
    hidden, weight, gather_ids, sampled_ids = make_problem(padded_vocab=14)
    logits = (hidden @ weight.T).requires_grad_(True)
    ours = chunked_topk_logprobs_from_logits(
        logits, k=4, gather_ids=gather_ids, sampled_ids=sampled_ids, chunk_size=chunk_size, vocab_size=11
    )
    ids, topk_logprobs = vocab_parallel_topk(logits, 4, vocab_size=11)
    unchunked = dict(
        topk_logprobs=topk_logprobs,
        logsumexp=torch.logsumexp(logits[:, :11], -1),
        gathered_logprobs=vocab_parallel_logprobs_at(logits, gather_ids, vocab_size=11),
        sampled_logprobs=vocab_parallel_logprobs_at(logits, sampled_ids, vocab_size=11),
    )
    assert torch.equal(ours.topk_ids, ids)
    for name, value in unchunked.items():
        torch.testing.assert_close(getattr(ours, name), value, **TOL)
    our_grad = torch.autograd.grad(scalar_loss(ours), logits)[0]
    unchunked_grad = torch.autograd.grad(scalar_loss(unchunked), logits)[0]
    torch.testing.assert_close(our_grad, unchunked_grad, **TOL)


def _all_differentiable(result):
    return (result.topk_logprobs, result.logsumexp, result.gathered_logprobs, result.sampled_logprobs)


def test_gradcheck_hidden_function_with_padding():
    hidden, weight, gather_ids, sampled_ids = make_problem(n_rows=5, vocab=6, padded_vocab=8, hidden_size=3)

    def run(hidden, weight):
        return _all_differentiable(chunked_topk_logprobs_from_hidden(
            hidden, weight, k=3, gather_ids=gather_ids, sampled_ids=sampled_ids, chunk_size=2, vocab_size=6
        ))

    assert torch.autograd.gradcheck(run, (hidden.requires_grad_(True), weight.requires_grad_(True)))


def test_gradcheck_logits_function_with_duplicate_gather_ids():
    hidden, weight, _, sampled_ids = make_problem(n_rows=5, vocab=7, hidden_size=3)
    gather_ids = torch.tensor([[1, 1, 2]] * 5)  # duplicates must accumulate (scatter_add)

    def run(logits):
        return _all_differentiable(chunked_topk_logprobs_from_logits(
            logits, k=2, gather_ids=gather_ids, sampled_ids=sampled_ids, chunk_size=3
        ))

    assert torch.autograd.gradcheck(run, ((hidden @ weight.T).requires_grad_(True),))


def test_leading_dims_and_optional_outputs():
    hidden, weight, gather_ids, _ = make_problem(n_rows=6)
    result = chunked_topk_logprobs_from_hidden(
        hidden.reshape(2, 3, -1), weight, gather_ids=gather_ids.reshape(2, 3, -1), chunk_size=4
    )
    assert result.topk_ids is None and result.topk_logprobs is None and result.sampled_logprobs is None
    assert result.logsumexp.shape == (2, 3) and result.gathered_logprobs.shape == (2, 3, 3)
    direct = torch.log_softmax(hidden @ weight.T, -1).gather(-1, gather_ids)
    torch.testing.assert_close(result.gathered_logprobs.reshape(6, 3), direct, **TOL)


def test_teacher_call_under_no_grad_returns_ids_without_graph():
    hidden, weight, _, _ = make_problem()
    with torch.no_grad():
        result = chunked_topk_logprobs_from_hidden(hidden, weight.requires_grad_(True), k=3, chunk_size=4)
    assert result.topk_logprobs.grad_fn is None
    assert torch.equal(result.topk_ids, (hidden @ weight.T).topk(3, -1).indices)


def test_bfloat16_inputs_accumulate_in_float32():
    hidden, weight, gather_ids, sampled_ids = make_problem(n_rows=8, vocab=50, hidden_size=16)
    hidden_bf16 = hidden.bfloat16().requires_grad_(True)
    weight_bf16 = weight.bfloat16().requires_grad_(True)
    result = chunked_topk_logprobs_from_hidden(
        hidden_bf16, weight_bf16, k=5, gather_ids=gather_ids, sampled_ids=sampled_ids, chunk_size=64
    )
    assert result.topk_logprobs.dtype == torch.float32
    # Same bf16 logits, then a float32 log-softmax: only float32 rounding may differ.
    direct = direct_outputs((hidden_bf16 @ weight_bf16.T).float(), 5, gather_ids, sampled_ids)
    for name in ("topk_logprobs", "logsumexp", "gathered_logprobs", "sampled_logprobs"):
        torch.testing.assert_close(getattr(result, name), direct[name], rtol=1e-5, atol=1e-5)
    grad_hidden, grad_weight = torch.autograd.grad(result.sampled_logprobs.sum(), (hidden_bf16, weight_bf16))
    assert grad_hidden.dtype == grad_weight.dtype == torch.bfloat16
    reference = torch.autograd.grad(direct["sampled_logprobs"].sum(), (hidden_bf16, weight_bf16))
    for ours, theirs in zip((grad_hidden, grad_weight), reference):
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=2e-2, atol=2e-2)


def saved_bytes_beyond_inputs(run, inputs):
    """Bytes of tensors saved for backward that do not alias an input (deterministic count)."""
    input_pointers = {tensor.untyped_storage().data_ptr() for tensor in inputs}
    saved = []

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in input_pointers:
            saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(saved)


@pytest.mark.parametrize("path", ["hidden", "logits"])
def test_saved_state_is_order_n_times_k_not_n_times_vocab(path):
    n_rows, k, n_gather, hidden_size = 256, 5, 4, 8
    saved = {}
    for vocab in (1000, 4000):
        hidden, weight, gather_ids, sampled_ids = make_problem(n_rows, vocab, None, hidden_size, n_gather)
        hidden, weight = hidden.float().requires_grad_(True), weight.float().requires_grad_(True)
        options = dict(k=k, gather_ids=gather_ids, sampled_ids=sampled_ids, chunk_size=32)
        if path == "hidden":
            inputs = (hidden, weight)
            run = lambda: chunked_topk_logprobs_from_hidden(hidden, weight, **options)  # noqa: E731
        else:
            logits = (hidden @ weight.T).detach().requires_grad_(True)
            inputs = (logits,)
            run = lambda: chunked_topk_logprobs_from_logits(logits, **options)  # noqa: E731
        saved[vocab] = saved_bytes_beyond_inputs(run, inputs)
    # Saved: top-k ids, gather+sampled ids (int64) and the logsumexp; nothing of size N x V.
    expected_bound = n_rows * (k * 8 + (n_gather + 1) * 8 + 8)
    assert saved[1000] == saved[4000]
    assert 0 < saved[4000] <= expected_bound < n_rows * 4000 * 4 // 50


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda h, w, g: chunked_topk_logprobs_from_hidden(h, w[:, :2]), "share H"),
        (lambda h, w, g: chunked_topk_logprobs_from_hidden(h.float(), w), "share a float dtype"),
        (lambda h, w, g: chunked_topk_logprobs_from_hidden(h, w, gather_ids=g[:4]), "gather_ids"),
        (lambda h, w, g: chunked_topk_logprobs_from_hidden(h, w, sampled_ids=g), "sampled_ids"),
        (lambda h, w, g: chunked_topk_logprobs_from_hidden(h, w, k=3, chunk_size=0), "chunk_size"),
        (lambda h, w, g: chunked_topk_logprobs_from_logits(h @ w.T, k=12), "k=12"),
        (lambda h, w, g: chunked_topk_logprobs_from_logits(h @ w.T, gather_ids=g + 11), "gather_ids"),
    ],
)
def test_bad_input_raises_a_named_error(call, message):
    hidden, weight, gather_ids, _ = make_problem()
    with pytest.raises(ValueError, match=message):
        call(hidden, weight, gather_ids)


def test_kept_logits_give_the_same_values_and_gradients():
    """Keeping the logits for the backward (instead of recomputing them) changes nothing but
    the saved bytes: one [N, V] tensor more."""
    hidden, weight, gather_ids, sampled_ids = make_problem(n_rows=10, padded_vocab=14)
    results = {}
    for budget in (0, 10**9):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)

        def run(budget=budget, h=h, w=w):
            return chunked_topk_logprobs_from_hidden(
                h, w, k=4, gather_ids=gather_ids, sampled_ids=sampled_ids, chunk_size=3, vocab_size=11,
                keep_logits_max_bytes=budget)

        saved = saved_bytes_beyond_inputs(run, (h, w))
        out = run()
        results[budget] = (out, torch.autograd.grad(scalar_loss(out), (h, w)), saved)
    (recomputed, grads_recomputed, saved_small), (kept, grads_kept, saved_big) = results[0], results[10**9]
    for name in ("topk_logprobs", "logsumexp", "gathered_logprobs", "sampled_logprobs"):
        assert torch.equal(getattr(kept, name), getattr(recomputed, name))
    for a, b in zip(grads_kept, grads_recomputed):
        assert torch.equal(a, b)
    assert saved_big - saved_small == 10 * 14 * 8  # the float64 [N, V_padded] logits


def test_rows_per_chunk_bounds_one_logits_chunk():
    from megacredit.algorithms.topk_fused import rows_per_chunk

    assert rows_per_chunk(151936, torch.float32) == 220  # 220 x 151936 x 4 B <= 128 MiB < 221 rows
    assert rows_per_chunk(151936, torch.bfloat16) == 220  # the chunk is up-cast to float32
    assert rows_per_chunk(75968, torch.float32) == 441  # TP = 2 shard
    assert rows_per_chunk(1000, torch.float32) == 1024  # small vocabularies: max_rows
    assert rows_per_chunk(10**9, torch.float32) == 16  # never fewer than 16 rows
