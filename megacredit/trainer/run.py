"""The run's components, built once (megacredit/trainer/builder.py) and handed to every step."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from transformers import PretrainedConfig, PreTrainedTokenizerBase

from megacredit.algorithms.methods import METHODS, Method
from megacredit.config import MegacreditConfig
from megacredit.envs.base import Environment
from megacredit.megatron.actor import MegatronActor
from megacredit.megatron.distributed import ParallelContext
from megacredit.rollout.base import RolloutEngine
from megacredit.utils.progress import ProgressReporter


@dataclass
class RLRun:
    """Everything a step needs, built once by megacredit.trainer.builder."""

    cfg: MegacreditConfig
    ctx: ParallelContext
    """This rank's place in the TP x PP x DP layout."""
    actor: MegatronActor
    """This rank's model chunks, optimizer and self-teacher."""
    engine: RolloutEngine | None
    """The rollout engine (one, or a pool of servers): on global rank 0 only, None elsewhere."""
    env: Environment
    """Scores responses and writes the feedback z."""
    tokenizer: PreTrainedTokenizerBase
    hf_config: PretrainedConfig
    timings: dict[str, float] = field(default_factory=dict)
    progress: ProgressReporter = field(default_factory=ProgressReporter)
    """Progress shown inside the long phases (shows nothing except on the logging rank)."""
    sync_count: int = 0
    """Weight syncs done so far (the sync at start-up is sync 0)."""

    @property
    def is_logger(self) -> bool:
        return self.ctx.rank == 0

    @property
    def method(self) -> Method:
        return METHODS[self.cfg.algorithm.name]

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        yield
        self.timings[f"perf/time_{name}"] = self.timings.get(f"perf/time_{name}", 0.0) + time.perf_counter() - start
