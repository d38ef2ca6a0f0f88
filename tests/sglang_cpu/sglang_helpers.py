"""Shared pieces of the SGLang-CPU tests: servers started for a test module and stopped by PID."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from process_helpers import running_servers


@contextmanager
def sglang_servers(model_dir: Path, log_dir: Path, count: int = 2):
    """``count`` SGLang servers of ``model_dir`` (float32) on free ports, started in parallel;
    every one is stopped by its PID afterwards (also when a start failed). One OpenMP thread
    each: two servers and the trainer share 2 cores, and 2-thread processes side by side stall
    each other at every parallel region (a 40-token prefill took 2.6 s, 0.4 s)."""
    from megacredit.rollout.sglang_server import SGLangServer

    with running_servers([SGLangServer(model_dir, log_path=log_dir / f"server{i}.log",
                                       server_args={"dtype": "float32"}, env={"OMP_NUM_THREADS": "1"})
                          for i in range(count)]) as servers:
        yield servers
