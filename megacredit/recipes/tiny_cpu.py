"""NeMo-Run recipes at a tiny CPU size: the four methods on examples/tiny_cpu_arithmetic.yaml.

A 2-layer random model on one-digit additions, a few seconds per step on a CPU: it checks a
launch path (executor, ranks, metrics, checkpoints), it learns nothing useful.

    python -m megacredit.recipes.tiny_cpu --executor local --ntasks 2 --tensor-parallel 2
    python -m megacredit.recipes.tiny_cpu --executor slurm --ntasks 2 --gpus-per-node 0 --method rlsd
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Sequence

from megacredit.recipes.base import REPO_ROOT, Method, override_list, recipe_from_yaml
from megacredit.recipes.cli import Resources, main

if TYPE_CHECKING:  # pragma: no cover
    import nemo_run as run

CONFIG = REPO_ROOT / "examples" / "tiny_cpu_arithmetic.yaml"
RESOURCES = Resources(executor="local", nodes=1, ntasks=2, gpus_per_node=0)


def tiny_cpu(
    method: Method = "credit", tensor_parallel: int = 1, pipeline_parallel: int = 1, steps: int = 3,
    run_dir: str | None = None, overrides: Sequence[str] = (),
) -> "run.Partial":
    """``method`` on a 2-layer random model (examples/tiny_cpu_arithmetic.yaml), TP x PP as given.

    ``run_dir``: None keeps the file's logging.run_dir; ``overrides``: ``key=value`` applied last.
    """
    settings = {"algorithm.name": method, "parallel.tensor_model_parallel_size": tensor_parallel,
                "parallel.pipeline_model_parallel_size": pipeline_parallel, "training.steps": steps,
                "logging.run_dir": run_dir}
    return recipe_from_yaml(CONFIG, override_list(settings, overrides))


def credit_tiny(**kwargs) -> "run.Partial":
    """CREDIT at the tiny CPU size (keyword arguments of :func:`tiny_cpu`)."""
    return tiny_cpu("credit", **kwargs)


def sdpo_tiny(**kwargs) -> "run.Partial":
    """SDPO at the tiny CPU size (keyword arguments of :func:`tiny_cpu`)."""
    return tiny_cpu("sdpo", **kwargs)


def grpo_tiny(**kwargs) -> "run.Partial":
    """GRPO at the tiny CPU size (keyword arguments of :func:`tiny_cpu`)."""
    return tiny_cpu("grpo", **kwargs)


def rlsd_tiny(**kwargs) -> "run.Partial":
    """RLSD at the tiny CPU size (keyword arguments of :func:`tiny_cpu`)."""
    return tiny_cpu("rlsd", **kwargs)


if __name__ == "__main__":
    sys.exit(main(tiny_cpu, RESOURCES))
