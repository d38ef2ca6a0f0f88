"""Per-token series saved for the token-credit page: R_t (CREDIT eq. 8) and the RLSD weight
(RLSD eq. 14, Algorithm 1 line 17), checked against the formulas written out per token."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from megacredit.algorithms.objective import ObjectiveSettings
from megacredit.trainer.step_metrics import teacher_metrics

LENGTHS = (3, 5)


def pass_results(num_contrastive: int, seed: int = 0):
    """Old-policy and teacher pass results of two samples with random log-probs."""
    gen = torch.Generator().manual_seed(seed)
    logp = lambda *shape: -torch.rand(*shape, generator=gen, dtype=torch.float64) * 0.6  # noqa: E731
    student = {i: SimpleNamespace(sampled_logp=logp(n)) for i, n in enumerate(LENGTHS)}
    teacher = {i: SimpleNamespace(sampled_logp=logp(n), contrastive_sampled_logp=logp(num_contrastive, n))
               for i, n in enumerate(LENGTHS)}
    return student, teacher


def test_credit_r_t_is_eq8_on_the_sampled_token():
    student, teacher = pass_results(num_contrastive=2)
    settings = ObjectiveSettings(method="credit", credit_lam=0.3)
    _, per_token = teacher_metrics([0, 1], student, teacher, [True, False], settings, torch.tensor([1.0, -1.0]))
    for i, n in enumerate(LENGTHS):
        for t in range(n):
            f = float(teacher[i].sampled_logp[t])
            g = [float(c[t]) for c in teacher[i].contrastive_sampled_logp]
            pi = float(student[i].sampled_logp[t])
            expected = f - 0.3 * sum(g) / len(g) - pi if i == 0 else 0.0  # sample 1 has no teacher signal
            assert per_token[i]["r_t"][t] == pytest.approx(expected, abs=1e-6)
            assert per_token[i]["s_t"][t] == pytest.approx(f - sum(g) / len(g) if i == 0 else 0.0, abs=1e-6)
        assert "rlsd_weight" not in per_token[i]


@pytest.mark.parametrize("method", ["rlsd", "credit_rlsd"])
def test_rlsd_weight_is_the_clipped_evidence_ratio(method):
    student, teacher = pass_results(num_contrastive=1 if method == "credit_rlsd" else 0, seed=1)
    eps_w = 0.2
    seq_adv = torch.tensor([0.7, -1.2])
    settings = ObjectiveSettings(method=method, eps_w=eps_w)
    _, per_token = teacher_metrics([0, 1], student, teacher, [True, True], settings, seq_adv)
    for i, n in enumerate(LENGTHS):
        sign = math.copysign(1.0, float(seq_adv[i]))
        for t in range(n):
            f, pi = float(teacher[i].sampled_logp[t]), float(student[i].sampled_logp[t])
            evidence = f - pi if method == "rlsd" else f - float(teacher[i].contrastive_sampled_logp[0, t])
            expected = min(1 + eps_w, max(1 - eps_w, math.exp(sign * evidence)))
            assert per_token[i]["rlsd_weight"][t] == pytest.approx(expected, abs=1e-6)
        assert "r_t" not in per_token[i]
    weights = [w for i in per_token for w in per_token[i]["rlsd_weight"]]
    assert any(abs(abs(w - 1) - eps_w) < 1e-6 for w in weights)  # some weights are clipped
    assert any(abs(w - 1) < eps_w - 1e-3 for w in weights)  # and some are not


def test_without_settings_only_delta_v_and_s_t_are_saved():
    student, teacher = pass_results(num_contrastive=1)
    _, per_token = teacher_metrics([0, 1], student, teacher, [True, True])
    assert set(per_token[0]) == {"delta_v", "s_t"}
    assert [len(per_token[i]["delta_v"]) for i in (0, 1)] == list(LENGTHS)
