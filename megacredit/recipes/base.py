"""Shared pieces of the NeMo-Run recipes: the function they run, config trees, executors.

A recipe is ``run.Partial(train_config, cfg=<run.Config tree of MegacreditConfig>)``: NeMo-Run
serialises the tree, and on every rank ``train_config`` validates the built config and runs
``megacredit.trainer.loop.train`` (the same loop as ``megacredit train``). The executors match
``slurm/launch.sh``: on Slurm one task per GPU started by ``srun`` (the trainer reads
SLURM_PROCID / SLURM_NTASKS / SLURM_NODELIST), locally ``torchrun``. NeMo-Run is imported only
when a recipe or an executor is built, never at import time.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

from megacredit.config import MegacreditConfig, load_config, validate_config

if TYPE_CHECKING:  # pragma: no cover
    import nemo_run as run

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The checkout this package lives in (its examples/ hold the recipes' YAML files)."""
Task = Literal["code", "science", "tool"]
"""The CREDIT paper's three task families (examples/qwen3_8b_<method>_<task>.yaml)."""
Method = Literal["grpo", "sdpo", "credit", "rlsd"]
"""The methods with recipes."""

LAUNCH_ENV: dict[str, str] = {
    # One CUDA hardware queue, as Megatron-LM's launch examples set it
    # (examples/gpt3/train_gpt3_175b_distributed.sh): TP/SP communication issued in order.
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    # As Megatron-Bridge's scripts/training/launch_with_sbatch.sh sets them.
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
    "NCCL_NVLS_ENABLE": "0",
    "PYTHONUNBUFFERED": "1",
}
"""Environment of every rank (slurm/launch.sh exports the same defaults)."""


def import_nemo_run():
    """The ``nemo_run`` module, or an ImportError that says how to install it."""
    try:
        import nemo_run
    except ImportError as exc:
        raise ImportError(f"megacredit's recipes need NeMo-Run, the optional [nemo] extra: "
                          f"pip install -e '.[nemo]' ({exc})") from exc
    return nemo_run


def train_config(cfg: MegacreditConfig) -> None:
    """Validate ``cfg`` (data paths are checked here, on the machine that trains) and train it."""
    from megacredit.trainer.loop import train

    validate_config(cfg)
    train(cfg)


def to_run_config(value: Any) -> Any:
    """A dataclass tree (e.g. a MegacreditConfig) as nested ``run.Config`` objects."""
    run = import_nemo_run()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: to_run_config(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        return run.Config(type(value), **fields)
    if isinstance(value, list):
        return [to_run_config(item) for item in value]
    if isinstance(value, dict):
        return {key: to_run_config(item) for key, item in value.items()}
    return value


def absolute_paths(cfg: MegacreditConfig, base: Path) -> MegacreditConfig:
    """``cfg`` with relative data, run and checkpoint paths (and a model folder that exists
    under ``base``) made absolute against ``base``: NeMo-Run starts jobs in its own directory."""

    def absolute(path: str | None) -> str | None:
        return path if path is None or os.path.isabs(os.path.expanduser(path)) else str(base / path)

    cfg.data.train_path = absolute(cfg.data.train_path)
    cfg.data.val_path = absolute(cfg.data.val_path)
    cfg.logging.run_dir = absolute(cfg.logging.run_dir)
    cfg.checkpoint.dir = absolute(cfg.checkpoint.dir)
    if (base / cfg.model.name_or_path).exists():
        cfg.model.name_or_path = absolute(cfg.model.name_or_path)
    return cfg


def recipe_from_yaml(config: str | os.PathLike, overrides: Sequence[str] = ()) -> "run.Partial":
    """``run.Partial(train_config, cfg=...)`` for a YAML file plus ``key=value`` overrides.

    The config is resolved and validated as ``megacredit train`` does it, except that data
    files need not exist on the submitting machine (they are checked on the ranks); relative
    paths are taken from the current directory (:func:`absolute_paths`).
    """
    run = import_nemo_run()
    cfg = absolute_paths(load_config(config, list(overrides), check_paths=False), Path.cwd())
    return run.Partial(train_config, cfg=to_run_config(cfg))


def override_list(settings: Mapping[str, Any], overrides: Sequence[str] = ()) -> list[str]:
    """``key=value`` strings of the settings that are not None, then ``overrides`` (which win)."""
    return [f"{key}={value}" for key, value in settings.items() if value is not None] + list(overrides)


def paper_recipe(method: Method, task: Task = "code", model: str | None = None,
                 train_path: str | None = None, val_path: str | None = None,
                 run_dir: str | None = None, overrides: Sequence[str] = ()) -> "run.Partial":
    """The Qwen3-8B recipe of ``method`` on ``task`` (examples/qwen3_8b_<method>_<task>.yaml)."""
    config = REPO_ROOT / "examples" / f"qwen3_8b_{method}_{task}.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"recipe config '{config}' not found: the recipes read the YAML files "
                                "of a megacredit checkout (install it with pip install -e .)")
    settings = {"model.name_or_path": model, "data.train_path": train_path, "data.val_path": val_path,
                "logging.run_dir": run_dir}
    return recipe_from_yaml(config, override_list(settings, overrides))


