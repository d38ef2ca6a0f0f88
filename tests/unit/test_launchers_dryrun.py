"""The launchers without a cluster: shell hygiene of slurm/*.sh, the 8B scripts' and recipes' dry
runs (the CREDIT paper's Table 3 values and the 8-GPU layout, read from the printed config), the
remote-rollout plan, argument errors, and the NeMo-Run recipe objects themselves."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from make_deps import missing, needs
from megacredit.config import load_config

ROOT = Path(__file__).resolve().parents[2]
SLURM = ROOT / "slurm"
METHODS = ("credit", "sdpo", "grpo", "rlsd")
CONFIG_BEGIN, CONFIG_END = "# --- resolved megacredit config ---", "# --- end of resolved megacredit config ---"


def _env(**extra) -> dict[str, str]:
    """This Python's environment first on PATH (the scripts call `python`), no Slurm job vars."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(NEMORUN_HOME=str(extra.pop("nemorun_home", "/nonexistent")), COLUMNS="250", **extra)
    return env


def _script_dryrun(script: str, *args: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SLURM / script), "--dryrun", *args], cwd=cwd, env=_env(**env),
                          capture_output=True, text=True, timeout=120)


def _layout_and_config(text: str) -> tuple[str, dict]:
    """The '# layout:' line and the YAML config printed after it (up to the end marker)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# layout:"))
    end = next((i for i in range(start, len(lines)) if lines[i] == CONFIG_END), len(lines))
    return lines[start], yaml.safe_load("\n".join(lines[start + 1:end]))


def _assert_paper_values(method: str, layout: str, cfg: dict) -> None:
    """CREDIT Table 3 (code column) as the trainer will read it, and the 1 x 8 GPU layout."""
    assert layout == "# layout: 8 ranks = TP 4 x PP 1 x DP 2"
    assert cfg["algorithm"]["name"] == method
    assert cfg["optimizer"]["lr"] == pytest.approx(1e-6)
    assert cfg["data"]["prompts_per_step"] == 32 and cfg["algorithm"]["group_size"] == 8
    assert cfg["model"]["name_or_path"] == "Qwen/Qwen3-8B" and cfg["model"]["dtype"] == "bfloat16"
    if method in ("sdpo", "credit"):
        assert cfg["algorithm"]["sdpo"]["top_k"] == 20
        assert cfg["algorithm"]["teacher"] == {**cfg["algorithm"]["teacher"], "kind": "ema", "ema_rate": 0.01}
    if method == "credit":
        assert cfg["algorithm"]["credit"] == {"num_contrastive": 1, "lam": pytest.approx(0.1)}
    if method == "rlsd":  # the RLSD paper's own choices on Table 3's shared settings
        assert cfg["algorithm"]["teacher"]["kind"] == "hard_copy"
        assert cfg["algorithm"]["clip_eps_high"] == pytest.approx(0.28)
    if method == "grpo":
        assert "sdpo" not in cfg["algorithm"] and "teacher" not in cfg["algorithm"]


@pytest.mark.parametrize("script", sorted(p.name for p in SLURM.glob("*.sh")))
def test_slurm_scripts_pass_bash_n_and_shellcheck(script):
    assert subprocess.run(["bash", "-n", str(SLURM / script)], capture_output=True).returncode == 0
    shellcheck = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if shellcheck is None:
        missing("shellcheck")
    result = subprocess.run([shellcheck, "-x", f"slurm/{script}"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("method", METHODS)
def test_8b_script_header_and_dryrun_show_the_paper_recipe(method, tmp_path):
    header = [line for line in (SLURM / f"{method}_8b.sh").read_text().splitlines() if line.startswith("#SBATCH")]
    for option in ("--nodes=1", "--ntasks-per-node=8", "--gpus-per-node=8", "--requeue", "--signal=B:USR1@600"):
        assert f"#SBATCH {option}" in header
    result = _script_dryrun(f"{method}_8b.sh", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    _assert_paper_values(method, *_layout_and_config(result.stdout))
    train_line = next(line for line in result.stdout.splitlines() if "] train: srun" in line)
    assert "--nodes=1 --ntasks=8 --ntasks-per-node=8" in train_line
    assert f"examples/qwen3_8b_{method}_code.yaml" in train_line and "checkpoint.resume=auto" in train_line
    assert "rollout: colocated" in result.stdout
    assert not (tmp_path / "logs").exists(), "a dry run must not create the per-job directories"


def test_script_overrides_and_nodes_reach_the_config(tmp_path):
    result = _script_dryrun("credit_8b.sh", "optimizer.lr=2e-6", "parallel.pipeline_model_parallel_size=2",
                            cwd=tmp_path, NODES="2", TASK="science")
    assert result.returncode == 0, result.stderr
    layout, cfg = _layout_and_config(result.stdout)
    assert layout == "# layout: 16 ranks = TP 4 x PP 2 x DP 2"
    assert cfg["optimizer"]["lr"] == pytest.approx(2e-6) and cfg["data"]["dataset"] == "sciknoweval"
    assert "examples/qwen3_8b_credit_science.yaml" in result.stdout


def test_remote_rollout_plan_splits_the_nodes(tmp_path):
    result = _script_dryrun("credit_8b.sh", cwd=tmp_path, NODES="3", ROLLOUT_PLACEMENT="remote",
                            ROLLOUT_ENGINE="sglang")
    assert result.returncode == 0, result.stderr  # the config resolves with the remote keys
    assert "trainer: 16 ranks on [node0 node1]" in result.stdout
    assert "rollout: remote sglang servers on [node2] port 8000" in result.stdout
    assert "python -m sglang.launch_server" in result.stdout and "RETURN_ORIGINAL_LOGPROB" not in result.stdout
    vllm = _script_dryrun("credit_8b.sh", cwd=tmp_path, NODES="2", ROLLOUT_PLACEMENT="remote", ROLLOUT_ENGINE="vllm")
    assert vllm.returncode == 0, vllm.stderr
    assert "--worker-extension-cls megacredit.rollout.vllm.MegacreditWorkerExtension" in vllm.stdout
    assert "VLLM_SERVER_DEV_MODE=1" in vllm.stdout
    too_few = _script_dryrun("credit_8b.sh", cwd=tmp_path, NODES="1", ROLLOUT_PLACEMENT="remote")
    assert too_few.returncode == 2 and "--nodes=2" in too_few.stderr


def test_remote_servers_run_with_rollout_python_and_sglang_log_probs_at_the_temperature(tmp_path):
    remote = {"NODES": "2", "ROLLOUT_PLACEMENT": "remote", "ROLLOUT_ENGINE": "sglang"}
    result = _script_dryrun("credit_8b.sh", cwd=tmp_path, ROLLOUT_PYTHON="/opt/sglang-env/bin/python", **remote)
    assert result.returncode == 0, result.stderr
    assert "rollout server on node1: /opt/sglang-env/bin/python -m sglang.launch_server" in result.stdout
    refused = _script_dryrun("credit_8b.sh", cwd=tmp_path, SGLANG_RETURN_ORIGINAL_LOGPROB="True", **remote)
    assert refused.returncode == 2 and "SGLANG_RETURN_ORIGINAL_LOGPROB is set" in refused.stderr
    assert "unset it" in refused.stderr and "rollout server" not in refused.stdout


@pytest.mark.parametrize("args, message", [
    (["training.steps=3", "examples/x.yaml"], "must come before"),
    (["steps"], "unexpected argument 'steps'"),
    (["missing.yaml"], "config file 'missing.yaml' not found"),
    (["parallel.tensor_model_parallel_size=3"], "not divisible"),
])
def test_script_argument_errors_are_one_line(args, message, tmp_path):
    result = _script_dryrun("grpo_8b.sh", *args, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_script_outside_slurm_without_dryrun_refuses(tmp_path):
    result = subprocess.run(["bash", str(SLURM / "credit_8b.sh")], cwd=tmp_path, env=_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "not inside a Slurm job" in result.stderr


# -- NeMo-Run recipes ---------------------------------------------------------------------
requires_nemo_run = needs("nemo_run", importlib.util.find_spec("nemo_run") is not None)


@pytest.fixture
def nemo_home(tmp_path, monkeypatch):
    """NeMo-Run's home (experiment directories) in tmp_path; wide console for the job scripts."""
    import nemo_run.config

    previous = nemo_run.config.get_nemorun_home()
    nemo_run.config.set_nemorun_home(str(tmp_path / "nemo"))
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.chdir(tmp_path)
    with open(os.devnull) as devnull:  # NeMo-Run's local commands (invoke) read stdin
        monkeypatch.setattr(sys, "stdin", devnull)
        yield tmp_path / "nemo"
    nemo_run.config.set_nemorun_home(previous)


