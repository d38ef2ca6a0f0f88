"""The saving process of the checkpoint fault tests (tests/integration/test_checkpoint_faults.py).

    python checkpoint_fault_child.py ROOT LOG_DIR

imports torch and Megatron once, then reads commands ``STEP FAULT`` from stdin, one per line. For
each it forks a fresh process (its own process group, its own gloo group) that resumes the newest
complete checkpoint under ROOT the way the trainer does (``megacredit.trainer.checkpointing.resume``
with ``checkpoint.resume=auto``, progress lines and warnings into ``LOG_DIR/STEP-FAULT.log``), sets
every weight of a tiny Megatron model to STEP (so a later resume can tell which save it loaded),
and saves step STEP with ``keep_last=2``. FAULT is ``none``, a moment of the save at which that
process group gets SIGKILL (``KILL_POINTS``), or ``fill_disk``: fill the checkpoint's filesystem
just before the shards are written (another process took the space after the free-space check).
After each command one JSON line on stdout: the forked process's exit (negative: the signal),
and, when it was not killed, the resumed step, whether every loaded weight equals it, and the
save's error (its one line). Forking saves the 30-50 s of imports per process on a loaded 2-core
machine; nothing has run a thread pool before the fork.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

KILL_POINTS = {
    "before_shards": "megatron's save is entered, nothing written yet",
    "mid_shard": "a shard file half written (one item of a forked writer flushed)",
    "after_shards": "all shards and metadata written, no manifest yet",
    "mid_marker": "the completion marker (manifest) half written",
    "marker_written": "the marker complete in step_N.tmp, not renamed",
    "after_rename": "step_N renamed into place, `latest` not rewritten",
    "mid_prune": "an old checkpoint half deleted",
}
"""Where a save is killed, in the order the save reaches them."""


def _kill_group() -> None:
    sys.stdout.flush()
    os.killpg(0, signal.SIGKILL)


def _install(fault: str, root: Path) -> None:
    """Patch the library call at ``fault`` to SIGKILL the process group there (test-only)."""
    import megatron.core.dist_checkpointing as dist_checkpointing
    import megatron.core.dist_checkpointing.strategies.filesystem_async as filesystem_async

    from megacredit.megatron import checkpoint

    if fault == "before_shards":
        dist_checkpointing.save = lambda *args, **kwargs: _kill_group()
    elif fault == "mid_shard":
        original_write_item = filesystem_async._write_item

        @functools.wraps(original_write_item)  # Megatron reads its signature
        def write_then_kill(*args, **kwargs):
            result = original_write_item(*args, **kwargs)
            for arg in args:
                if hasattr(arg, "flush"):
                    arg.flush()
            _kill_group()
            return result

        filesystem_async._write_item = write_then_kill
    elif fault == "after_shards":
        checkpoint._confirmed_listing = lambda *args, **kwargs: _kill_group()
    elif fault in ("mid_marker", "marker_written"):
        def write_and_kill(path, text):
            with open(path, "w") as handle:
                handle.write(text if fault == "marker_written" else text[: len(text) // 2])
            _kill_group()

        checkpoint.write_durably = write_and_kill
    elif fault == "after_rename":
        checkpoint.fsync_directory = lambda path: _kill_group()
    elif fault == "mid_prune":
        original_rmtree = checkpoint.shutil.rmtree

        def rmtree_half_then_kill(path, *args, **kwargs):
            if str(path).endswith(".deleted.tmp") and Path(path).exists():
                files = sorted(p for p in Path(path).rglob("*") if p.is_file())
                for file in files[: len(files) // 2]:
                    file.unlink()
                _kill_group()
            return original_rmtree(path, *args, **kwargs)

        checkpoint.shutil.rmtree = rmtree_half_then_kill
    elif fault == "fill_disk":
        original_save = dist_checkpointing.save

        def fill_then_save(*args, **kwargs):
            with open(root / "filler", "wb") as handle:  # until ENOSPC: another process took the space
                try:
                    while True:
                        handle.write(b"\0" * (1 << 16))
                        handle.flush()
                except OSError:
                    pass
            return original_save(*args, **kwargs)

        dist_checkpointing.save = fill_then_save
    elif fault != "none":
        raise ValueError(f"unknown fault {fault!r}")


def main(root: Path, step: int, fault: str) -> dict:
    import torch

    from megacredit.megatron import distributed
    from megacredit.megatron.checkpoint import CheckpointError, save_checkpoint
    from megacredit.megatron.optimizer import OptimizerSettings, build_optimizer, wrap_with_ddp
    from megacredit.megatron.trainer_memory import TrainerMemory
    from megacredit.trainer import checkpointing
    from megacredit.utils.progress import PlainProgressReporter
    from megatron_test_helpers import build_model, fixed_tokens, train_step

    ctx = distributed.initialize(1, 1, seed=3)
    chunks = wrap_with_ddp(build_model(ctx, num_layers=1))
    optimizer = build_optimizer(chunks, OptimizerSettings(lr=1e-3))
    train_step(chunks, optimizer, ctx, fixed_tokens(0))  # Adam moments exist, as in training
    actor = SimpleNamespace(model_chunks=chunks, optimizer=optimizer, teacher=None,
                             memory=TrainerMemory(chunks, optimizer, None))
    cfg = SimpleNamespace(checkpoint=SimpleNamespace(resume="auto"), checkpoint_dir=lambda: str(root))
    resumed, _ = checkpointing.resume(actor, ctx, cfg, PlainProgressReporter(sys.stderr))
    params = [p for chunk in chunks for p in chunk.parameters()]
    weights_equal_step = all(bool(torch.all(p == float(resumed))) for p in params)
    with torch.no_grad():
        for param in params:
            param.fill_(float(step))
    _install(fault, root)
    result = {"resumed": resumed, "weights_equal_step": weights_equal_step, "error": None}
    try:
        save_checkpoint(chunks, optimizer, ctx, root, step, extra_state={"completed_steps": step}, keep_last=2)
    except CheckpointError as error:
        result["error"] = str(error)
        result["error_type"] = type(error).__name__
    distributed.shutdown()
    return result


def serve(root: Path, log_dir: Path) -> None:
    """Run each ``STEP FAULT`` command of stdin in a forked process; one JSON line per command."""
    import logging

    for line in sys.stdin:
        step, fault = line.split()
        log = log_dir / f"{step}-{fault}.log"
        result_file = log_dir / f"{step}-{fault}.json"
        pid = os.fork()
        if pid == 0:
            os.setpgid(0, 0)  # the kill takes this process, its writers and Megatron's queue manager
            with open(log, "w") as stream:
                os.dup2(stream.fileno(), 2)
            logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="warning: %(message)s")
            try:
                result_file.write_text(json.dumps(main(root, int(step), fault)))
                code = 0
            except BaseException:  # noqa: BLE001 - reported through the exit code and the log
                import traceback

                traceback.print_exc()
                code = 1
            import multiprocessing

            for process in multiprocessing.active_children():  # Megatron's write-results queue manager
                process.kill()
                process.join()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        exit_code = os.waitstatus_to_exitcode(status)
        result = json.loads(result_file.read_text()) if result_file.exists() else None
        print(json.dumps({"exit": exit_code, "result": result, "log": str(log)}), flush=True)


if __name__ == "__main__":
    import megatron_test_helpers  # noqa: F401 - everything imported once, before the forks
    import megacredit.megatron.optimizer  # noqa: F401
    import megacredit.models.tiny  # noqa: F401
    import megacredit.trainer.checkpointing  # noqa: F401

    serve(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]))
