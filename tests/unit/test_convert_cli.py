"""The conversion tools: usage, one-line errors with non-zero exit, and an HF -> Megatron (TP=2)
-> HF (PP=2) round trip that must reproduce the original safetensors bit for bit.

Error cases run ``hf_to_mcore_main``/``mcore_to_hf_main`` in-process (they fail during
validation, before any process is spawned); ``--help`` and one error go through the real
``tools/*.py`` scripts in a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megacredit.megatron.convert import hf_to_mcore_main, mcore_to_hf_main

REPO = Path(__file__).resolve().parents[2]
TOOLS = {"hf_to_mcore": REPO / "tools" / "convert_hf_to_megatron.py",
         "mcore_to_hf": REPO / "tools" / "convert_megatron_to_hf.py"}


def _tiny_llama_config(**overrides):
    from megacredit.models.tiny import tiny_config

    return tiny_config("llama", vocab_size=101, **overrides)


def _run_tool(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOLS[tool]), *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error message printed"
    return err[-1]


@pytest.mark.parametrize("tool,flags", [("hf_to_mcore", ("--hf-dir", "--out", "--tp", "--pp", "--dtype")),
                                        ("mcore_to_hf", ("--mcore-dir", "--out", "--tp", "--pp", "--hf-config"))])
def test_help_prints_usage(tool, flags):
    result = _run_tool(tool, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:")
    for flag in flags:
        assert flag in result.stdout


def test_missing_hf_dir_exits_nonzero_with_one_line(tmp_path):
    result = _run_tool("hf_to_mcore", "--hf-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == [f"convert_hf_to_megatron: error: --hf-dir {tmp_path / 'nowhere'} does not exist"]


def test_missing_mcore_dir(tmp_path, capsys):
    assert mcore_to_hf_main(["--mcore-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1
    assert _error_line(capsys) == f"convert_megatron_to_hf: error: --mcore-dir {tmp_path / 'nope'} does not exist"


def test_folder_without_config_json(tmp_path, capsys):
    assert hf_to_mcore_main(["--hf-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "is not a Hugging Face model folder (no config.json)" in _error_line(capsys)


def test_unsupported_architecture_is_named(tmp_path, capsys):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    assert hf_to_mcore_main(["--hf-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    line = _error_line(capsys)
    assert "unsupported architecture" in line and "'gpt2'" in line


def test_tp_that_does_not_divide_the_heads(tmp_path, capsys):
    _tiny_llama_config().save_pretrained(tmp_path)  # 4 heads, 2 KV heads
    assert hf_to_mcore_main(["--hf-dir", str(tmp_path), "--out", str(tmp_path / "o"), "--tp", "3"]) == 1
    line = _error_line(capsys)
    assert "tp=3" in line and "num_key_value_heads=2" in line


def test_config_without_weights(tmp_path, capsys):
    _tiny_llama_config().save_pretrained(tmp_path)
    assert hf_to_mcore_main(["--hf-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "holds no *.safetensors" in _error_line(capsys)


def test_directory_without_a_complete_checkpoint(tmp_path, capsys):
    (tmp_path / "step_000004.tmp").mkdir()  # an unfinished save only
    assert mcore_to_hf_main(["--mcore-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "no complete checkpoint" in _error_line(capsys)


def _convert_to_tp2(root: Path, config) -> Path:
    """A random HF model of ``config`` (plus a tokenizer file) converted to Megatron at TP=2."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "hf")
    (root / "hf" / "tokenizer.json").write_text('{"tokenizer": "stand-in"}')
    code = hf_to_mcore_main(["--hf-dir", str(root / "hf"), "--out", str(root / "mcore"), "--tp", "2"])
    assert code == 0
    return root


def _assert_round_trip(root: Path, *layout: str) -> None:
    """mcore -> HF at ``layout`` reproduces the original safetensors bit for bit."""
    from safetensors.torch import load_file

    out = root / "hf_back"
    assert mcore_to_hf_main(["--mcore-dir", str(root / "mcore"), "--out", str(out), *layout]) == 0
    original = load_file(root / "hf" / "model.safetensors")
    restored = load_file(out / "model.safetensors")
    assert sorted(restored) == sorted(original)
    for name, tensor in original.items():
        assert restored[name].dtype == tensor.dtype, name
        assert torch.equal(restored[name], tensor), name
    assert (out / "tokenizer.json").read_text() == '{"tokenizer": "stand-in"}'


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny random HF Llama converted to Megatron at TP=2."""
    return _convert_to_tp2(tmp_path_factory.mktemp("convert"), _tiny_llama_config())


@pytest.mark.distributed
def test_hf_to_mcore_writes_a_complete_checkpoint(converted):
    mcore = converted / "mcore"
    assert (mcore / "latest").read_text().strip() == "step_000000"
    info = json.loads((mcore / "step_000000" / "megacredit_checkpoint.json").read_text())
    assert info["layout"] == {"tp": 2, "pp": 1, "dp": 1} and info["params_dtype"] == "float32"
    assert json.loads((mcore / "megacredit_convert.json").read_text())["model_type"] == "llama"
    assert (mcore / "hf_config" / "config.json").is_file()


@pytest.mark.distributed
def test_round_trip_reproduces_the_safetensors_exactly(converted):
    _assert_round_trip(converted, "--pp", "2")


@pytest.mark.distributed
def test_olmo3_round_trip_through_a_tp2_checkpoint(tmp_path):
    """OLMo-3's TP-sharded QK-norm weights and its post-norms survive a TP=2 checkpoint read back
    at TP=1 x PP=2 (the QK-norms' checkpoint shards are split on dim 0, not replicated)."""
    from megacredit.models.tiny import tiny_config

    root = _convert_to_tp2(tmp_path, tiny_config("olmo3", vocab_size=101, num_hidden_layers=4))
    assert json.loads((root / "mcore" / "megacredit_convert.json").read_text())["model_type"] == "olmo3"
    _assert_round_trip(root, "--pp", "2")


@pytest.mark.distributed
def test_qwen3_moe_round_trip_through_a_tp2_checkpoint(tmp_path):
    """A Qwen3-MoE's router and experts (per-expert checkpoint names; every expert whole on each
    rank: the tool lays out TP x PP with EP 1) survive a TP=2 checkpoint read back at PP=2."""
    from megacredit.models.tiny import tiny_config

    root = _convert_to_tp2(tmp_path, tiny_config("qwen3_moe", vocab_size=101, num_hidden_layers=2))
    assert json.loads((root / "mcore" / "megacredit_convert.json").read_text())["model_type"] == "qwen3_moe"
    _assert_round_trip(root, "--pp", "2")


@pytest.mark.distributed
def test_checkpoint_config_mismatch_is_one_line(converted, capsys):
    other = converted / "other_config"
    _tiny_llama_config(intermediate_size=96).save_pretrained(other)
    code = mcore_to_hf_main(["--mcore-dir", str(converted / "mcore"), "--out", str(converted / "bad"),
                             "--hf-config", str(other)])
    assert code == 1
    line = _error_line(capsys)
    assert "does not match the config" in line and "linear_fc1" in line