def build_config(recipe: "run.Partial") -> MegacreditConfig:
    """The MegacreditConfig a recipe will train (with any edits made to ``recipe.cfg``)."""
    import fiddle

    return fiddle.build(recipe.cfg)


def local_executor(ntasks: int = 2, env_vars: Mapping[str, str] | None = None) -> "run.LocalExecutor":
    """``ntasks`` processes on this machine under torchrun (gloo on CPU, NCCL on GPUs)."""
    run = import_nemo_run()
    return run.LocalExecutor(ntasks_per_node=ntasks, launcher="torchrun",
                             env_vars={**LAUNCH_ENV, **(env_vars or {})})


def current_venv() -> str | None:
    """The virtualenv of this Python, if it runs in one."""
    return sys.prefix if sys.prefix != getattr(sys, "base_prefix", sys.prefix) else None


def slurm_executor(account: str = "", partition: str | None = None, nodes: int = 1,
                   ntasks_per_node: int = 8, gpus_per_node: int = 8, time: str = "04:00:00",
                   container_image: str | None = None, container_mounts: Sequence[str] = (),
                   venv: str | None = None, job_dir: str = "", master_port: int = 29500,
                   signal: str | None = "USR1@600",
                   env_vars: Mapping[str, str] | None = None) -> "run.SlurmExecutor":
    """A SlurmExecutor that starts one trainer task per GPU with srun (no torchrun).

    ``container_image``: a pyxis image holding megacredit's dependencies; this checkout is mounted
    at the same path and put on PYTHONPATH. Without one, ``venv`` (default: the virtualenv of
    this Python) is activated in the job. ``signal``: sent to the ranks before the time limit so
    the trainer checkpoints and stops; submitting the same recipe again (same logging.run_dir)
    resumes with checkpoint.resume=auto. ``gpus_per_node=0`` requests no GPUs (CPU clusters).
    The code is read from the shared filesystem (passthrough packager); submitted through
    ``run.LocalTunnel`` (run this on a login node of the cluster).
    """
    run = import_nemo_run()
    env = {**LAUNCH_ENV, "MASTER_PORT": str(master_port), **(env_vars or {})}
    mounts = list(container_mounts)
    setup_lines = None
    if container_image:
        mounts.insert(0, f"{REPO_ROOT}:{REPO_ROOT}")
        env["PYTHONPATH"] = str(REPO_ROOT)
    elif venv or current_venv():
        setup_lines = f"source {venv or current_venv()}/bin/activate"
    executor = run.SlurmExecutor(
        account=account, partition=partition, nodes=nodes, ntasks_per_node=ntasks_per_node,
        gpus_per_node=gpus_per_node or None, time=time, exclusive=True, signal=signal,
        container_image=container_image, container_mounts=mounts, env_vars=env,
        setup_lines=setup_lines, tunnel=run.LocalTunnel(job_dir=job_dir), packager=run.Packager())
    return executor
