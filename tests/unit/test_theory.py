"""CREDIT's theory checked exactly on a small discrete joint P(y, z | x) (CREDIT section 3).

The joint is an explicit table over x in {0..3}, y in V^T with V = 3, T = 3, z in {0, 1, 2}.
pi(. | x, y<t, z) and pi(. | x, y<t) are defined as its exact conditionals, so Assumption 1
(posterior compatibility) holds by construction, and pi_ref = pi_theta = pi. Checked in float64:

* Corollary 2 (eq. 4): sum_t r_t(y_t) = log P(z | x, y) - log P(z | x) = pMI, to 1e-9, for every
  (x, y, z); a perturbed student that is NOT a conditional of the joint breaks it (negative control).
* Eq. 9: sum_t R_t(y_t) = pmi(y; z | x) - lambda E_x'[pmi(y; z | x')] + lambda E_x'[-log pi(y | x')],
  with E_x' the average over the C contrastive inputs actually used, to 1e-9.
* Proposition 3: E_{x'_1..x'_C iid D}[S_hat_t] >= pCMI_D by exact enumeration of all C-tuples,
  and the gap equals the Jensen gap log E_D[pi] - E_D[log pi] to 1e-9 (and is > 0 somewhere).
The per-token quantities come from megacredit.algorithms.credit (credit_token_rewards,
credit_diagnostics); the joint's marginals are computed directly from the table.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import torch

from megacredit.algorithms.credit import credit_diagnostics, credit_token_rewards

INPUTS, VOCAB, LENGTH, FEEDBACKS = 4, 3, 3, 3
TOL = 1e-9

_generator = torch.Generator().manual_seed(2605)
JOINT = torch.rand(INPUTS, *([VOCAB] * LENGTH), FEEDBACKS, generator=_generator, dtype=torch.float64) ** 3 + 0.02
JOINT = JOINT / JOINT.sum(dim=tuple(range(1, LENGTH + 2)), keepdim=True)  # P(y, z | x)
PRIOR = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)  # the data prior D over inputs
ALL_RESPONSES = list(itertools.product(range(VOCAB), repeat=LENGTH))


def prefix_mass(x: int, prefix: tuple[int, ...], z: int | None) -> float:
    """P(y_<=len(prefix) = prefix, z | x), or P(prefix | x) when z is None (marginalised)."""
    block = JOINT[(x, *prefix)]
    return float(block.sum() if z is None else block[..., z].sum())


@lru_cache(maxsize=None)
def conditional_logp(x: int, prefix: tuple[int, ...], z: int | None) -> torch.Tensor:
    """[V] exact log pi(v | x, prefix, z) (teacher) or log pi(v | x, prefix) when z is None."""
    denominator = prefix_mass(x, prefix, z)
    return torch.tensor([prefix_mass(x, prefix + (v,), z) / denominator for v in range(VOCAB)], dtype=torch.float64).log()


def passes(x: int, y: tuple[int, ...], z: int, contrastive_inputs: list[int]):
    """Teacher f [T, V], contrastive g [C, T, V], student [T, V] along the response y."""
    teacher = torch.stack([conditional_logp(x, y[:t], z) for t in range(LENGTH)])
    student = torch.stack([conditional_logp(x, y[:t], None) for t in range(LENGTH)])
    contrastive = torch.stack(
        [torch.stack([conditional_logp(xc, y[:t], z) for t in range(LENGTH)]) for xc in contrastive_inputs]
    )
    return teacher, contrastive, student


def realised_sum(rewards: torch.Tensor, y: tuple[int, ...]) -> float:
    """sum_t R_t(y_t) from [T, V] vocabulary-level rewards."""
    return float(sum(rewards[t, y[t]] for t in range(LENGTH)))


def pointwise_mi(x: int, y: tuple[int, ...], z: int) -> float:
    """pmi(y; z | x) = log P(z | x, y) - log P(z | x), from the table directly."""
    p_z_given_xy = JOINT[(x, *y, z)] / JOINT[(x, *y)].sum()
    p_z_given_x = JOINT[x].sum(dim=tuple(range(LENGTH)))[z]
    return float(torch.log(p_z_given_xy) - torch.log(p_z_given_x))


def response_logp(x: int, y: tuple[int, ...]) -> float:
    """log pi(y | x) = log sum_z P(y, z | x)."""
    return float(torch.log(JOINT[(x, *y)].sum()))


def test_corollary_2_trajectory_reward_is_pointwise_mutual_information():
    worst = 0.0
    for x, y, z in itertools.product(range(INPUTS), ALL_RESPONSES, range(FEEDBACKS)):
        teacher, contrastive, student = passes(x, y, z, [(x + 1) % INPUTS])
        rewards = credit_token_rewards(teacher, contrastive, student, lam=0.0)  # r_t(v), eq. 2
        worst = max(worst, abs(realised_sum(rewards, y) - pointwise_mi(x, y, z)))
    assert worst < TOL, worst


def test_corollary_2_fails_for_a_student_outside_the_joint():
    """Negative control: tilt the student away from the exact conditional; the identity breaks."""
    x, z = 0, 1
    errors = []
    for y in ALL_RESPONSES:
        teacher, contrastive, student = passes(x, y, z, [1])
        perturbed = torch.log_softmax(student + torch.tensor([0.3, 0.0, -0.2], dtype=torch.float64), dim=-1)
        rewards = credit_token_rewards(teacher, contrastive, perturbed, lam=0.0)
        errors.append(abs(realised_sum(rewards, y) - pointwise_mi(x, y, z)))
    assert max(errors) > 1e-3


def test_eq_9_credit_sum_is_contrastive_pmi_plus_anti_genericity_bonus():
    lam = 0.3
    worst = 0.0
    for x, y, z in itertools.product(range(INPUTS), ALL_RESPONSES, range(FEEDBACKS)):
        for contrastive_inputs in ([xc for xc in range(INPUTS) if xc != x], [(x + 2) % INPUTS]):  # C = 3 and C = 1
            teacher, contrastive, student = passes(x, y, z, contrastive_inputs)
            rewards = credit_token_rewards(teacher, contrastive, student, lam=lam)  # eq. 8
            count = len(contrastive_inputs)
            contrastive_pmi = sum(pointwise_mi(xc, y, z) for xc in contrastive_inputs) / count
            surprisal = sum(-response_logp(xc, y) for xc in contrastive_inputs) / count
            expected = pointwise_mi(x, y, z) - lam * contrastive_pmi + lam * surprisal
            worst = max(worst, abs(realised_sum(rewards, y) - expected))
    assert worst < TOL, worst


def test_proposition_3_expected_surrogate_upper_bounds_prior_contrastive_pcmi():
    contrastive_count = 2
    tuples = list(itertools.product(range(INPUTS), repeat=contrastive_count))  # x'_k iid D
    tuple_weights = torch.tensor([float(PRIOR[list(t)].prod()) for t in tuples], dtype=torch.float64)
    prefixes = [p for n in range(LENGTH) for p in itertools.product(range(VOCAB), repeat=n)]
    smallest_margin, largest_gap, worst_gap_error = float("inf"), 0.0, 0.0
    for x, z, prefix in itertools.product(range(INPUTS), range(FEEDBACKS), prefixes):
        teacher = conditional_logp(x, prefix, z)
        by_input = torch.stack([conditional_logp(xc, prefix, z) for xc in range(INPUTS)])  # [X, V]
        # S_hat_t(v, x) = f_t[v] - (1/C) sum_k g_{k,t}[v] for every C-tuple, via credit_diagnostics
        teacher_rows = teacher.expand(len(tuples), VOCAB)
        contrastive_rows = torch.stack([by_input[[t[k] for t in tuples]] for k in range(contrastive_count)])
        diagnostics = credit_diagnostics(teacher_rows, contrastive_rows, torch.zeros_like(teacher_rows), torch.ones(len(tuples), VOCAB))
        expected_signal = (tuple_weights[:, None] * diagnostics.input_specific_signal).sum(dim=0)  # [V]
        pcmi = teacher - torch.log((PRIOR[:, None] * by_input.exp()).sum(dim=0))
        jensen_gap = torch.log((PRIOR[:, None] * by_input.exp()).sum(0)) - (PRIOR[:, None] * by_input).sum(0)
        smallest_margin = min(smallest_margin, float((expected_signal - pcmi).min()))
        largest_gap = max(largest_gap, float((expected_signal - pcmi).max()))
        worst_gap_error = max(worst_gap_error, float(((expected_signal - pcmi) - jensen_gap).abs().max()))
    assert smallest_margin >= -1e-12, smallest_margin
    assert worst_gap_error < TOL, worst_gap_error
    assert largest_gap > 1e-3  # the bound is strict somewhere: the comparison is not vacuous
