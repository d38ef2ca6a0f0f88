"""The embedded rollout engine against transformers' own model (tiny random configs, fp32)."""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from megacredit.models.tiny import TINY_FAMILIES, tiny_config
from megacredit.rollout.base import SamplingParams
from megacredit.rollout.embedded import EmbeddedRolloutEngine
from megacredit.rollout.sampling import left_pad

# Uneven lengths in one batch, so left padding matters.
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [18, 19, 20, 21, 22]]
LOGPROB_TOLERANCE = 1e-5


def tiny_model(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).float().eval()


def hf_greedy(model, prompts, max_new_tokens, eos_token_id=None):
    """transformers' generate on the same left-padded batch; returns new tokens per row."""
    input_ids, attention_mask = left_pad(prompts, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
            max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=0,
        )
    return out[:, input_ids.shape[1]:].tolist()


def full_forward_logprobs(model, prompt, response, temperature=1.0):
    """log_softmax(logits / T) of one non-cached, unpadded forward over prompt+response, at response."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].float()
    log_probs = torch.log_softmax(logits / temperature, dim=-1)[len(prompt) - 1:-1]
    return log_probs.gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_greedy_matches_transformers_generate_with_left_padding(family):
    model = tiny_model(family)
    engine = EmbeddedRolloutEngine(model, max_batch_size=64)
    params = SamplingParams(temperature=0.0, max_new_tokens=10, stop_token_ids=())
    outputs = engine.generate(PROMPTS, params)
    expected = hf_greedy(model, PROMPTS, max_new_tokens=10)
    assert [o.token_ids for o in outputs] == expected
    assert all(o.finish_reason == "length" for o in outputs)
    # Micro-batching (2 rows at a time, different padding) changes nothing.
    small_batches = EmbeddedRolloutEngine(model, max_batch_size=2).generate(PROMPTS, params)
    assert [o.token_ids for o in small_batches] == expected


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_logprobs_equal_full_forward_log_softmax(family):
    model = tiny_model(family)
    engine = EmbeddedRolloutEngine(model)
    # Tempered and truncated sampling: the returned log-probs are of the tempered distribution
    # over the full vocabulary (top-k / top-p truncation does not enter them).
    for params in (
        SamplingParams(temperature=1.0, max_new_tokens=8, stop_token_ids=(), seed=3, n=2),
        SamplingParams(temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=8, seed=4),
    ):
        for out in engine.generate(PROMPTS, params):
            reference = full_forward_logprobs(model, out.prompt_ids, out.token_ids, params.temperature)
            torch.testing.assert_close(
                torch.tensor(out.logprobs), reference, atol=LOGPROB_TOLERANCE, rtol=0
            )


def test_eos_stops_each_row_independently():
    model = tiny_model("llama")
    engine = EmbeddedRolloutEngine(model)
    free_run = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=10,
                                                       stop_token_ids=()))
    # A stop token that row 0 emits at some step but row 1 never emits.
    row1_tokens = set(free_run[1].token_ids)
    stop_token = next(t for t in free_run[0].token_ids[1:] if t not in row1_tokens)
    stop_step = free_run[0].token_ids.index(stop_token)
    outputs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=10,
                                                      stop_token_ids=(stop_token,)))
    assert outputs[0].token_ids == free_run[0].token_ids[: stop_step + 1]
    assert outputs[0].token_ids[-1] == stop_token and outputs[0].finish_reason == "stop"
    assert outputs[1].token_ids == free_run[1].token_ids and outputs[1].finish_reason == "length"
    for out, free in zip(outputs, free_run):
        if stop_token in free.token_ids:
            assert out.finish_reason == "stop" and len(out.logprobs) == len(out.token_ids)
    # transformers agrees (it pads finished rows with pad id 0 after the EOS).
    expected = hf_greedy(model, PROMPTS, max_new_tokens=10, eos_token_id=stop_token)
    for out, row in zip(outputs, expected):
        assert row[: len(out.token_ids)] == out.token_ids
        assert all(t == 0 for t in row[len(out.token_ids):])


def test_default_stop_ids_come_from_the_model_config():
    model = tiny_model("qwen3")
    free = EmbeddedRolloutEngine(model).generate(
        PROMPTS[:1], SamplingParams(temperature=0, max_new_tokens=6, stop_token_ids=()))[0]
    stop = free.token_ids[2]
    model.config.eos_token_id = stop
    model.generation_config.eos_token_id = stop
    out = EmbeddedRolloutEngine(model).generate(
        PROMPTS[:1], SamplingParams(temperature=0, max_new_tokens=6))[0]
    assert out.token_ids == free.token_ids[: free.token_ids.index(stop) + 1]
    assert out.finish_reason == "stop"


def test_top_k_one_and_tiny_top_p_equal_greedy():
    engine = EmbeddedRolloutEngine(tiny_model("qwen2"))
    greedy = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=8,
                                                     stop_token_ids=()))
    for params in (
        SamplingParams(temperature=1.0, top_k=1, max_new_tokens=8, stop_token_ids=(), seed=1),
        SamplingParams(temperature=1.3, top_p=1e-6, max_new_tokens=8, stop_token_ids=(), seed=2),
    ):
        sampled = engine.generate(PROMPTS, params)
        assert [o.token_ids for o in sampled] == [o.token_ids for o in greedy]


def chi_square_statistic(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson chi-square of observed counts vs probabilities; bins with expected < 5 pooled."""
    expected = probs.double() * counts.sum()
    large = expected >= 5
    observed_bins = torch.cat([counts[large].double(), counts[~large].double().sum().view(1)])
    expected_bins = torch.cat([expected[large], expected[~large].sum().view(1)])
    nonzero = expected_bins > 0
    stat = ((observed_bins - expected_bins) ** 2 / expected_bins)[nonzero].sum().item()
    return stat, int(nonzero.sum().item()) - 1


