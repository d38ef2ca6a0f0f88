"""``algorithm.dual_clip_c`` reaches the trainer's loss: config -> objective_settings ->
micro_batch_loss equals the direct dual-clip formula (verl's compute_policy_loss_vanilla) where
the dual clip binds (negative advantage, ratio above c). float64, tolerance 1e-12."""

from __future__ import annotations

import math

import pytest
import torch

from megacredit.trainer.builder import objective_settings
from megacredit.config import ConfigError, load_config
from megacredit.algorithms.methods import micro_batch_loss
from megacredit.algorithms.objective import MicroBatchInputs

TOL = dict(atol=1e-12, rtol=1e-12)
# rho per token: 5 (A<0: dual clip binds for c=3), 5 (A>0: upper clip), 2 (A<0: below c), 0.5
RATIOS = [[5.0, 5.0, 2.0, 0.5]]
ADVANTAGES = [[-1.5, 0.7, -1.5, -0.4]]


def _direct_loss(eps_low: float, eps_high: float, c: float | None) -> tuple[float, list[float]]:
    """Token-mean of max(-A rho, -A clip(rho)), capped at -A c where A < 0 (dual clip)."""
    per_token = []
    for rho, adv in zip(RATIOS[0], ADVANTAGES[0]):
        loss = max(-adv * rho, -adv * min(max(rho, 1 - eps_low), 1 + eps_high))
        if c is not None and adv < 0:
            loss = min(loss, -adv * c)
        per_token.append(loss)
    return sum(per_token) / len(per_token), per_token


def _trainer_loss(overrides: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = load_config(None, ["algorithm.name=grpo", *overrides])
    settings = objective_settings(cfg)
    logp = torch.tensor(RATIOS, dtype=torch.float64).log().requires_grad_()
    inputs = MicroBatchInputs(
        mask=torch.ones(1, 4, dtype=torch.bool), logp=logp, old_logp=torch.zeros(1, 4, dtype=torch.float64),
        token_advantages=torch.tensor(ADVANTAGES, dtype=torch.float64),
    )
    terms = micro_batch_loss(settings, inputs)
    loss = terms.numerator / terms.denominator
    loss.backward()
    return loss.detach(), logp.grad, terms.denominator


@pytest.mark.parametrize("c", [3.0, 2.5])
def test_trainer_loss_with_dual_clip_equals_direct_formula(c):
    loss, grad, _ = _trainer_loss([f"algorithm.dual_clip_c={c}"])
    expected, per_token = _direct_loss(0.2, 0.2, c)
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64), **TOL)
    assert per_token[0] == pytest.approx(1.5 * c)  # the dual clip binds on token 0 ...
    assert grad[0, 0] == 0.0  # ... so it carries no gradient
    # token 2 (rho=2 < c) keeps the unclipped gradient d(-A rho)/d logp = -A rho = 3
    assert grad[0, 2].item() == pytest.approx(1.5 * 2.0 / 4, abs=1e-12)


def test_dual_clip_off_and_default():
    off, off_grad, _ = _trainer_loss(["algorithm.dual_clip_c=null"])
    torch.testing.assert_close(off, torch.tensor(_direct_loss(0.2, 0.2, None)[0], dtype=torch.float64), **TOL)
    assert off_grad[0, 0].item() == pytest.approx(1.5 * 5.0 / 4, abs=1e-12)  # unclipped: -A rho / 4
    default, _, _ = _trainer_loss([])
    assert load_config(None, []).algorithm.dual_clip_c == 3.0  # the papers' verl default
    torch.testing.assert_close(default, torch.tensor(_direct_loss(0.2, 0.2, 3.0)[0], dtype=torch.float64), **TOL)
    assert not math.isclose(off.item(), default.item())


def test_dual_clip_c_must_exceed_one():
    with pytest.raises(ConfigError, match="algorithm.dual_clip_c"):
        load_config(None, ["algorithm.dual_clip_c=1.0"])