@requires_nemo_run
@pytest.mark.parametrize("method", METHODS)
def test_8b_recipe_dryrun_shows_the_paper_recipe(method, nemo_home, capsys):
    import importlib

    from megacredit.recipes.cli import main

    module = importlib.import_module(f"megacredit.recipes.{method}_8b")
    assert main(getattr(module, f"{method}_8b"), module.RESOURCES, ["--executor", "slurm", "--dryrun"]) == 0
    out = capsys.readouterr().out
    _assert_paper_values(method, *_layout_and_config(out))
    for option in ("--nodes=1", "--ntasks-per-node=8", "--gpus-per-node=8", "--signal=USR1@600"):
        assert f"#SBATCH {option}" in out
    assert "nemo_run.core.runners.fdl_runner" in out


@requires_nemo_run
def test_recipe_command_line_dryrun_with_local_executor_and_overrides(tmp_path):
    command = [sys.executable, "-m", "megacredit.recipes.credit_8b", "--dryrun"]
    env = _env(nemorun_home=tmp_path / "nemo")
    result = subprocess.run([*command, "--executor", "local", "--ntasks", "8", "--task", "science",
                             "optimizer.lr=5e-7"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    layout, cfg = _layout_and_config(result.stdout)
    assert layout == "# layout: 8 ranks = TP 4 x PP 1 x DP 2"
    assert cfg["optimizer"]["lr"] == pytest.approx(5e-7) and cfg["data"]["dataset"] == "sciknoweval"
    assert "torchrun" in result.stdout


@requires_nemo_run
@pytest.mark.parametrize("argv, message", [
    (["--ntasks", "6", "--dryrun"], "not divisible"),
    (["--executor", "slurm"], "needs --account"),
    (["--dryrun", "algorithm.credit.lamda=0.2"], "algorithm.credit.lamda"),
])
def test_recipe_command_line_errors_are_one_line(argv, message, nemo_home, capsys):
    from megacredit.recipes.cli import main
    from megacredit.recipes.credit_8b import RESOURCES, credit_8b

    assert main(credit_8b, RESOURCES, argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("megacredit recipe: error:") and err.count("\n") == 1


@requires_nemo_run
def test_recipe_is_the_config_tree_and_stays_editable(tmp_path, monkeypatch):
    import fiddle
    import nemo_run

    from megacredit.recipes.base import to_run_config
    from megacredit.recipes.credit_8b import credit_8b

    monkeypatch.chdir(tmp_path)
    recipe = credit_8b(task="tool", model="/models/Qwen3-8B", overrides=["training.seed=3"])
    assert isinstance(recipe, nemo_run.Partial)
    expected = load_config(ROOT / "examples" / "qwen3_8b_credit_tool.yaml",
                           ["model.name_or_path=/models/Qwen3-8B", "training.seed=3"], check_paths=False)
    built = fiddle.build(recipe.cfg)
    assert built.data.train_path == str(tmp_path / expected.data.train_path)  # relative -> absolute
    assert built.logging.run_dir == str(tmp_path / expected.logging.run_dir)
    built.data.train_path, built.data.val_path = expected.data.train_path, expected.data.val_path
    built.logging.run_dir = expected.logging.run_dir
    assert built == expected
    recipe.cfg.optimizer.lr = 3e-6  # the NeMo-Run way to change a recipe before launching
    assert fiddle.build(recipe.cfg).optimizer.lr == 3e-6
    assert fiddle.build(to_run_config(expected)) == expected


@requires_nemo_run
def test_tiny_recipes_for_the_four_methods(tmp_path, monkeypatch):
    import fiddle

    from megacredit.recipes import tiny_cpu

    monkeypatch.chdir(tmp_path)
    for method in METHODS:
        cfg = fiddle.build(getattr(tiny_cpu, f"{method}_tiny")(tensor_parallel=2, steps=2).cfg)
        assert (cfg.algorithm.name, cfg.parallel.tensor_model_parallel_size, cfg.training.steps) == (method, 2, 2)
        assert cfg.model.name_or_path == "tiny"


def test_importing_megacredit_and_its_recipes_never_needs_nemo_run():
    code = ("import sys; sys.modules['nemo_run'] = None\n"
            "import megacredit, megacredit.recipes, megacredit.recipes.credit_8b, megacredit.recipes.tiny_cpu\n"
            "from megacredit.recipes.cli import main\n"
            "from megacredit.recipes.credit_8b import credit_8b, RESOURCES\n"
            "sys.exit(main(credit_8b, RESOURCES, ['--dryrun']))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "pip install -e '.[nemo]'" in result.stderr


def test_config_show_prints_the_layout_for_a_world_size(capsys):
    from megacredit.cli import EXIT_CONFIG_ERROR, main

    paper = str(ROOT / "examples" / "qwen3_8b_credit_code.yaml")
    assert main(["config", "show", "--check-paths", paper]) == EXIT_CONFIG_ERROR  # placeholder model/data paths
    assert "'model.name_or_path' = 'Qwen/Qwen3-8B' is invalid" in capsys.readouterr().err
    assert main(["config", "show", "--world-size", "16", paper,
                 "parallel.pipeline_model_parallel_size=2"]) == 0
    layout, cfg = _layout_and_config(capsys.readouterr().out)
    assert layout == "# layout: 16 ranks = TP 4 x PP 2 x DP 2" and cfg["parallel"]["pipeline_model_parallel_size"] == 2
    assert main(["config", "show", "--world-size", "6", paper]) == EXIT_CONFIG_ERROR
    assert "world size 6 is not divisible" in capsys.readouterr().err
