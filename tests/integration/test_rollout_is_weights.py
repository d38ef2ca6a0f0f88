"""Truncated rollout importance sampling (``algorithm.rollout_is``) with an engine whose
log-probs differ from the trainer's on purpose.

The embedded engine samples as usual, but reports its sampled tokens' log-probs shifted by a
known amount per position (:class:`ShiftedLogprobs`), as a mismatched engine (another kernel,
another precision) would. One GRPO step (one mini-batch, one PPO epoch) then must train with
w_t = min(exp(log pi_old - log pi_engine), C) (megacredit/algorithms/rollout_is.py), computed here
directly from the old-policy log-probs the actor used and the log-probs the engine reported; and
since the training forward's ratio to pi_old is 1 on this step, the GRPO loss is exactly
-sum_t w_t A_t / N: it must equal that, and differ from the loss of the same step without IS.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from megacredit.rollout.base import RolloutEngine
from megacredit.utils.spawn import run_distributed
from trainer_helpers import tiny_overrides

pytestmark = [pytest.mark.integration]
SHIFTS = (-1.0, 0.5, -0.25)
"""Added to the engine's log-prob of token t of sample i (SHIFTS[(i + t) mod 3]): the weights are
then about min(e^1, C) = C (truncated), e^-0.5 and e^0.25, far from the ~1 of a matching engine,
and their sum differs between the samples of a group (else GRPO's zero-sum advantages would
cancel them in the loss)."""


def shift(sample: int, t: int) -> float:
    return SHIFTS[(sample + t) % len(SHIFTS)]
CAP = 2.0


class ShiftedLogprobs(RolloutEngine):
    """Another engine's samples and weights, with its reported log-probs shifted by SHIFTS."""

    def __init__(self, inner: RolloutEngine) -> None:
        self.inner, self.outputs = inner, []

    def generate(self, prompt_token_ids, params, *, progress=None):
        outputs = [dataclasses.replace(o, logprobs=[lp + shift(i, t) for t, lp in enumerate(o.logprobs)])
                   for i, o in enumerate(self.inner.generate(prompt_token_ids, params, progress=progress))]
        self.outputs.extend(outputs)
        return outputs

    def score_logprobs(self, sequences):
        return self.inner.score_logprobs(sequences)  # the sync check's probe: unshifted

    def load_weights(self, named_tensors):
        return self.inner.load_weights(named_tensors)

    def weight_manifest(self):
        return self.inner.weight_manifest()

    def read_weights(self):
        return self.inner.read_weights()

    def missing_weight_names(self, received):
        return self.inner.missing_weight_names(received)


def _one_step(rank, world_size, run_dir: str, level: str) -> dict:
    """Set up a tiny GRPO run with the shifted engine and train one step; what the actor's
    training call received, and the step's metrics."""
    from megacredit.config import load_config
    from megacredit.trainer.loop import setup
    from megacredit.trainer.rl_step import run_step
    from megacredit.trainer.rollout import PromptStream
    from megacredit.trainer.weight_sync import sync_weights

    cfg = load_config(None, tiny_overrides("grpo", Path(run_dir), steps=1, **{
        "algorithm.rollout_is": level, "algorithm.rollout_is_cap": CAP, "training.ppo_mini_batch_size": 4}))
    run, train_records, _ = setup(cfg)
    run.engine = engine = ShiftedLogprobs(run.engine)
    sync_weights(run)
    calls = []
    train_mini_batch = run.actor.train_mini_batch

    def recorded(mini_batch, samples, student, teacher, advantages, **kwargs):
        calls.append({"old_logp": {i: s.sampled_logp.tolist() for i, s in student.items()},
                      "advantages": {i: a.tolist() for i, a in (advantages or {}).items()},
                      "weights": {i: w.tolist() for i, w in (kwargs["token_weights"] or {}).items()}})
        return train_mini_batch(mini_batch, samples, student, teacher, advantages, **kwargs)

    run.actor.train_mini_batch = recorded
    prompts = PromptStream(train_records, cfg.data.prompts_per_step, cfg.training.seed, cfg.data.shuffle).batch(0)
    metrics = run_step(run, 0, prompts)
    engine.inner.shutdown()
    return {"calls": calls, "metrics": {k: v for k, v in metrics.items() if not k.startswith("_")},
            "engine_logprobs": [o.logprobs for o in engine.outputs], "tokens": [o.token_ids for o in engine.outputs]}


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    """The same first step with rollout_is=token and with it off (same seeds: the same samples)."""
    return {level: run_distributed(_one_step, world_size=1, timeout=900,
                                   run_dir=str(tmp_path_factory.mktemp(level)), level=level)[0]
            for level in ("token", "none")}


def test_the_weights_the_loss_used_are_the_truncated_ratio_to_the_shifted_engine(steps):
    step = steps["token"]
    (call,) = step["calls"]  # one mini-batch, one epoch
    assert sorted(call["weights"]) == list(range(len(step["engine_logprobs"]))) == sorted(call["old_logp"])
    clipped = 0
    for i, weights in call["weights"].items():
        old = torch.tensor(call["old_logp"][i], dtype=torch.float64)
        engine = torch.tensor(step["engine_logprobs"][i], dtype=torch.float64)
        expected = torch.exp(old - engine).clamp(max=CAP)  # min(pi_old / pi_engine, C), token level
        torch.testing.assert_close(torch.tensor(weights, dtype=torch.float64), expected, rtol=1e-5, atol=1e-6)
        # and they are the shifts' weights: the engine's true log-probs match the trainer's (1e-4)
        by_shift = torch.tensor([min(math.exp(-shift(i, t)), CAP) for t in range(len(weights))], dtype=torch.float64)
        torch.testing.assert_close(torch.tensor(weights, dtype=torch.float64), by_shift, rtol=1e-3, atol=1e-3)
        clipped += sum(w >= CAP for w in weights)
    flat = [w for weights in call["weights"].values() for w in weights]
    assert step["metrics"]["train/rollout_is_weight_mean"] == pytest.approx(sum(flat) / len(flat), rel=1e-6)
    assert step["metrics"]["train/rollout_is_clip_frac"] == pytest.approx(clipped / len(flat), rel=1e-6)
    assert abs(step["metrics"]["train/rollout_is_weight_mean"] - 1.0) > 0.1 and clipped > 0


def test_the_loss_is_weighted_by_them_and_differs_from_the_unweighted_step(steps):
    weighted, plain = steps["token"], steps["none"]
    assert weighted["tokens"] == plain["tokens"] and weighted["engine_logprobs"] == plain["engine_logprobs"]
    (call,) = weighted["calls"]
    advantages, weights = call["advantages"], call["weights"]
    tokens = sum(len(w) for w in weights.values())
    assert any(a[0] != 0 for a in advantages.values()), "rewards all equal: no GRPO signal to weight"
    # ratio = pi_theta / pi_old = 1 at the step's only training forward: per-token loss -A_t
    expected = -sum(a * w for i in weights for a, w in zip(advantages[i], weights[i])) / tokens
    unweighted = -sum(a for i in weights for a in advantages[i]) / tokens
    assert weighted["metrics"]["train/loss"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert plain["metrics"]["train/loss"] == pytest.approx(unweighted, rel=1e-4, abs=1e-6)
    assert abs(expected - unweighted) > 1e-3, (expected, unweighted)  # measured 0.012 vs 0
    assert "train/rollout_is_weight_mean" not in plain["metrics"]
