"""Run untrusted generated code: bubblewrap namespaces + rlimits, or a weaker rlimit-only fallback.

``run_sandboxed(program, stdin, limits)`` starts one separate process tree per call:

- **bwrap mode** (Debian's ``bubblewrap``, probed once and cached): ``--unshare-all`` (own user,
  PID, network, IPC, UTS, cgroup namespaces), ``--die-with-parent``, ``--new-session``,
  ``--disable-userns``, the host root bound read-only, ``/home``, ``/root``, ``/run`` and ``/var/tmp``
  hidden behind empty read-only tmpfs, a fresh size-capped tmpfs ``/tmp`` whose ``/tmp/work`` is
  the writable working directory, the job files (program, inputs) bound read-only at
  ``/tmp/job``, a fresh read-only ``/dev`` whose ``/dev/shm`` is a size-capped tmpfs, a fresh
  ``/proc``, the seccomp filter of ``_seccomp.py`` (``--seccomp``), ``--clearenv`` with a
  minimal environment. The two tmpfs are the only writable places. When we are root, bwrap
  itself runs as ``nobody`` (uid 65534) so that the sandbox's processes have a non-root kernel
  uid: the kernel ignores RLIMIT_NPROC for uid 0, so this is what makes the process-count
  limit (fork bombs) effective. A launcher inside applies the rlimits (CPU, address space,
  process count, file size, open files, no core dumps).
- **fallback** (no working bwrap): the same rlimits, a new session whose process group is
  killed on timeout, ``nobody`` when root, a scrubbed environment, a private work directory,
  ``no_new_privs`` and the same seccomp filter plus ``execve``/``execveat`` (loaded by the
  launcher; so the fallback runs Python source only, no argv), a host-side watch of the work
  dir's size, and an audit hook refusing sockets / exec / foreign C extensions / signals to
  other sessions / writes outside the work dir. It is much weaker (see docs/sandbox.md) and
  logs a warning once.

Without libseccomp (Debian's ``libseccomp2``) both modes run without the syscall filter and say
so loudly once.

On timeout (or output over the cap) the namespace's PID 1 (the launcher, run with bwrap
``--as-pid-1``; its host pid comes from ``--info-fd``) is SIGKILLed, which kills every process
in the PID namespace, then the whole process group. Output is read incrementally and capped.
See docs/sandbox.md for what this does and does not protect against.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from megacredit.envs._seccomp import DENIED, NO_EXEC, CompiledFilter, compile_filter
from megacredit.envs._write_watch import WriteWatch

logger = logging.getLogger(__name__)

NOBODY_UID = 65534
"""uid/gid the sandbox runs as when the caller is root (Debian's ``nobody``/``nogroup``)."""
PYTHON = "{python}"
"""Placeholder for argv[0] in :func:`run_sandboxed`: replaced by the sandbox's Python interpreter."""
SANDBOX_TOKEN_VAR = "MEGACREDIT_SANDBOX_TOKEN"
"""Environment variable carrying a per-run token (used by the fallback to find stray processes)."""
_LAUNCHER_SOURCE_PATH = Path(__file__).with_name("_sandbox_launcher.py")
_HIDDEN_DIRS = ("/home", "/root", "/run", "/var/tmp")
_HIDDEN_DIR_BYTES = 4096
"""Size of the empty read-only tmpfs hiding each of _HIDDEN_DIRS (one page)."""
_FILTER_FILENAME = "_seccomp.bpf"
_BWRAP_SANDBOX_ROOT = "/tmp"
_BWRAP_JOB_DIR = "/tmp/job"
_BWRAP_WORK_DIR = "/tmp/work"


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run."""

    wall_time_s: float = 10.0
    """Wall-clock limit; the whole process tree is SIGKILLed when it is reached."""
    cpu_time_s: float = 10.0
    """RLIMIT_CPU (seconds, rounded up): SIGXCPU at the soft limit, SIGKILL one second later."""
    memory_mb: int = 512
    """RLIMIT_AS per process (MiB of address space)."""
    max_processes: int = 32
    """RLIMIT_NPROC: processes (and threads) of the sandbox's user, counted per sandbox in bwrap mode."""
    max_output_bytes: int = 1 << 20
    """Cap on each of stdout and stderr kept by the caller; more output kills the run (truncated=True)."""
    max_file_bytes: int = 16 << 20
    """RLIMIT_FSIZE: the largest file the program may write."""
    max_open_files: int = 64
    """RLIMIT_NOFILE."""
    tmpfs_mb: int = 64
    """Size of the sandbox's private /tmp (incl. the work dir) in bwrap mode: bounds its file writes.
    In the fallback, the most the work dir may hold (a host-side watch kills the run past it)."""
    shm_mb: int = 16
    """Size of the sandbox's /dev/shm tmpfs in bwrap mode (POSIX shared memory, multiprocessing
    semaphores); with ``tmpfs_mb`` the only writable places, so together they bound all writes."""
    max_files: int = 4096
    """Files, directories and links the program may create: inodes in use of /tmp and /dev/shm in
    bwrap mode (each costs kernel memory that tmpfs size caps do not count), entries of the work
    dir in the fallback. Checked by the host every 0.1 s; past it the run is killed
    (``write_limit_exceeded``)."""

    def __post_init__(self) -> None:
        for name in ("wall_time_s", "cpu_time_s", "memory_mb", "max_processes", "max_output_bytes",
                     "max_file_bytes", "max_open_files", "tmpfs_mb", "shm_mb", "max_files"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SandboxLimits.{name} must be > 0, got {getattr(self, name)!r}")

    def rlimits(self) -> dict[str, tuple[int, int]]:
        """The (soft, hard) rlimits the launcher applies."""
        cpu = max(1, int(-(-self.cpu_time_s // 1)))
        return {
            "cpu": (cpu, cpu + 1),
            "as": (self.memory_mb << 20, self.memory_mb << 20),
            "nproc": (self.max_processes, self.max_processes),
            "fsize": (self.max_file_bytes, self.max_file_bytes),
            "nofile": (self.max_open_files, self.max_open_files),
            "core": (0, 0),
        }


@dataclass
class SandboxResult:
    """What happened to one sandboxed run."""

    returncode: int
    """Exit status; negative = killed by that signal (as in subprocess); in bwrap mode a program
    killed by signal S is reported as -S too (bwrap exits with 128+S, decoded here)."""
    stdout: str
    """Captured standard output (at most max_output_bytes bytes, decoded with errors='replace')."""
    stderr: str
    """Captured standard error (same cap)."""
    timed_out: bool
    """True when the wall-clock limit was reached and the process tree was killed."""
    killed_signal: int | None
    """Signal number that ended the program, or None for a normal exit."""
    truncated: bool
    """True when stdout or stderr exceeded max_output_bytes (the run was then killed)."""
    wall_time: float
    """Seconds from start to the end of the run (including sandbox setup)."""
    isolation: str = "bwrap"
    """'bwrap' or 'fallback' (the weaker rlimit-only mode)."""
    write_limit_exceeded: bool = False
    """True when the program created more than max_files files (or, in the fallback, put more
    than tmpfs_mb into its work dir) and the run was killed."""


@dataclass(frozen=True)
class _Backend:
    """How to start sandboxed processes on this machine (probed once)."""

    mode: str
    """'bwrap' or 'fallback'."""
    python: str
    """Interpreter used inside the sandbox."""
    run_as_nobody: bool
    """Whether the sandbox drops to uid/gid 65534 (only when we are root)."""
    bwrap: str | None = None
    """Path of the bwrap binary (bwrap mode)."""
    syscall_filter: bytes | None = None
    """The seccomp cBPF program both modes load (``_seccomp.py``), or None without libseccomp."""
    notes: tuple[str, ...] = field(default_factory=tuple)
    """Why a weaker choice was made (logged once)."""


def _minimal_env(home: str, token: str) -> dict[str, str]:
    """The scrubbed environment of a sandboxed program (nothing inherited from the parent)."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", "TMPDIR": home, SANDBOX_TOKEN_VAR: token,
    }


def _bwrap_argv(bwrap: str, job_dir: str, limits: SandboxLimits, env: dict[str, str], info_fd: int,
                filter_fd: int | None) -> list[str]:
    """The bubblewrap command line (see the module docstring for what each part does).

    Every writable mount is size-capped: ``/tmp`` (``tmpfs_mb``) and ``/dev/shm`` (``shm_mb``).
    ``/dev`` itself (a tmpfs bwrap fills with device nodes) and the tmpfs hiding ``/home`` etc.
    are remounted read-only; device nodes such as ``/dev/null`` stay writable on a read-only
    mount (the kernel checks EROFS for regular files, directories and links only).
    ``--as-pid-1``: the launcher itself is PID 1 of the namespace and a child of bwrap, which
    reaps it (bwrap's default extra init process is left as a zombie for the host's PID 1 to
    reap, which a container whose PID 1 is the trainer would never do). ``--info-fd`` reports
    the launcher's host pid so a timeout can SIGKILL it: the namespace dies with its PID 1.
    """
    argv = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--as-pid-1",
            "--new-session", "--ro-bind", "/", "/", "--dev", "/dev", "--size", str(limits.shm_mb << 20),
            "--tmpfs", "/dev/shm", "--proc", "/proc"]
    hidden = [path for path in _HIDDEN_DIRS if os.path.isdir(path)]
    for path in hidden:
        argv += ["--size", str(_HIDDEN_DIR_BYTES), "--tmpfs", path]
    argv += ["--size", str(limits.tmpfs_mb << 20), "--tmpfs", _BWRAP_SANDBOX_ROOT,
             "--dir", _BWRAP_WORK_DIR, "--ro-bind", job_dir, _BWRAP_JOB_DIR, "--chdir", _BWRAP_WORK_DIR]
    for path in ["/dev", *hidden]:
        argv += ["--remount-ro", path]
    argv.append("--clearenv")
    for key, value in env.items():
        argv += ["--setenv", key, value]
    if filter_fd is not None:
        argv += ["--seccomp", str(filter_fd)]
    return argv + ["--info-fd", str(info_fd), "--"]


def _python_candidates() -> list[str]:
    """Interpreters to try inside the sandbox, best first (same version as ours first)."""
    candidates = [os.path.realpath(getattr(sys, "_base_executable", sys.executable)),
                  os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"]
    which = shutil.which("python3")
    if which:
        candidates.append(os.path.realpath(which))
    unique = []
    for path in candidates:
        if path not in unique and os.path.isfile(path) and not path.startswith(tuple(d + "/" for d in _HIDDEN_DIRS)):
            unique.append(path)
    return unique


_PROBE_SOURCE = (
    "import os, sys\n"
    "try:\n"
    "    os.mkfifo('probe.fifo')\n"
    "    fifo = 'made'\n"
    "except PermissionError:\n"
    "    fifo = 'denied'\n"
    "print(os.getuid(), sys.version_info[0], fifo)\n"
)
"""Probe program: its uid, Python's major version, and whether mkfifo is denied (= the filter is on)."""


def _probe(backend: _Backend) -> bool:
    """True when ``backend`` runs a trivial Python program as the intended user, with the
    syscall filter in force when it has one."""
    try:
        result = _run(backend, _PROBE_SOURCE, None, "", SandboxLimits(wall_time_s=20, cpu_time_s=10, memory_mb=512), {})
    except OSError:
        return False
    expected_uid = str(NOBODY_UID) if backend.run_as_nobody else str(os.getuid())
    words = result.stdout.split()
    filtered = backend.syscall_filter is None or words[2:3] == ["denied"]
    return result.returncode == 0 and words[:2] == [expected_uid, "3"] and filtered


def mode_filter(mode: str) -> CompiledFilter:
    """The seccomp program of ``mode``: :data:`DENIED`; in the fallback also :data:`NO_EXEC`."""
    return compile_filter(DENIED if mode == "bwrap" else DENIED + NO_EXEC)


def _candidates(force_fallback: bool):
    """Backends to probe, strongest first: bwrap before the fallback, with the filter before without."""
    is_root = os.geteuid() == 0
    bwrap = None if force_fallback else shutil.which("bwrap")
    for mode in (["bwrap"] if bwrap else []) + ["fallback"]:
        syscall_filter = mode_filter(mode).bpf
        for with_filter in ([syscall_filter, None] if syscall_filter else [None]):
            for python in _python_candidates():
                for as_nobody in ([True, False] if is_root else [False]):
                    yield _Backend(mode, python, as_nobody, bwrap if mode == "bwrap" else None, with_filter)


def _weaknesses(backend: _Backend, filter_problem: str) -> list[str]:
    """The loud warnings of a backend weaker than the best one."""
    notes = []
    if backend.mode == "fallback":
        notes.append("bubblewrap (bwrap) is unavailable or failed its probe: using the rlimit-only fallback, "
                     "which is MUCH WEAKER (no PID/network/mount namespaces; see docs/sandbox.md). "
                     "Install bubblewrap.")
    if backend.syscall_filter is None:
        notes.append(f"NO SECCOMP SYSCALL FILTER ({filter_problem or 'the filtered sandbox failed its probe'}): "
                     "mknod/mkfifo, pidfd_send_signal, ptrace, memfd/SysV shared memory, io_uring and new "
                     "namespaces are NOT blocked (see docs/sandbox.md). Install libseccomp2.")
    if os.geteuid() == 0 and not backend.run_as_nobody:
        notes.append("no interpreter runs as uid 65534: sandboxes run as root, so RLIMIT_NPROC is ignored "
                     "and fork bombs are bounded only by the timeout")
    return notes


@functools.lru_cache(maxsize=None)
def sandbox_backend(force_fallback: bool = False) -> _Backend:
    """Probe (once per process) how sandboxes start here: bwrap if it works, else the fallback;
    with the seccomp filter if libseccomp compiles it and the probe passes with it."""
    for backend in _candidates(force_fallback):
        if _probe(backend):
            notes = _weaknesses(backend, mode_filter(backend.mode).reason)
            for note in notes:
                logger.warning("sandbox: %s", note)
            return dataclasses.replace(backend, notes=tuple(notes))
    raise RuntimeError("sandbox: no way to run a sandboxed Python here (tried bwrap and the fallback "
                       f"with {_python_candidates()}); install bubblewrap and python3")


def run_sandboxed(
    program: str | Sequence[str],
    stdin: str = "",
    limits: SandboxLimits | None = None,
    files: dict[str, str | bytes] | None = None,
    force_fallback: bool = False,
) -> SandboxResult:
    """Run ``program`` in a fresh sandbox and return its result (never raises for program faults).

    ``program``: Python source (str; run by the sandbox's interpreter in-process by the launcher)
    or an argv list (argv[0] an absolute path, or :data:`PYTHON` for the sandbox interpreter).
    ``files``: name -> content placed read-only in the job directory, whose path the program
    finds in the ``JOB_DIR`` environment variable (``/tmp/job`` in bwrap mode). The working
    directory is private and writable, and removed afterwards.
    """
    limits = limits or SandboxLimits()
    backend = sandbox_backend(force_fallback)
    if not isinstance(program, str):
        program = [backend.python if arg == PYTHON and i == 0 else arg for i, arg in enumerate(program)]
        if not program or not os.path.isabs(program[0]):
            raise ValueError(f"run_sandboxed: argv[0] must be an absolute path or sandbox.PYTHON, got {program[:1]}")
        if backend.mode == "fallback":
            raise ValueError("run_sandboxed: an argv program needs bubblewrap; the fallback runs Python source "
                             "only (its audit hook and exec ban cannot follow an exec): pass the source as a str")
    return _run(backend, program if isinstance(program, str) else None,
                None if isinstance(program, str) else list(program), stdin, limits, files or {})


def _prepare_job_dir(backend: _Backend, source: str | None, argv: list[str] | None, limits: SandboxLimits,
                     files: dict[str, str | bytes]) -> str:
    """Create the private host directory with the launcher, its config, the program and files."""
    host_dir = tempfile.mkdtemp(prefix="megacredit-sandbox-")
    job_dir = os.path.join(host_dir, "job")
    os.mkdir(job_dir)
    os.mkdir(os.path.join(host_dir, "work"))  # the fallback's working directory
    inside_job = _BWRAP_JOB_DIR if backend.mode == "bwrap" else job_dir
    for name, content in {**files, "_program.py": source or ""}.items():
        if os.sep in name or name.startswith("."):
            raise ValueError(f"run_sandboxed: file name {name!r} must be a plain name (no '/', no leading '.')")
        with open(os.path.join(job_dir, name), "wb") as handle:
            handle.write(content.encode("utf-8") if isinstance(content, str) else content)
    shutil.copyfile(_LAUNCHER_SOURCE_PATH, os.path.join(job_dir, "_launcher.py"))
    if backend.syscall_filter is not None:
        with open(os.path.join(job_dir, _FILTER_FILENAME), "wb") as handle:
            handle.write(backend.syscall_filter)
    fallback_filter = backend.mode == "fallback" and backend.syscall_filter is not None
    config = {"rlimits": limits.rlimits(), "guard": backend.mode == "fallback", "argv": argv,
              "python_source_path": os.path.join(inside_job, "_program.py") if source is not None else None,
              "syscall_filter_path": os.path.join(job_dir, _FILTER_FILENAME) if fallback_filter else None}
    with open(os.path.join(job_dir, "_launcher.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle)
    if backend.run_as_nobody:
        for path in (host_dir, os.path.join(host_dir, "work")):
            os.chown(path, NOBODY_UID, NOBODY_UID)
        os.chmod(job_dir, 0o755)
        for name in os.listdir(job_dir):
            os.chmod(os.path.join(job_dir, name), 0o644)
    return host_dir


def _run(backend: _Backend, source: str | None, argv: list[str] | None, stdin: str, limits: SandboxLimits,
         files: dict[str, str | bytes]) -> SandboxResult:
    """Start the launcher in the sandbox, feed stdin, collect capped output, enforce the wall limit."""
    host_dir = _prepare_job_dir(backend, source, argv, limits, files)
    token = uuid.uuid4().hex
    started = time.monotonic()
    info_read, info_write = os.pipe() if backend.mode == "bwrap" else (None, None)
    filter_fd = None
    try:
        if backend.mode == "bwrap":
            if backend.syscall_filter is not None:  # bwrap reads the BPF program from this descriptor
                filter_fd = os.open(os.path.join(host_dir, "job", _FILTER_FILENAME), os.O_RDONLY)
            env = _minimal_env(_BWRAP_WORK_DIR, token)
            env["JOB_DIR"] = _BWRAP_JOB_DIR
            command = _bwrap_argv(backend.bwrap, os.path.join(host_dir, "job"), limits, env, info_write, filter_fd)
            command += [backend.python, "-I", f"{_BWRAP_JOB_DIR}/_launcher.py", f"{_BWRAP_JOB_DIR}/_launcher.json"]
            cwd, popen_env = host_dir, {"PATH": "/usr/bin:/bin"}
        else:
            cwd = os.path.join(host_dir, "work")
            popen_env = _minimal_env(cwd, token)
            popen_env["JOB_DIR"] = os.path.join(host_dir, "job")
            command = [backend.python, "-I", os.path.join(host_dir, "job", "_launcher.py"),
                       os.path.join(host_dir, "job", "_launcher.json")]
        as_nobody = {"user": NOBODY_UID, "group": NOBODY_UID, "extra_groups": []} if backend.run_as_nobody else {}
        child_fds = tuple(fd for fd in (info_write, filter_fd) if fd is not None)
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   cwd=cwd, env=popen_env, start_new_session=True, close_fds=True,
                                   pass_fds=child_fds, **as_nobody)
        for descriptor in child_fds:
            os.close(descriptor)
        info_write = filter_fd = None
        launcher = _LauncherPid(info_read)
        watch = WriteWatch(limits.max_files, limits.tmpfs_mb << 20,
                           {_BWRAP_SANDBOX_ROOT.lstrip("/"): limits.tmpfs_mb << 20, "dev/shm": limits.shm_mb << 20})
        fallback_work_dir = cwd if backend.mode == "fallback" else None

        def over_limit() -> bool:
            return watch.exceeded(launcher.get(), fallback_work_dir)

        try:
            stdout, stderr, stopped = _communicate(process, stdin.encode("utf-8"), limits, started, over_limit)
            if stopped is None:  # output closed: let the program finish by itself within the wall limit
                stopped = _wait_watching(process, started + limits.wall_time_s, over_limit)
        finally:
            _stop(process, launcher)
            if backend.mode == "fallback":
                _kill_strays(token)
        returncode = process.returncode
        if stopped is not None:
            returncode = -signal.SIGKILL  # we killed it
        elif backend.mode == "bwrap" and returncode > 128:
            returncode = -(returncode - 128)  # bwrap reports a child killed by signal S as 128 + S
        killed_signal = -returncode if returncode < 0 else None
        return SandboxResult(returncode, stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace"),
                             stopped == "timeout", killed_signal, stopped == "output", time.monotonic() - started,
                             backend.mode, stopped == "writes")
    finally:
        for descriptor in (info_read, info_write, filter_fd):
            if descriptor is not None:
                os.close(descriptor)
        shutil.rmtree(host_dir, ignore_errors=True)


def _communicate(process: subprocess.Popen, stdin_bytes: bytes, limits: SandboxLimits, started: float,
                 over_limit) -> tuple[bytes, bytes, str | None]:
    """Read stdout/stderr incrementally (capped) until EOF, the wall limit, or ``over_limit()``;
    feed stdin in a thread. Returns (stdout, stderr, why it was stopped: None | 'timeout' |
    'output' | 'writes')."""
    writer = threading.Thread(target=_feed_stdin, args=(process.stdin, stdin_bytes), daemon=True)
    writer.start()
    buffers = {process.stdout: bytearray(), process.stderr: bytearray()}
    stopped = None
    deadline = started + limits.wall_time_s
    with selectors.DefaultSelector() as selector:
        for pipe in buffers:
            selector.register(pipe, selectors.EVENT_READ)
        while selector.get_map() and stopped is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                stopped = "timeout"
                break
            for key, _ in selector.select(timeout=min(remaining, 0.1)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                buffer = buffers[key.fileobj]
                room = max(0, limits.max_output_bytes - len(buffer))
                buffer += chunk[:room]
                if len(chunk) > room:
                    stopped = "output"
            if stopped is None and over_limit():
                stopped = "writes"
    writer.join(timeout=1.0)
    for pipe in buffers:
        pipe.close()
    return bytes(buffers[process.stdout]), bytes(buffers[process.stderr]), stopped


def _wait_watching(process: subprocess.Popen, deadline: float, over_limit) -> str | None:
    """Wait for the exit (the program closed its output) while watching its writes and the clock."""
    while True:
        try:
            process.wait(timeout=max(0.0, min(0.1, deadline - time.monotonic())))
            return None
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline:
                return "timeout"
            if over_limit():
                return "writes"


def _feed_stdin(pipe, data: bytes) -> None:
    """Write stdin and close it; a program that exits without reading it is fine."""
    try:
        pipe.write(data)
    except (BrokenPipeError, OSError, ValueError):
        pass
    finally:
        try:
            pipe.close()
        except (BrokenPipeError, OSError):
            pass


class _LauncherPid:
    """Host pid of the bwrap namespace's PID 1, as bwrap reports it on ``--info-fd`` (read
    without blocking; None until bwrap has written it, and always None in the fallback)."""

    def __init__(self, info_read: int | None) -> None:
        self._fd = info_read
        self._data = b""
        self._pid: int | None = None
        if info_read is not None:
            os.set_blocking(info_read, False)

    def get(self) -> int | None:
        if self._pid is None and self._fd is not None:
            try:
                self._data += os.read(self._fd, 65536)
                self._pid = int(json.loads(self._data.decode("utf-8"))["child-pid"])
            except (OSError, ValueError, KeyError, TypeError):
                pass  # not written yet (or never: bwrap failed)
        return self._pid


def _stop(process: subprocess.Popen, launcher: _LauncherPid) -> None:
    """Make sure nothing of the run is left: SIGKILL the namespace's PID 1 (bwrap mode, found via
    --info-fd) so that bwrap reaps it, then SIGKILL the whole process group, then reap bwrap."""
    child_pid = launcher.get()
    if process.poll() is None and child_pid is not None:
        try:
            os.kill(child_pid, signal.SIGKILL)
            process.wait(timeout=2.0)
        except (OSError, subprocess.TimeoutExpired):
            pass
    _kill_group(process)
    process.wait()


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the sandbox's process group (in bwrap mode its PID namespace dies with bwrap)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_strays(token: str) -> None:
    """Fallback only: SIGKILL processes that left the process group but still carry our token."""
    import psutil

    needle = f"{SANDBOX_TOKEN_VAR}={token}".encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                if needle in handle.read():
                    psutil.Process(int(pid)).kill()
        except (OSError, psutil.Error):
            continue