def loose_bound(degrees_of_freedom: int) -> float:
    """Mean + 6 standard deviations of a chi-square distribution: loose, yet can fail."""
    return degrees_of_freedom + 6 * math.sqrt(2 * degrees_of_freedom)


def first_token_counts(engine, prompt, params, vocab_size):
    outputs = engine.generate([prompt], params)
    tokens = torch.tensor([o.token_ids[0] for o in outputs])
    return torch.bincount(tokens, minlength=vocab_size)


def test_temperature_sampling_frequencies_match_softmax():
    model = tiny_model("llama")
    engine = EmbeddedRolloutEngine(model, max_batch_size=4096)
    prompt, temperature, num_samples = PROMPTS[0], 0.7, 4000
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].double()
    params = SamplingParams(temperature=temperature, max_new_tokens=1, n=num_samples, seed=7)
    counts = first_token_counts(engine, prompt, params, logits.numel())
    stat, dof = chi_square_statistic(counts, torch.softmax(logits / temperature, -1))
    assert stat < loose_bound(dof), (stat, dof)
    # Power check: the same counts clearly reject the untempered distribution.
    wrong_stat, wrong_dof = chi_square_statistic(counts, torch.softmax(logits, -1))
    assert wrong_stat > loose_bound(wrong_dof), (wrong_stat, wrong_dof)


def test_top_k_and_top_p_sampling_frequencies():
    model = tiny_model("qwen3")
    engine = EmbeddedRolloutEngine(model, max_batch_size=4096)
    prompt, num_samples = PROMPTS[2], 3000
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].double(), -1)
    order = torch.argsort(probs, descending=True)
    # top-k = 5: renormalised top-5 probabilities.
    top5 = torch.zeros_like(probs)
    top5[order[:5]] = probs[order[:5]]
    # top-p = 0.5 written plainly: add tokens by decreasing probability until mass >= 0.5.
    nucleus, mass = torch.zeros_like(probs), 0.0
    for token in order.tolist():
        nucleus[token] = probs[token]
        mass += probs[token].item()
        if mass >= 0.5:
            break
    for params, target in (
        (SamplingParams(top_k=5, max_new_tokens=1, n=num_samples, seed=11), top5),
        (SamplingParams(top_p=0.5, max_new_tokens=1, n=num_samples, seed=12), nucleus),
    ):
        counts = first_token_counts(engine, prompt, params, probs.numel())
        assert counts[target == 0].sum() == 0, "sampled a token outside the truncated support"
        stat, dof = chi_square_statistic(counts, target / target.sum())
        assert stat < loose_bound(dof), (params, stat, dof)


