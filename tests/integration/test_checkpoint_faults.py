"""Saves that cannot be half-done: SIGKILL at every moment of a save, and a full disk.

A save is killed (SIGKILL to its whole process group: the saving process, Megatron's forked shard
writers and its queue manager) before, during and after the shard writes, during and after the
completion marker (the manifest), after the rename and in the middle of pruning an old checkpoint
(checkpoint_fault_child.py patches the library call at that moment). After each kill the next
process resumes with ``checkpoint.resume=auto``: it must load the newest COMPLETE checkpoint
(every weight equal to its step), say what it resumed from and why it skipped an unfinished save,
and print no library deprecation warning.

A full disk (a tmpfs this test mounts and unmounts): ENOSPC while the shards are written (the
disk filled after the free-space check) and a save that does not fit (refused before writing)
each give one line naming the path and the space needed, and leave the previous checkpoint
intact; a training run (``megacredit train``) on that disk stops with that one line, exit 2.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from make_deps import missing

from checkpoint_fault_child import KILL_POINTS
from process_helpers import kill_pids, session_pids
from trainer_helpers import tiny_overrides

pytestmark = pytest.mark.integration
HERE = Path(__file__).resolve().parent
CHILD = HERE / "checkpoint_fault_child.py"
COMMAND_TIMEOUT_S = 300
"""One fork's resume + save on a loaded 2-core machine takes 10-30 s."""


