"""Shared by the sandbox tests: both isolation modes, small limits, and a fixture asserting that
nothing of a sandbox (process, temp dir) outlives its test."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from make_deps import missing, needs
from megacredit.envs.sandbox import NOBODY_UID, SandboxLimits, mode_filter, sandbox_backend

REPO_ROOT = Path(__file__).resolve().parents[2]
LIMITS = SandboxLimits(wall_time_s=2.0, cpu_time_s=2.0, memory_mb=256, max_processes=16,
                       max_output_bytes=1 << 16)


def bwrap_works() -> bool:
    return shutil.which("bwrap") is not None and sandbox_backend(False).mode == "bwrap"


MODES = [pytest.param(False, id="bwrap", marks=needs("bwrap", bwrap_works(), "absent, or it failed its probe")),
         pytest.param(True, id="fallback")]


def _sandbox_processes(since: float) -> set[int]:
    """Our descendants plus processes of the sandbox uid started after ``since`` (zombies too:
    bwrap runs with --as-pid-1 so that it reaps the namespace itself), except those that still
    descend from another live process that is not of the sandbox uid (a concurrent test run of
    someone else on this shared machine); an escaped process is an orphan of PID 1 or ours."""
    pids = {child.pid for child in psutil.Process().children(recursive=True)}
    for process in psutil.process_iter(["uids", "create_time"]):
        try:
            if (process.info["uids"].real == NOBODY_UID and process.info["create_time"] >= since - 1
                    and not _has_foreign_ancestor(process)):
                pids.add(process.pid)
        except (psutil.Error, TypeError, AttributeError):
            continue
    return pids


def _has_foreign_ancestor(process: psutil.Process) -> bool:
    for ancestor in process.parents():
        if ancestor.pid in (1, os.getpid()):
            return False
        if ancestor.uids().real != NOBODY_UID:
            return True
    return False


def _describe(pid: int) -> str:
    try:
        process = psutil.Process(pid)
        return f"{pid} {process.status()} uid={process.uids().real} ppid={process.ppid()} {process.cmdline()}"
    except psutil.Error as error:
        return f"{pid} gone ({error})"


@pytest.fixture
def no_leftovers(monkeypatch, tmp_path_factory):
    """Asserts after the test: no sandbox processes alive, no sandbox temp dirs left. The test's
    sandboxes put their temp dirs in a private directory (others on this shared machine create
    megacredit-sandbox-* in /tmp at any time); it must be empty afterwards."""
    tmp_path_factory.getbasetemp()  # pytest's own temp root stays where it is
    private_tmp = tempfile.mkdtemp(prefix="sandbox-tests-")
    os.chmod(private_tmp, 0o755)  # bwrap runs as nobody when we are root: it must reach the job dir
    monkeypatch.setattr(tempfile, "tempdir", private_tmp)
    started = time.time()
    # Children the test process already had (e.g. multiprocessing's resource tracker, started by
    # earlier multi-process tests in the same session) are not the sandbox's.
    already_running = _sandbox_processes(started)
    yield
    deadline = time.monotonic() + 5.0  # the kernel may need a moment to reap a dying namespace
    while _sandbox_processes(started) - already_running and time.monotonic() < deadline:
        time.sleep(0.05)
    leftover = _sandbox_processes(started) - already_running
    left_dirs = [name for name in os.listdir(private_tmp) if name.startswith("megacredit-sandbox-")]
    shutil.rmtree(private_tmp, ignore_errors=True)
    assert leftover == set(), f"processes survived the sandbox: {[_describe(pid) for pid in leftover]}"
    assert left_dirs == [], f"sandbox temp dirs were left behind: {left_dirs}"



def require_filter(fallback: bool) -> None:
    """Skip (with the reason) when this mode runs without the seccomp filter."""
    if sandbox_backend(fallback).syscall_filter is None:
        reason = mode_filter("fallback" if fallback else "bwrap").reason or "its probe failed"
        missing("libseccomp", f"no seccomp filter on this machine: {reason}")
