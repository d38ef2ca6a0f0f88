"""The engine interface's weight-update entry point and probe scoring (embedded engine):
a wrong name or shape anywhere in the stream raises before anything is copied."""

from __future__ import annotations

import pytest
import torch

from megacredit.rollout.base import (
    SamplingParams,
    WeightSyncError,
    check_manifest,
    manifest_of,
    request_seed,
)
from megacredit.rollout.embedded import EmbeddedRolloutEngine
from test_rollout_weights import GREEDY, PROMPTS, streamed, tiny_model


def _engines():
    return EmbeddedRolloutEngine(tiny_model("llama", seed=0)), tiny_model("llama", seed=1)


def _snapshot(engine):
    return {n: p.detach().clone() for n, p in engine.model.named_parameters()}


def _assert_unchanged(engine, snapshot, outputs_before):
    for name, param in engine.model.named_parameters():
        torch.testing.assert_close(param, snapshot[name], atol=0, rtol=0)
    after = engine.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in after] == [o.token_ids for o in outputs_before]


@pytest.mark.parametrize("defect", ["unknown_name", "wrong_shape"])
@pytest.mark.parametrize("with_manifest", [True, False])
def test_bad_tensor_in_the_last_bucket_leaves_previous_weights(defect, with_manifest):
    engine, donor = _engines()
    pairs = list(streamed(donor))
    name, tensor = pairs[-1]
    pairs[-1] = (name + "_typo", tensor) if defect == "unknown_name" else (name, tensor[:-1])
    buckets = [pairs[:4], pairs[4:]]
    snapshot, before = _snapshot(engine), engine.generate(PROMPTS, GREEDY)
    error = KeyError if defect == "unknown_name" else ValueError
    with pytest.raises(error, match="Nothing was copied"):
        engine.update_weights_from_buckets(iter(buckets), manifest_of(pairs) if with_manifest else None)
    _assert_unchanged(engine, snapshot, before)


def test_a_stream_that_departs_from_its_manifest_raises_a_sync_error():
    engine, donor = _engines()
    pairs = list(streamed(donor))
    manifest = manifest_of(pairs)
    pairs[-1] = (pairs[-1][0], pairs[-1][1][:-1])  # the manifest promised the full shape
    with pytest.raises(WeightSyncError, match="mix of old and new weights"):
        engine.update_weights_from_buckets([pairs[:4], pairs[4:]], manifest)


def test_full_update_reports_and_matches_the_donor():
    engine, donor = _engines()
    pairs = list(streamed(donor))
    report = engine.update_weights_from_buckets([pairs[:3], dict(pairs[3:])], manifest_of(pairs))
    assert report.num_tensors == len(pairs) and report.missing_names == []
    expected = EmbeddedRolloutEngine(donor).generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in engine.generate(PROMPTS, GREEDY)] == [o.token_ids for o in expected]


def test_check_manifest_suggests_the_closest_name():
    with pytest.raises(KeyError, match="did you mean 'model.norm.weight'"):
        check_manifest({"model.norm.weights": (4,)}, {"model.norm.weight": (4,)})
    with pytest.raises(ValueError, match="appears twice"):
        manifest_of([("a", torch.zeros(1)), ("a", torch.zeros(1))])


def test_score_logprobs_equals_a_direct_forward_and_the_sampled_logprobs():
    engine, _ = _engines()
    model = engine.model
    sequences = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 3]]  # different lengths: padding
    scores = engine.score_logprobs(sequences)
    for sequence, score in zip(sequences, scores):
        with torch.no_grad():
            logits = model(torch.tensor([sequence])).logits[0, :-1].double()
        direct = torch.log_softmax(logits, -1).gather(-1, torch.tensor(sequence[1:])[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(score, dtype=torch.float64), direct, atol=1e-5, rtol=0)
    # The probe and the rollout report the same quantity: log-probs at T=1 of the tokens.
    params = SamplingParams(temperature=1.0, max_new_tokens=6, stop_token_ids=(), seed=3)
    out = engine.generate([PROMPTS[0]], params)[0]
    rescored = engine.score_logprobs([out.prompt_ids + out.token_ids])[0][-len(out.token_ids):]
    torch.testing.assert_close(torch.tensor(rescored), torch.tensor(out.logprobs), atol=1e-5, rtol=0)


def test_request_seeds_and_seed_offset():
    assert request_seed(42, 0) == 42 and request_seed(42, 1) != request_seed(42, 2)
    with pytest.raises(ValueError, match="seed_offset"):
        SamplingParams(seed_offset=-1)
    engine, _ = _engines()
    params = SamplingParams(temperature=1.0, max_new_tokens=5, stop_token_ids=(), seed=9)
    same = engine.generate(PROMPTS, params) == engine.generate(PROMPTS, params)
    shifted = engine.generate(PROMPTS, SamplingParams(**{**vars(params), "seed_offset": 3}))
    assert same and [o.token_ids for o in shifted] != [o.token_ids for o in engine.generate(PROMPTS, params)]
