"""NeMo-Run recipe: GRPO (the CREDIT paper's baseline) on Qwen3-8B, 1 node x 8 GPUs (CREDIT paper, Table 3).

    python -m megacredit.recipes.grpo_8b --executor slurm --account A --partition P [key=value ...]
    python -m megacredit.recipes.grpo_8b --dryrun          # resolved config, layout, sbatch script

From Python::

    from megacredit.recipes.grpo_8b import grpo_8b
    from megacredit.recipes.base import slurm_executor
    recipe = grpo_8b(task="code", model="/models/Qwen3-8B")
    nemo_run.run(recipe, executor=slurm_executor(account="A", partition="P"))
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Sequence

from megacredit.recipes.base import Task, paper_recipe
from megacredit.recipes.cli import Resources, main

if TYPE_CHECKING:  # pragma: no cover
    import nemo_run as run

RESOURCES = Resources(executor="slurm", nodes=1, ntasks=8, gpus_per_node=8)


def grpo_8b(
    task: Task = "code", model: str | None = None, train_path: str | None = None,
    val_path: str | None = None, run_dir: str | None = None, overrides: Sequence[str] = (),
) -> "run.Partial":
    """GRPO (the CREDIT paper's baseline) on Qwen3-8B
    (examples/qwen3_8b_grpo_<task>.yaml).

    ``model``, ``train_path``, ``val_path``, ``run_dir``: None keeps the YAML file's value;
    ``overrides``: ``key=value`` strings applied last.
    """
    return paper_recipe("grpo", task, model, train_path, val_path, run_dir, overrides)


if __name__ == "__main__":
    sys.exit(main(grpo_8b, RESOURCES))
