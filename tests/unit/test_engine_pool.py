"""EnginePool: the step's prompts split contiguously across engines, gathered back in prompt
order, weights broadcast to every engine after the manifest fits every one (embedded engines)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megacredit.rollout.base import SamplingParams, manifest_of
from megacredit.rollout.embedded import EmbeddedRolloutEngine
from megacredit.rollout.pool import EnginePool, contiguous_chunks
from test_rollout_weights import streamed, tiny_model

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14], [15, 16], [17, 18, 19]]


@pytest.mark.parametrize("count,parts,expected", [
    (6, 2, [(0, 3), (3, 6)]), (7, 3, [(0, 3), (3, 5), (5, 7)]), (2, 4, [(0, 1), (1, 2)]), (0, 3, [])])
def test_contiguous_chunks(count, parts, expected):
    assert contiguous_chunks(count, parts) == expected
    with pytest.raises(ValueError, match="parts must be >= 1"):
        contiguous_chunks(3, 0)


def _engines(count=2):
    return [EmbeddedRolloutEngine(tiny_model("llama", seed=0)) for _ in range(count)]


def test_gathered_batch_is_in_prompt_order_and_equals_the_shards():
    pool, single = EnginePool(_engines(2)), _engines(1)[0]
    params = SamplingParams(temperature=1.0, max_new_tokens=4, n=2, seed=11, stop_token_ids=())
    gathered = pool.generate(PROMPTS, params)
    # What each engine must have produced: its contiguous shard, seeds offset by the shard start.
    expected = single.generate(PROMPTS[:3], params) + single.generate(
        PROMPTS[3:], dataclasses.replace(params, seed_offset=3))
    assert [o.prompt_index for o in gathered] == [i for i in range(6) for _ in range(2)]
    assert [o.prompt_ids for o in gathered] == [PROMPTS[i] for i in range(6) for _ in range(2)]
    assert [o.token_ids for o in gathered] == [o.token_ids for o in expected]
    greedy = SamplingParams(temperature=0, max_new_tokens=4, stop_token_ids=())
    assert [o.token_ids for o in pool.generate(PROMPTS, greedy)] == \
        [o.token_ids for o in single.generate(PROMPTS, greedy)]
    scores = pool.score_logprobs([p + [3] for p in PROMPTS])
    torch.testing.assert_close(torch.tensor([x for s in scores for x in s]),
                               torch.tensor([x for s in single.score_logprobs([p + [3] for p in PROMPTS]) for x in s]))


def test_weights_reach_every_engine_and_a_bad_manifest_reaches_none():
    engines = _engines(2)
    pool, donor = EnginePool(engines), tiny_model("llama", seed=1)
    pairs = list(streamed(donor))
    bad = dict(manifest_of(pairs))
    bad["model.norm.weight"] = (7,)
    before = [e.model.model.norm.weight.clone() for e in engines]
    with pytest.raises(ValueError, match="Nothing was copied"):
        pool.update_weights_from_buckets([pairs], bad)
    for engine, weight in zip(engines, before):
        torch.testing.assert_close(engine.model.model.norm.weight, weight, atol=0, rtol=0)
    report = pool.update_weights_from_buckets([pairs[:4], pairs[4:]], manifest_of(pairs))
    assert report.num_tensors == len(pairs) and report.missing_names == []
    for engine in engines:
        for name, tensor in pairs:
            torch.testing.assert_close(engine.read_weights()[name], tensor, atol=0, rtol=0)
    pool.shutdown()


def test_an_empty_pool_is_refused():
    with pytest.raises(ValueError, match="at least one engine"):
        EnginePool([])
