"""The command line every recipe module shares: ``python -m megacredit.recipes.<recipe> ...``.

The recipe function's typed parameters become options (``--task science``), ``key=value``
arguments become config overrides, ``--executor local|slurm`` picks the executor, and
``--dryrun`` prints the resolved configuration, the layout and NeMo-Run's job script without
starting anything. Without ``--dryrun`` the job is launched and, unless ``--detach``, waited
for; the exit status is 0 only when NeMo-Run reports it SUCCEEDED.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

from megacredit.config import check_world_size, config_to_yaml
from megacredit.config.parsing import ConfigError

CONFIG_BEGIN = "# --- resolved megacredit config ---"
CONFIG_END = "# --- end of resolved megacredit config ---"


@dataclass(frozen=True)
class Resources:
    """Default executor and resources of a recipe's command line."""

    executor: Literal["local", "slurm"]
    """Executor used when --executor is not given."""
    nodes: int
    """Slurm nodes."""
    ntasks: int
    """Processes per node (one per GPU)."""
    gpus_per_node: int
    """GPUs requested per node on Slurm (0: none)."""


def _option_type(annotation: Any) -> tuple[Any, list[str] | None]:
    """(argparse type, choices) of a recipe parameter's annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is Literal:
        return str, [str(a) for a in typing.get_args(annotation)]
    if args and typing.get_origin(annotation) is not Literal:  # Optional[X]
        return _option_type(args[0])
    return annotation, None


def _add_recipe_options(parser: argparse.ArgumentParser, recipe: Callable, run: Any) -> list[str]:
    hints = typing.get_type_hints(recipe, localns={"run": run})  # "run.Partial" return annotations
    names = []
    group = parser.add_argument_group(f"{recipe.__name__} arguments")
    for name, param in inspect.signature(recipe).parameters.items():
        if name == "overrides":
            continue
        kind, choices = _option_type(hints[name])
        group.add_argument(f"--{name.replace('_', '-')}", dest=f"recipe_{name}", type=kind, choices=choices,
                           default=param.default, help=f"(default: {param.default})")
        names.append(name)
    return names


def _parser(recipe: Callable, defaults: Resources, run: Any) -> tuple[argparse.ArgumentParser, list[str]]:
    parser = argparse.ArgumentParser(prog=f"python -m {recipe.__module__}",
                                     description=(inspect.getdoc(recipe) or "").split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="config overrides such as training.steps=10")
    parser.add_argument("--executor", choices=["local", "slurm"], default=defaults.executor)
    parser.add_argument("--dryrun", action="store_true", help="print the config and the job script; start nothing")
    parser.add_argument("--name", default=None, help="experiment name (default: the recipe's name)")
    parser.add_argument("--nodes", type=int, default=defaults.nodes, help="Slurm nodes")
    parser.add_argument("--ntasks", type=int, default=defaults.ntasks, help="processes per node (one per GPU)")
    parser.add_argument("--gpus-per-node", type=int, default=defaults.gpus_per_node, help="Slurm GPUs per node")
    slurm = parser.add_argument_group("Slurm executor")
    slurm.add_argument("--account", default=None, help="Slurm account (required to submit)")
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--time", default="04:00:00")
    slurm.add_argument("--container-image", default=None, help="pyxis image with megacredit's dependencies")
    slurm.add_argument("--container-mount", action="append", default=[], help="src:dst (repeatable)")
    slurm.add_argument("--venv", default=None, help="virtualenv to activate (default: this Python's)")
    slurm.add_argument("--master-port", type=int, default=29500)
    slurm.add_argument("--job-dir", default="", help="where NeMo-Run writes the job files")
    slurm.add_argument("--detach", action="store_true", help="return after submitting")
    return parser, _add_recipe_options(parser, recipe, run)


def _executor(args: argparse.Namespace):
    from megacredit.recipes.base import local_executor, slurm_executor

    if args.executor == "local":
        return local_executor(args.ntasks)
    return slurm_executor(account=args.account or "ACCOUNT", partition=args.partition, nodes=args.nodes,
                          ntasks_per_node=args.ntasks, gpus_per_node=args.gpus_per_node, time=args.time,
                          container_image=args.container_image, container_mounts=args.container_mount,
                          venv=args.venv, job_dir=args.job_dir, master_port=args.master_port)


def print_resolved(cfg, world_size: int) -> None:
    """The layout for ``world_size`` ranks and the config as YAML, between marker lines."""
    par = cfg.parallel
    print(CONFIG_BEGIN)
    print(f"# layout: {world_size} ranks = TP {par.tensor_model_parallel_size} x "
          f"PP {par.pipeline_model_parallel_size} x DP {par.data_parallel_size(world_size)}")
    sys.stdout.write(config_to_yaml(cfg))
    print(CONFIG_END, flush=True)


def main(recipe: Callable, defaults: Resources, argv: Sequence[str] | None = None) -> int:
    """Build ``recipe`` from the command line, print it, and launch (or dry-run) it."""
    from megacredit.recipes.base import build_config, import_nemo_run

    try:
        run = import_nemo_run()
    except ImportError as exc:
        print(f"megacredit recipe: error: {exc}", file=sys.stderr)
        return 2
    parser, names = _parser(recipe, defaults, run)
    args = parser.parse_args(argv)
    try:
        partial = recipe(**{name: getattr(args, f"recipe_{name}") for name in names}, overrides=args.overrides)
        cfg = build_config(partial)
        world = args.ntasks * (args.nodes if args.executor == "slurm" else 1)
        check_world_size(cfg.parallel, world)
        if args.executor == "slurm" and not args.account and not args.dryrun:
            raise ConfigError("the Slurm executor needs --account (sbatch --account)")
    except (ConfigError, FileNotFoundError) as exc:
        print(f"megacredit recipe: error: {exc}", file=sys.stderr)
        return 2
    print_resolved(cfg, world)
    name = args.name or recipe.__name__
    with run.Experiment(name) as experiment:
        experiment.add(partial, executor=_executor(args), name=name)
        if args.dryrun:
            experiment.dryrun()
            return 0
        detach = args.detach and args.executor == "slurm"
        experiment.run(detach=detach, tail_logs=False)
    if detach:
        return 0
    state = experiment.jobs[0].state  # NeMo-Run waits for the job when the context exits
    print(f"megacredit recipe: {name} finished: {state.name}", flush=True)
    return 0 if state.name == "SUCCEEDED" else 1
