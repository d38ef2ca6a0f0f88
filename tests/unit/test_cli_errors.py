"""Every setup failure reaches the user of ``megacredit`` as one line and exit status 2; ``--debug``
or MEGACREDIT_DEBUG=1 shows the traceback. Each case runs the real CLI in a subprocess (the tiny
model: the runs that get as far as building it take about 20 s)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megacredit.megatron.checkpoint import MARKER_FILE
from megacredit.megatron.checkpoint_manifest import list_files

ROOT = Path(__file__).resolve().parents[2]
MALFORMED_SCIKNOWEVAL = ROOT / "tests" / "fixtures" / "sciknoweval_malformed.jsonl"
TINY = [
    "model.name_or_path=tiny", "algorithm.name=grpo", "algorithm.group_size=2", "rollout.max_new_tokens=4",
    "rollout.max_seq_len=256", "data.num_generated_train=8", "data.num_generated_val=2", "data.prompts_per_step=2",
    "training.steps=1", "training.ppo_mini_batch_size=1", "parallel.micro_batch_tokens=512",
    "validation.before_training=false", "validation.after_training=false", "validation.every_steps=0",
    "logging.tensorboard=false", "logging.console=false", "checkpoint.save_every=0", "checkpoint.resume=none",
]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MEGACREDIT_DEBUG", "RANK", "WORLD_SIZE")}
    return {**env, **extra}


def _megacredit(*args: str, cwd: Path, env: dict | None = None, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    command = [*launcher, "-m", "megacredit.cli", *args] if launcher else [sys.executable, "-m", "megacredit.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=cwd, env=env or _env())


def _assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("megacredit: error:")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(errors) == 1, result.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def empty_config(tmp_path) -> Path:
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    return config


def test_unknown_env_name_is_caught_when_the_config_loads_with_a_did_you_mean(tmp_path, empty_config):
    result = _megacredit("train", str(empty_config), *TINY, "env.name=arithmetc", cwd=tmp_path)
    _assert_one_line_error(result, "'env.name'", "Did you mean 'arithmetic'?", "multiple_choice")


def test_malformed_data_row_prints_the_dataset_row_error_alone(tmp_path, empty_config):
    result = _megacredit("train", str(empty_config), *TINY, "env.name=multiple_choice",
                         "data.dataset=sciknoweval", f"data.train_path={MALFORMED_SCIKNOWEVAL}",
                         f"logging.run_dir={tmp_path / 'run'}", cwd=tmp_path)
    line = _assert_one_line_error(result, f"{MALFORMED_SCIKNOWEVAL}: row 2 (1-based), field 'answerKey'")
    assert line.startswith(f"megacredit: error: {MALFORMED_SCIKNOWEVAL}")  # the message alone, no prefix


def test_transformer_engine_on_without_it_fails_before_megatron_starts(tmp_path, empty_config):
    """No Transformer Engine on this machine: 'on' must not fall back to the local spec."""
    result = _megacredit("train", str(empty_config), *TINY, "model.transformer_engine=on",
                         f"logging.run_dir={tmp_path / 'run'}", cwd=tmp_path)
    _assert_one_line_error(result, "model.transformer_engine=on but Transformer Engine cannot load (",
                           "set model.transformer_engine=auto or off")
    assert "building the Megatron model" not in result.stdout + result.stderr


@pytest.mark.parametrize("kind, needle", [
    ("missing", "no such file or folder"),
    ("file", "is a file, not a model folder"),
    ("folder_without_config", "has no config.json, so it is not a model folder"),
])
def test_model_path_that_is_not_a_model_folder(tmp_path, empty_config, kind, needle):
    path = tmp_path / kind
    if kind == "file":
        path.write_text("not a model")
    elif kind == "folder_without_config":
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"")
    result = _megacredit("train", str(empty_config), *TINY, f"model.name_or_path={path}", cwd=tmp_path)
    _assert_one_line_error(result, "'model.name_or_path'", needle, "nothing is downloaded")


def test_tp_times_pp_not_dividing_the_processes_started_by_torchrun(tmp_path, empty_config):
    from megacredit.utils.spawn import find_free_port

    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(find_free_port()))
    result = _megacredit("train", str(empty_config), *TINY, "parallel.tensor_model_parallel_size=2",
                         "parallel.pipeline_model_parallel_size=2", f"logging.run_dir={tmp_path / 'run'}",
                         cwd=tmp_path, launcher=torchrun)
    ours = [line for line in result.stderr.splitlines() if line.startswith("megacredit: error:")]
    assert result.returncode != 0
    # one line per process; torchrun may stop the second one (SIGTERM) before it prints
    assert 1 <= len(ours) <= 2, result.stderr[-3000:]
    for line in ours:
        assert "2 * 2 = 4 (2 processes started by torchrun)" in line
        assert "TP x PP must be one of 1, 2" in line
    # torchrun prints its own ChildFailedError report; no frame of megacredit's code may show
    assert "exitcode  : 2" in result.stderr
    assert not [line for line in result.stderr.splitlines() if 'File "' in line and "/megacredit/" in line]


def _checkpoint_with_manifest(root: Path, step: int) -> Path:
    """A finished, intact-by-manifest step directory whose files are not a real checkpoint."""
    path = root / f"step_{step:06d}"
    path.mkdir(parents=True)
    (path / "common.pt").write_bytes(b"not a torch file")
    (path / "__0_0.distcp").write_bytes(bytes(300))
    info = {"step": step, "layout": {"tp": 1, "pp": 1, "dp": 1}, "format_version": 2, "has_optimizer": True,
            "has_rng": True, "params_dtype": "float32", "manifest": list_files(path)}
    (path / MARKER_FILE).write_text(json.dumps(info))
    return path


def test_checkpoint_that_cannot_be_loaded(tmp_path, empty_config):
    step_dir = _checkpoint_with_manifest(tmp_path / "ckpt", 3)
    result = _megacredit("train", str(empty_config), *TINY, f"checkpoint.resume={step_dir}",
                         f"logging.run_dir={tmp_path / 'run'}", cwd=tmp_path)
    _assert_one_line_error(result, f"cannot load {step_dir} into this model")


def test_resume_auto_when_every_checkpoint_is_damaged(tmp_path, empty_config):
    ckpt = tmp_path / "run" / "checkpoints"
    step_dir = _checkpoint_with_manifest(ckpt, 2)
    (step_dir / "__0_0.distcp").write_bytes(bytes(100))  # truncated: 100 of 300 bytes
    result = _megacredit("train", str(empty_config), *TINY, "checkpoint.resume=auto",
                         f"logging.run_dir={tmp_path / 'run'}", cwd=tmp_path)
    _assert_one_line_error(result, "no intact checkpoint", "step_000002: __0_0.distcp has 100 bytes")
    warnings = [line for line in result.stderr.splitlines() if line.startswith("megacredit: warning:")]
    assert any("step_000002 is damaged" in line for line in warnings), result.stderr[-2000:]


def test_plot_skips_corrupt_metrics_lines_with_a_count(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        '{"step": 1, "train/loss": 1.0}\n{garbage\n[1, 2]\n{"no_step": 1}\n{"step": 2, "train/loss": 0.5}\n')
    result = _megacredit("plot", str(run), cwd=tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "skipped 3 malformed line(s); first: line 2 is not valid JSON" in result.stderr
    assert (run / "learning_curve.png").stat().st_size > 0


def test_config_path_that_is_a_directory_says_so(tmp_path):
    _assert_one_line_error(_megacredit("train", str(tmp_path), cwd=tmp_path), "is a directory")


@pytest.mark.parametrize("how", ["flag", "flag_after_command", "environment"])
def test_debug_shows_the_full_traceback(tmp_path, how):
    args = {"flag": ["--debug", "config", "show", str(tmp_path)],
            "flag_after_command": ["config", "show", str(tmp_path), "--debug"],
            "environment": ["config", "show", str(tmp_path)]}[how]
    env = _env(MEGACREDIT_DEBUG="1") if how == "environment" else None
    result = _megacredit(*args, cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ConfigError: config file" in result.stderr