class Saver:
    """checkpoint_fault_child.py as a subprocess in its own session; :meth:`run` sends it one
    ``STEP FAULT`` command and returns its JSON answer."""

    def __init__(self, root: Path, log_dir: Path) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent / "distributed"),
                                                              os.environ.get("PYTHONPATH", "")])}
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stderr = open(log_dir / "saver.stderr", "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen([sys.executable, str(CHILD), str(root), str(log_dir)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env,
                                        start_new_session=True)

    def run(self, step: int, fault: str) -> dict:
        self.process.stdin.write(f"{step} {fault}\n")
        self.process.stdin.flush()
        answer: list[str] = []
        reader = threading.Thread(target=lambda: answer.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(COMMAND_TIMEOUT_S)
        assert answer and answer[0], f"no answer to '{step} {fault}' within {COMMAND_TIMEOUT_S} s"
        outcome = json.loads(answer[0])
        outcome["log_text"] = Path(outcome["log"]).read_text()
        return outcome

    def stop(self) -> None:
        """End the saver and every process of its session, by PID."""
        session = self.process.pid
        try:
            self.process.stdin.close()
            self.process.wait(timeout=60)
        except (subprocess.TimeoutExpired, BrokenPipeError):
            pass
        kill_pids(session_pids(session))
        self.process.wait(timeout=30)
        self.stderr.close()
        deadline = time.monotonic() + 10  # SIGKILLed processes vanish once reaped
        while session_pids(session) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not session_pids(session), "processes of the saver outlived it"


@contextmanager
def saver(root: Path, log_dir: Path):
    started = Saver(root, log_dir)
    try:
        yield started
    finally:
        started.stop()


def _assert_resumed(outcome: dict, root: Path, step: int, unfinished: tuple[str, ...] = ()) -> None:
    """The process resumed step ``step``, said so, named exactly the unfinished saves it skipped,
    printed no deprecation noise and, unless it was killed, found every weight equal to ``step``."""
    log = outcome["log_text"]
    assert f"resuming from {root / f'step_{step:06d}'} (step {step})" in log, log
    skipped = [line.split()[1] for line in log.splitlines() if line.startswith("warning:")]
    assert skipped == [str(root / name) for name in unfinished], log
    assert "Warning" not in log, log  # FutureWarning, UserWarning
    if outcome["exit"] != -signal.SIGKILL:
        assert outcome["exit"] == 0, log
        assert outcome["result"]["resumed"] == step and outcome["result"]["weights_equal_step"], outcome


# (step saved, where it is killed, the newest complete checkpoint afterwards)
KILLS = [(3, "before_shards", 2), (3, "mid_shard", 2), (3, "after_shards", 2), (3, "mid_marker", 2),
         (3, "marker_written", 2), (3, "after_rename", 3), (4, "mid_prune", 4)]


def test_a_save_killed_at_any_moment_resumes_the_newest_complete_checkpoint(tmp_path):
    from megacredit.megatron.checkpoint import checkpoint_problem, find_latest_checkpoint

    assert [fault for _, fault, _ in KILLS] == list(KILL_POINTS)
    root = tmp_path / "checkpoints"
    with saver(root, tmp_path / "logs") as process:
        assert process.run(1, "none")["result"] == {"resumed": 0, "weights_equal_step": False, "error": None}
        _assert_resumed(process.run(2, "none"), root, 1)
        newest, left_behind = 2, ()
        for step, fault, newest_after in KILLS:
            killed = process.run(step, fault)
            assert killed["exit"] == -signal.SIGKILL and killed["result"] is None, (fault, killed)
            _assert_resumed(killed, root, newest, left_behind)
            assert find_latest_checkpoint(root, warn=False) == root / f"step_{newest_after:06d}", fault
            left_behind = (f"step_{step:06d}.tmp",) if newest_after == newest else ()
            assert all((root / name).is_dir() for name in left_behind), fault  # what the kill left
            newest = newest_after
        assert (root / "step_000001.deleted.tmp").is_dir()  # the half-deleted oldest checkpoint
        finished = process.run(5, "none")
        _assert_resumed(finished, root, 4)
        assert finished["result"]["error"] is None
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000004", "step_000005"]  # leftovers gone
    assert all(checkpoint_problem(root / name) is None for name in ("step_000004", "step_000005"))
    assert (root / "latest").read_text() == "step_000005\n"


@contextmanager
def small_filesystem(path: Path, size_mib: int):
    """A tmpfs of ``size_mib`` MiB mounted at ``path`` for the test (root only), unmounted after."""
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(path)],
                             capture_output=True, text=True, timeout=30)
    if mounted.returncode != 0:
        missing("root", f"cannot mount a tmpfs at {path}: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, timeout=60).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=60)


def _assert_space_line(error: str, root: Path, step: int, previous: str) -> None:
    assert "\n" not in error
    assert error.startswith(f"no space left on the filesystem of {root / f'step_{step:06d}.tmp'} "), error
    assert "MiB are free" in error and "needs about" in error and f"{previous} is intact" in error, error


def test_a_full_disk_gives_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    from megacredit.megatron.checkpoint import checkpoint_problem, find_latest_checkpoint

    with small_filesystem(tmp_path / "small", 4) as small:  # a tiny checkpoint is 0.7 MiB
        root = small / "checkpoints"
        with saver(root, tmp_path / "logs") as process:
            assert process.run(1, "none")["result"]["error"] is None
            filled = process.run(2, "fill_disk")  # ENOSPC while the shards are written
            _assert_resumed(filled, root, 1)
            assert filled["result"]["error_type"] == "CheckpointSpaceError"
            _assert_space_line(filled["result"]["error"], root, 2, "step_000001")
            assert sorted(p.name for p in root.iterdir()) == ["filler", "latest", "step_000001"]
            assert checkpoint_problem(root / "step_000001") is None
            refused = process.run(2, "none")  # the disk is still full: refused before writing
            _assert_resumed(refused, root, 1)
            assert refused["result"]["error_type"] == "CheckpointSpaceError"
            _assert_space_line(refused["result"]["error"], root, 2, "step_000001")
            assert sorted(p.name for p in root.iterdir()) == ["filler", "latest", "step_000001"]
            (root / "filler").unlink()
            resumed = process.run(2, "none")  # space again: the intact previous one is resumed and saved over
            _assert_resumed(resumed, root, 1)
            assert resumed["result"]["error"] is None
            assert find_latest_checkpoint(root, warn=False) == root / "step_000002"


def test_a_training_run_on_a_full_disk_stops_with_one_line(tmp_path):
    """The tiny trainer's checkpoint is 49 MiB: 80 MiB hold one, not two (the old one stays until
    the new one is complete)."""
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    with small_filesystem(tmp_path / "small", 80) as small:
        root = small / "checkpoints"
        overrides = tiny_overrides("credit", tmp_path / "run", steps=2, **{
            "checkpoint.save_every": 1, "checkpoint.dir": str(root), "checkpoint.keep_last": 1})
        env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        process = subprocess.Popen([sys.executable, "-m", "megacredit.cli", "train", str(config), *overrides],
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
        try:
            stdout, stderr = process.communicate(timeout=900)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        assert process.returncode == 2, stderr[-3000:]
        errors = [line for line in stderr.splitlines() if line.startswith("megacredit: error:")]
        assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
        _assert_space_line(errors[0].removeprefix("megacredit: error: "), root, 2, "step_000001")
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001"]
        from megacredit.megatron.checkpoint import checkpoint_problem

        assert checkpoint_problem(root / "step_000001") is None
