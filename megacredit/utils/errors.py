"""Errors a user fixes in the run's inputs, and the parallel-layout rule both the config and the
launcher check. Megatron-free and import-light: every layer (cli, trainer, megatron, data) uses it.

The ``megacredit`` command prints a :class:`SetupError` as one line and exits with status 2
(``--debug`` or ``MEGACREDIT_DEBUG=1`` shows the traceback instead).
"""

from __future__ import annotations

import re


class SetupError(Exception):
    """A problem with the run's inputs (config, data, model, checkpoint, launch layout) that the
    user can fix; the message says what is wrong and how to fix it, in one line."""


class ParallelLayoutError(SetupError, ValueError):
    """TP x PP does not divide the number of processes that were started."""


def parallel_layout_problem(world_size: int, tp: int, pp: int, launcher: str | None = None) -> str | None:
    """Why ``world_size`` processes cannot run TP=``tp`` x PP=``pp`` (None when they can).

    The message keeps the historical wording "world size N is not divisible by ..." and adds how
    many processes were started (and by what) and which TP x PP products fit.
    """
    if tp < 1 or pp < 1:
        return (f"parallel sizes must be >= 1, got tensor_model_parallel_size={tp}, "
                f"pipeline_model_parallel_size={pp}")
    if world_size >= 1 and world_size % (tp * pp) == 0:
        return None
    processes = f"{world_size} process{'es' if world_size != 1 else ''}"
    started = f"{processes} started" + (f" by {launcher}" if launcher and launcher != "single" else "")
    fitting = [d for d in range(1, world_size + 1) if world_size % d == 0] if world_size >= 1 else []
    return (
        f"world size {world_size} is not divisible by tensor_model_parallel_size * "
        f"pipeline_model_parallel_size = {tp} * {pp} = {tp * pp} ({started}); with "
        f"{processes} TP x PP must be one of {', '.join(map(str, fitting)) or 'none'}, "
        f"or launch a multiple of {tp * pp} processes"
    )


def expert_layout_problem(world_size: int, pp: int, ep: int) -> str | None:
    """Why ``ep`` expert-parallel ranks cannot be laid out (None when they can). Megatron's rule
    (``parallel_state.initialize_model_parallel``) with expert tensor parallelism 1: EP x PP
    divides the world size."""
    if ep >= 1 and world_size >= 1 and world_size % (ep * pp) == 0:
        return None
    fitting = [d for d in range(1, world_size // pp + 1) if (world_size // pp) % d == 0] if world_size >= pp else []
    return (f"parallel.expert_model_parallel_size={ep} x pipeline_model_parallel_size={pp} must divide "
            f"the world size {world_size}; choose EP in {fitting or 'none'}")


def one_line(error: BaseException) -> str:
    """The innermost ``SomeError: message`` line of an error whose text may span lines or embed
    per-rank tracebacks (torch.distributed.checkpoint's CheckpointException does)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if re.match(r"^[\w.]*(Error|Exception): ", line)]
    if named:
        kind, _, message = named[-1].partition(": ")
        return f"{kind.rsplit('.', 1)[-1]}: {message}"
    return f"{type(error).__name__}: {lines[0] if lines else ''}"