def test_seeded_sampling_is_deterministic_and_grouped_by_prompt():
    engine = EmbeddedRolloutEngine(tiny_model("llama"), max_batch_size=3)
    params = SamplingParams(temperature=1.0, max_new_tokens=6, n=3, seed=123, stop_token_ids=())
    first, second = engine.generate(PROMPTS, params), engine.generate(PROMPTS, params)
    assert [o.token_ids for o in first] == [o.token_ids for o in second]
    assert [o.prompt_index for o in first] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert all(o.prompt_ids == PROMPTS[o.prompt_index] for o in first)
    other_seed = engine.generate(PROMPTS, SamplingParams(
        temperature=1.0, max_new_tokens=6, n=3, seed=124, stop_token_ids=()))
    assert [o.token_ids for o in other_seed] != [o.token_ids for o in first]


# Frequent stop ids (1 in 8 of the 96-token vocabulary): rows finish at different steps.
FREQUENT_STOPS = tuple(range(0, 96, 8))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_shared_prompt_prefill_equals_one_prefill_per_sample(family):
    """The prompt is prefilled once for its n samples; the old algorithm (one prefill per
    sample) gives the same tokens and finish reasons and the same log-probs within
    LOGPROB_TOLERANCE (tests/integration/test_rollout_smollm2.py covers the real model).

    Not bit-identical by design: the prefill matmuls see one row per prompt instead of one per
    sample, and the BLAS may choose a different kernel (and summation order) for another row
    count. With MKL's AVX-512 kernels (Intel) the results happened to be identical; with its
    AVX2 kernels (what MKL runs on AMD EPYC; here: MKL_ENABLE_INSTRUCTIONS=AVX2) they differ by
    up to 1.3e-6. 1e-5 is float32 rounding through two layers of width 64 with a margin of ~8x;
    a real bug (a row reading another prompt's cache) moves log-probs by O(1)."""
    model = tiny_model(family)
    for max_batch_size in (4, 64):  # 4: a prompt's 3 samples span two micro-batches
        for params in (
            SamplingParams(temperature=0, max_new_tokens=8, n=3, stop_token_ids=()),
            SamplingParams(temperature=1.0, max_new_tokens=8, n=3, seed=5, stop_token_ids=FREQUENT_STOPS),
        ):
            shared = EmbeddedRolloutEngine(model, max_batch_size=max_batch_size).generate(PROMPTS, params)
            reference = EmbeddedRolloutEngine(
                model, max_batch_size=max_batch_size, share_prompt_prefill=False).generate(PROMPTS, params)
            assert [o.token_ids for o in shared] == [o.token_ids for o in reference], (max_batch_size, params)
            for got, want in zip(shared, reference):
                torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs),
                                           atol=LOGPROB_TOLERANCE, rtol=LOGPROB_TOLERANCE)
            assert [o.finish_reason for o in shared] == [o.finish_reason for o in reference]
            assert [o.prompt_index for o in shared] == [i for i in range(len(PROMPTS)) for _ in range(3)]
            if params.stop_token_ids == FREQUENT_STOPS:  # the early-stop path was exercised
                assert {"stop", "length"} <= {o.finish_reason for o in shared}


def record_forward_shapes(model) -> tuple[list, object]:
    shapes: list[tuple[int, ...]] = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda module, inputs, output: shapes.append(tuple(inputs[0].shape)))
    return shapes, hook


