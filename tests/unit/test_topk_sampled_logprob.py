"""Sampled-token log-prob: values, import safety without Transformer Engine, clean CPU fallback.

The TE fused path itself needs a GPU and cannot be exercised here (see the module docstring).
"""

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from megacredit.algorithms import sampled_logprob
from megacredit.algorithms.sampled_logprob import sampled_token_logprobs


def direct_sampled_logprobs(logits, token_ids):
    return torch.log_softmax(logits, -1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)


def make_inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 5, 17, generator=generator, dtype=torch.float64)
    token_ids = torch.randint(0, 17, (2, 5), generator=generator)
    return logits, token_ids


def test_matches_log_softmax_gather_with_leading_dims():
    logits, token_ids = make_inputs()
    torch.testing.assert_close(
        sampled_token_logprobs(logits, token_ids), direct_sampled_logprobs(logits, token_ids), rtol=1e-10, atol=1e-10
    )


def test_te_flag_on_cpu_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(sampled_logprob, "_warned_reasons", set())
    logits, token_ids = make_inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = sampled_token_logprobs(logits, token_ids, use_te_fused_cross_entropy=True)
        second = sampled_token_logprobs(logits, token_ids, use_te_fused_cross_entropy=True)
    runtime_warnings = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime_warnings) == 1 and "use_te_fused_cross_entropy" in str(runtime_warnings[0].message)
    for result in (first, second):
        torch.testing.assert_close(result, direct_sampled_logprobs(logits, token_ids), rtol=1e-10, atol=1e-10)


def test_flag_off_never_warns(monkeypatch):
    monkeypatch.setattr(sampled_logprob, "_warned_reasons", set())
    logits, token_ids = make_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sampled_token_logprobs(logits, token_ids)


def test_cpu_tensors_never_reach_te_even_if_it_were_importable(monkeypatch):
    def te_must_not_be_called(*args, **kwargs):
        raise AssertionError("TE fused cross entropy called with CPU tensors")

    monkeypatch.setattr(sampled_logprob, "load_te_parallel_cross_entropy", lambda: te_must_not_be_called)
    monkeypatch.setattr(sampled_logprob, "_warned_reasons", set())
    logits, token_ids = make_inputs()
    with pytest.warns(RuntimeWarning, match="not on a CUDA device"):
        result = sampled_token_logprobs(logits, token_ids, use_te_fused_cross_entropy=True)
    torch.testing.assert_close(result, direct_sampled_logprobs(logits, token_ids), rtol=1e-10, atol=1e-10)


CHILD_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from megacredit.algorithms import sampled_logprob
    assert "transformer_engine.pytorch" not in sys.modules, "TE imported eagerly"
    assert sampled_logprob.load_te_parallel_cross_entropy() is None
    logits = torch.randn(4, 9, dtype=torch.float64)
    ids = torch.tensor([0, 3, 8, 1])
    got = sampled_logprob.sampled_token_logprobs(logits, ids, use_te_fused_cross_entropy=True)
    want = torch.log_softmax(logits, -1)[torch.arange(4), ids]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    print("OK")
    """
)


@pytest.mark.parametrize("te_state", ["absent", "cpu_meta_package_raises"])
def test_import_is_safe_without_a_working_transformer_engine(te_state, tmp_path):
    if te_state == "absent":
        prelude = "import sys; sys.modules['transformer_engine'] = None\n"
    else:  # what `pip install transformer-engine` gives on a CPU machine: import raises RuntimeError
        package = tmp_path / "transformer_engine"
        package.mkdir()
        (package / "__init__.py").write_text("raise RuntimeError('no CUDA: TE cannot be used')\n")
        prelude = f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n"
    completed = subprocess.run(
        [sys.executable, "-W", "ignore::RuntimeWarning", "-c", prelude + CHILD_SCRIPT],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0 and "OK" in completed.stdout, completed.stderr
