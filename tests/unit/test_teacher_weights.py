"""The self-teacher's weights: EMA and hard-copy rules against an independent computation, and
the bit-exact restore of the policy after a teacher pass."""

import copy

import pytest
import torch

from megacredit.megatron.teacher import TeacherWeights


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _train_step(model: torch.nn.Module, optimizer, seed: int) -> None:
    inputs = torch.randn(5, 4, generator=torch.Generator().manual_seed(seed))
    optimizer.zero_grad()
    model(inputs).square().mean().backward()
    optimizer.step()


def test_ema_after_k_steps_equals_independent_ema():
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    teacher = TeacherWeights([model], kind="ema", ema_rate=0.3)
    expected = [p.detach().clone().double() for p in model.parameters()]
    for step in range(5):
        _train_step(model, optimizer, step)
        teacher.after_optimizer_step([model])
        teacher.after_training_step([model], step + 1)  # no-op for EMA
        expected = [(1 - 0.3) * e + 0.3 * p.detach().double() for e, p in zip(expected, model.parameters())]
    for got, want in zip(teacher.state_tensors(), expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    # And the teacher really differs from the policy after training.
    assert any(not torch.allclose(t, p) for t, p in zip(teacher.state_tensors(), model.parameters()))


def test_hard_copy_syncs_every_n_steps_and_is_frozen_between():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    teacher = TeacherWeights([model], kind="hard_copy", sync_every=2)
    initial = [t.clone() for t in teacher.state_tensors()]
    _train_step(model, optimizer, 0)
    teacher.after_optimizer_step([model])
    teacher.after_training_step([model], 1)
    for got, want in zip(teacher.state_tensors(), initial):
        assert torch.equal(got, want)  # frozen at step 1
    _train_step(model, optimizer, 1)
    teacher.after_training_step([model], 2)
    for got, param in zip(teacher.state_tensors(), model.parameters()):
        assert torch.equal(got, param.detach())  # synced at step 2


def test_swap_uses_teacher_weights_and_restores_policy_bit_exactly():
    model = _model()
    teacher_model = _model(seed=1)
    teacher = TeacherWeights([model], kind="ema", ema_rate=0.5)
    teacher.load_state_tensors([p.detach().clone() for p in teacher_model.parameters()])
    policy_before = copy.deepcopy(model.state_dict())
    inputs = torch.randn(3, 4)
    with teacher.swapped_in([model]):
        torch.testing.assert_close(model(inputs), teacher_model(inputs), rtol=0, atol=0)
    for name, value in model.state_dict().items():
        assert torch.equal(value, policy_before[name]), name


def test_policy_is_restored_even_if_the_pass_fails():
    model = _model()
    teacher = TeacherWeights([model], kind="ema", ema_rate=0.5)
    teacher.load_state_tensors([torch.zeros_like(p) for p in model.parameters()])
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="boom"):
        with teacher.swapped_in([model]):
            raise RuntimeError("boom")
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("kwargs,match", [
    ({"kind": "polyak"}, "teacher.kind"),
    ({"kind": "ema", "ema_rate": 0.0}, "ema_rate"),
    ({"kind": "hard_copy", "sync_every": 0}, "sync_every"),
])
def test_bad_settings_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TeacherWeights([_model()], **kwargs)


def _tensor_bytes_held(obj) -> int:
    """Bytes of every tensor an object's attributes hold (directly or in lists)."""
    held = []
    for value in vars(obj).values():
        held += [item for item in (value if isinstance(value, list) else [value]) if torch.is_tensor(item)]
    return sum(t.untyped_storage().nbytes() for t in held)


def test_the_teacher_holds_one_fp32_copy_and_no_backup_between_passes():
    model = _model()
    teacher = TeacherWeights([model], kind="ema", ema_rate=0.5)
    fp32_copy = 4 * sum(p.numel() for p in model.parameters())
    assert _tensor_bytes_held(teacher) == fp32_copy
    with teacher.swapped_in([model]):
        pass
    assert _tensor_bytes_held(teacher) == fp32_copy


def test_a_teacher_in_host_memory_gives_the_same_weights_and_passes():
    """On a CPU the host copy is the same memory and the same arithmetic: equal bit for bit."""
    models = [_model(), _model()]
    optimizers = [torch.optim.Adam(m.parameters(), lr=0.05) for m in models]
    teachers = [TeacherWeights([models[0]], ema_rate=0.3), TeacherWeights([models[1]], ema_rate=0.3, on_host=True)]
    assert teachers[0].device_tensors() and teachers[1].device_tensors() == []
    inputs = torch.randn(3, 4)
    for step in range(3):
        outputs = []
        for model, optimizer, teacher in zip(models, optimizers, teachers):
            _train_step(model, optimizer, step)
            teacher.after_optimizer_step([model])
            with teacher.swapped_in([model]):
                outputs.append(model(inputs))
        torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    for on_device, on_host in zip(teachers[0].state_tensors(), teachers[1].state_tensors()):
        assert torch.equal(on_device, on_host)
