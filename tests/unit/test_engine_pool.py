"""EnginePool: the step's prompts split contiguously across engines, gathered back in prompt
order, weights broadcast to every engine after the manifest fits every one (embedded engines);
engines that die are left out and their prompts moved, errors healthy engines answer are not
hidden, departed engines rejoin at a weight update (the real servers: test_engine_faults.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megacredit.rollout.base import EngineUnavailableError, RolloutEngine, SamplingParams, manifest_of
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


# ------------------------------------------------------------------- engines that die or hang
class Flaky(RolloutEngine):
    """An embedded engine that can be made to die (requests raise EngineUnavailableError, the
    health check fails) or to answer with an error while healthy; ``restart`` revives it."""

    def __init__(self, inner: EmbeddedRolloutEngine, restartable: bool = False) -> None:
        self.inner, self.restartable = inner, restartable
        self.dead, self.answer_error, self.restarts = False, None, 0

    def _serve(self):
        if self.dead:
            raise EngineUnavailableError("POST http://fake/v1/completions failed: Connection refused")
        if self.answer_error is not None:
            raise self.answer_error
        return self.inner

    def generate(self, prompt_token_ids, params, *, progress=None):
        return self._serve().generate(prompt_token_ids, params, progress=progress)

    def score_logprobs(self, sequences):
        return self._serve().score_logprobs(sequences)

    def load_weights(self, named_tensors):
        return self._serve().load_weights(named_tensors)

    def weight_manifest(self):
        return self._serve().weight_manifest()

    def read_weights(self):
        return self.inner.read_weights()

    def health_problem(self):
        return "GET http://fake/health failed: Connection refused" if self.dead else None

    def restart(self):
        if not self.restartable:
            return False
        self.restarts += 1
        self.dead = False
        return True


PARAMS = SamplingParams(temperature=1.0, max_new_tokens=4, n=2, seed=11, stop_token_ids=())


def _flaky_pool(max_faults=10, restartable=False):
    engines = [Flaky(engine, restartable) for engine in _engines(2)]
    return EnginePool(engines, max_faults=max_faults), engines


def test_a_dead_engine_s_prompts_go_to_the_one_left_and_the_batch_is_unchanged(caplog):
    pool, engines = _flaky_pool()
    reference = [o.token_ids for o in pool.generate(PROMPTS, PARAMS)]
    engines[1].dead = True
    with caplog.at_level("WARNING", logger="megacredit.rollout.pool"):
        survived = pool.generate(PROMPTS, PARAMS)
    assert [o.token_ids for o in survived] == reference  # its 3 prompts moved whole, same seeds
    assert [o.prompt_index for o in survived] == [i for i in range(6) for _ in range(2)]
    faults = pool.take_faults()
    assert [(f.engine, f.during) for f in faults] == [("engine 1 (Flaky)", "generate")]
    assert "Connection refused" in faults[0].cause and pool.take_faults() == []
    assert pool.engines == [engines[0]]
    assert "engine 1 (Flaky) failed during generate" in caplog.text and "1 engine(s) left" in caplog.text


def test_an_error_a_healthy_engine_answers_is_not_hidden():
    pool, engines = _flaky_pool()
    engines[1].answer_error = ValueError("prompt too long")
    with pytest.raises(ValueError, match="prompt too long"):
        pool.generate(PROMPTS, PARAMS)
    assert pool.take_faults() == [] and len(pool.engines) == 2


def test_no_engine_left_stops_the_run_with_one_line():
    from megacredit.utils.errors import RunFault

    pool, engines = _flaky_pool()
    engines[0].dead = engines[1].dead = True
    with pytest.raises(RunFault, match="no rollout engine is left for generate") as raised:
        pool.generate(PROMPTS, PARAMS)
    assert "\n" not in str(raised.value) and "engine 0" in str(raised.value) and "engine 1" in str(raised.value)


def test_more_faults_than_allowed_stop_the_run():
    from megacredit.utils.errors import RunFault

    pool, engines = _flaky_pool(max_faults=0)
    engines[1].dead = True
    with pytest.raises(RunFault, match="more than rollout.max_engine_faults=0"):
        pool.generate(PROMPTS, PARAMS)


def test_a_departed_engine_rejoins_at_a_weight_update_with_the_whole_update():
    pool, engines = _flaky_pool()
    engines[1].dead = True
    pool.generate(PROMPTS, PARAMS)
    engines[1].dead = False  # answers again (restarted by whoever runs it)
    assert pool.engines == [engines[0]]  # not before a weight update: it holds stale weights
    donor = tiny_model("llama", seed=1)
    pairs = list(streamed(donor))
    pool.update_weights_from_buckets([pairs], manifest_of(pairs))
    assert pool.engines == engines
    for engine in engines:
        for name, tensor in pairs:
            torch.testing.assert_close(engine.read_weights()[name], tensor, atol=0, rtol=0)


def test_a_dead_engine_dropped_during_a_weight_update_leaves_the_others_updated():
    pool, engines = _flaky_pool()
    pairs = list(streamed(tiny_model("llama", seed=1)))
    engines[0].dead = True
    pool.update_weights_from_buckets([pairs], manifest_of(pairs))
    assert pool.engines == [engines[1]] and [f.during for f in pool.take_faults()] == ["weight update"]


def test_an_engine_megacredit_started_is_restarted_and_rejoins():
    pool, engines = _flaky_pool(restartable=True)
    engines[1].dead = True
    pool.generate(PROMPTS, PARAMS)
    pool._restarts[1].join(30)
    assert engines[1].restarts == 1 and not engines[1].dead
    pairs = list(streamed(tiny_model("llama", seed=2)))
    pool.update_weights_from_buckets([pairs], manifest_of(pairs))
    assert pool.engines == engines
    pool.shutdown()