def test_prefill_runs_once_per_distinct_prompt_of_a_micro_batch():
    model = tiny_model("llama")
    prompts = PROMPTS + [PROMPTS[0]]  # prompt 4 repeats prompt 0: one prefill row for both
    params = SamplingParams(temperature=1.0, max_new_tokens=4, n=3, seed=0, stop_token_ids=())
    shapes, hook = record_forward_shapes(model)
    try:
        outputs = EmbeddedRolloutEngine(model, max_batch_size=64).generate(prompts, params)
        shared_shapes = list(shapes)
        shapes.clear()
        EmbeddedRolloutEngine(model, max_batch_size=64, share_prompt_prefill=False).generate(prompts, params)
    finally:
        hook.remove()
    longest = max(map(len, prompts))
    assert shared_shapes[0] == (4, longest), "prefill should hold the 4 distinct prompts once each"
    assert shared_shapes[1:] == [(15, 1)] * 3, "decoding runs on all 5 x 3 samples"
    assert shapes[0] == (15, longest), "the reference path prefills every sample"
    assert [o.prompt_index for o in outputs[-3:]] == [4, 4, 4] and outputs[-1].prompt_ids == PROMPTS[0]
    for out in outputs:  # every expanded cache row continues its own prompt
        reference = full_forward_logprobs(model, out.prompt_ids, out.token_ids)
        torch.testing.assert_close(torch.tensor(out.logprobs), reference, atol=LOGPROB_TOLERANCE, rtol=0)


def test_generation_uses_the_current_cache_api_without_deprecation_warnings(recwarn, caplog):
    """transformers 5.24 deprecates the ``past_key_values`` argument and output attribute (a
    FutureWarning per forward plus a one-time logger warning); the engine passes a
    ``DynamicCache`` as ``cache`` and never reads the old attribute."""
    from transformers.utils import logging as hf_logging

    model = tiny_model("qwen3")
    engine = EmbeddedRolloutEngine(model)
    logging.Logger.warning_once.cache_clear()  # transformers' warning_once fires once per process
    hf_logging.enable_propagation()
    warnings.simplefilter("always")
    try:
        with caplog.at_level(logging.WARNING):
            outputs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=6, n=2,
                                                              stop_token_ids=()))
    finally:
        hf_logging.disable_propagation()
    messages = [str(w.message) for w in recwarn] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "past_key_values" in m or "deprecat" in m.lower()], messages
    assert [o.token_ids for o in outputs[::2]] == hf_greedy(model, PROMPTS, max_new_tokens=6)
    assert [o.token_ids for o in outputs[1::2]] == [o.token_ids for o in outputs[::2]]


def test_progress_reports_every_sample_as_it_finishes():
    engine = EmbeddedRolloutEngine(tiny_model("llama"), max_batch_size=5)
    counts: list[int] = []
    params = SamplingParams(temperature=1.0, max_new_tokens=8, n=3, seed=5, stop_token_ids=FREQUENT_STOPS)
    outputs = engine.generate(PROMPTS, params, progress=counts.append)
    assert sum(counts) == len(outputs) == 12 and all(c > 0 for c in counts)
    assert len(counts) > 3, "samples that stop early must be reported before their micro-batch ends"


@pytest.mark.parametrize(
    "prompts, message",
    [
        ([], "non-empty list"),
        ([[1, 2], []], r"prompt_token_ids\[1\]"),
        (["hello"], r"prompt_token_ids\[0\].*tokenize"),
        ([[1, 96]], "outside"),
        ([[1] * 250], "max_position_embeddings"),
    ],
)
def test_bad_prompts_get_clear_errors(prompts, message):
    engine = EmbeddedRolloutEngine(tiny_model("llama"))
    with pytest.raises(ValueError, match=message):
        engine.generate(prompts, SamplingParams(max_new_tokens=10))


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_returned_logprobs_are_of_the_tempered_distribution(temperature):
    """Sampled at T, the engine reports log_softmax(logits / T) of its tokens (the distribution it
    sampled, which the trainer scores too), checked against an independent transformers forward."""
    model = tiny_model("qwen2")
    params = SamplingParams(temperature=temperature, max_new_tokens=6, n=2, seed=3, stop_token_ids=())
    for out in EmbeddedRolloutEngine(model, max_batch_size=8).generate(PROMPTS, params):
        expected = full_forward_logprobs(model, out.prompt_ids, out.token_ids, temperature)
        torch.testing.assert_close(torch.tensor(out.logprobs), expected, atol=LOGPROB_TOLERANCE, rtol=0)
        if temperature != 1.0:  # and not the temperature-1 ones
            untempered = full_forward_logprobs(model, out.prompt_ids, out.token_ids)
            assert (torch.tensor(out.logprobs) - untempered).abs().max() > 100 * LOGPROB_TOLERANCE
