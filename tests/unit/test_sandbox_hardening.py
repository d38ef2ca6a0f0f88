"""Hostile programs against the sandbox's hardening (issue 8), in both isolation modes: every
writable place is size-capped (bwrap mode: a filler hits ENOSPC/EROFS everywhere; fallback: the
host's watch stops it), and the seccomp filter closes what the fallback's audit hook cannot see
(FIFOs and device nodes, pidfd_send_signal to a concurrent sandbox, memfd, host Unix sockets,
C extensions, exec). Each test ends by checking that no process and no temp dir was left.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

from megacredit.envs import _seccomp
from megacredit.envs._seccomp import compile_filter
from megacredit.envs.sandbox import PYTHON, SandboxLimits, run_sandboxed, sandbox_backend
from sandbox_testing import LIMITS, MODES, REPO_ROOT, no_leftovers, require_filter  # noqa: F401 - fixture

FILL_PLACE_BYTES = 64 << 20
"""What the filler tries to write in each place (far past every cap)."""
FILL_WORK_DIR_BYTES = 512 << 20
"""What it tries to write in its work dir (last; in the fallback the host's watch must stop it,
so there it writes at a steady 200 MiB/s: the watch polls, and this test is about being stopped,
not about how fast a poll reacts on a loaded machine)."""
FILL_LIMITS = SandboxLimits(wall_time_s=30.0, cpu_time_s=30.0, memory_mb=256, max_processes=16,
                            max_file_bytes=2 << 20, tmpfs_mb=8, shm_mb=4)
FILL_SOURCE = r'''
import errno, json, os, time
places = ["/tmp", "/dev", "/dev/shm", "/home", "/root", "/run", "/var/tmp", "/dev/pts", "/dev/mqueue",
          "/sys/fs/cgroup", "/proc", os.environ["JOB_DIR"]]
for line in open("/proc/self/mountinfo"):
    point = line.split()[4].replace("\\040", " ")
    if os.path.isdir(point) and point not in places:
        places.append(point)
work_dir = os.getcwd()
print(json.dumps(["work dir", work_dir]), flush=True)
places.append(work_dir)  # the work dir last
chunk = b"x" * (1 << 20)
for place in places:
    attempt = WORK_DIR_BYTES if place == work_dir else PLACE_BYTES
    written, failure = 0, None
    while written < attempt and failure is None:
        try:
            with open(os.path.join(place, f"fill-TOKEN-{written >> 20}"), "wb") as handle:
                handle.write(chunk)
            written += len(chunk)
            if place == work_dir:
                time.sleep(0.005)
        except OSError as error:
            failure = errno.errorcode.get(error.errno, type(error).__name__)
        print(json.dumps([place, written, failure]), flush=True)
print("filled", flush=True)
time.sleep(1.0)  # hold the files while the host is sampled
'''


def _meminfo_bytes(key: str) -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) << 10
    raise KeyError(key)


class HostSampler:
    """Peak rise of the host's shared memory (tmpfs pages) and of used disk in the temp dir's
    file system while the block runs (sampled every 20 ms in a thread)."""

    def __enter__(self):
        self.shmem_base, self.disk_base = _meminfo_bytes("Shmem"), shutil.disk_usage(tempfile.gettempdir()).used
        self.shmem_rise = self.disk_rise = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._done.wait(0.02):
            self.shmem_rise = max(self.shmem_rise, _meminfo_bytes("Shmem") - self.shmem_base)
            self.disk_rise = max(self.disk_rise, shutil.disk_usage(tempfile.gettempdir()).used - self.disk_base)

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()


def _fill_records(stdout: str) -> dict[str, tuple[int, str | None]]:
    """place -> (bytes written, error name) from the filler's last line about each place."""
    records = {}
    for line in stdout.splitlines():
        if line.startswith("[") and not line.startswith('["work dir"'):
            place, written, failure = json.loads(line)
            records[place] = (written, failure)
    return records


@pytest.mark.parametrize("fallback", MODES)
def test_writing_past_the_cap_anywhere_fails_and_the_host_is_untouched(fallback, no_leftovers):
    token = uuid.uuid4().hex
    source = (FILL_SOURCE.replace("TOKEN", token).replace("WORK_DIR_BYTES", str(FILL_WORK_DIR_BYTES))
              .replace("PLACE_BYTES", str(FILL_PLACE_BYTES)))
    try:
        with HostSampler() as host:
            result = run_sandboxed(source, limits=FILL_LIMITS, force_fallback=fallback)
        records = _fill_records(result.stdout)
        work_dir = json.loads(result.stdout.splitlines()[0])[1]
        mib = 1 << 20
        if fallback:  # outside the work dir the audit hook refuses; the work dir is watched by the host
            assert {p: r for p, r in records.items() if p != work_dir and r[0] > 0} == {}
            assert result.write_limit_exceeded and result.killed_signal == 9, result
            assert FILL_LIMITS.tmpfs_mb * mib <= records[work_dir][0] < FILL_WORK_DIR_BYTES
            assert host.disk_rise < FILL_WORK_DIR_BYTES, f"host disk grew by {host.disk_rise / mib:.0f} MiB"
        else:  # every write past a cap is an error (no kill): only the two capped tmpfs took data
            assert result.returncode == 0 and "filled" in result.stdout, result
            caps = {"/tmp": FILL_LIMITS.tmpfs_mb * mib, "/dev/shm": FILL_LIMITS.shm_mb * mib}
            for place, cap in caps.items():
                assert records[place] == (cap, "ENOSPC"), (place, records[place])
            took_data = {p: r for p, r in records.items() if r[0] > 0}
            assert took_data.keys() == caps.keys(), took_data
            assert {r[1] for r in records.values()} <= {"ENOSPC", "EROFS", "EACCES", "ENOENT", "EPERM"}, records
            # Without the caps the filler puts 64 MiB in each of six more places; the slack is for
            # other processes of this shared machine.
            assert host.shmem_rise < sum(caps.values()) + 128 * mib, f"host shmem grew {host.shmem_rise / mib:.0f} MiB"
            assert host.disk_rise < 128 * mib, f"host disk grew by {host.disk_rise / mib:.0f} MiB"
        assert len(records) >= 12
    finally:
        leftovers = [path for place in (*_fill_places_on_host(), *locals().get("records", {}))
                     for path in glob.glob(os.path.join(place, f"fill-{token}-*"))]
        for path in leftovers:
            os.unlink(path)
    assert leftovers == [], f"the sandbox wrote on the host: {leftovers[:5]}"


def _fill_places_on_host() -> list[str]:
    return ["/tmp", "/dev/shm", "/home", "/root", "/run", "/var/tmp", str(REPO_ROOT), tempfile.gettempdir()]


@pytest.mark.parametrize("fallback", MODES)
def test_fifos_and_device_nodes_are_refused_everywhere(fallback, no_leftovers):
    require_filter(fallback)
    token = uuid.uuid4().hex
    victim_dir = Path(tempfile.mkdtemp(prefix=".sandbox-victim-", dir=REPO_ROOT))  # visible in both modes
    victim_dir.chmod(0o777)
    try:
        source = (
            "import errno, json, os, stat\n"
            "outcome = {}\n"
            f"for directory in ['.', {str(victim_dir)!r}, '/tmp', '/dev/shm']:\n"
            "    for name, make in (('fifo', lambda p: os.mkfifo(p)),\n"
            "                       ('mknod-fifo', lambda p: os.mknod(p, stat.S_IFIFO | 0o600)),\n"
            "                       ('mknod-file', lambda p: os.mknod(p, stat.S_IFREG | 0o600))):\n"
            "        try:\n"
            f"            make(os.path.join(directory, name + '-{token}'))\n"
            "            outcome[directory + ' ' + name] = 'made'\n"
            "        except OSError as error:\n"
            "            outcome[directory + ' ' + name] = errno.errorcode.get(error.errno, type(error).__name__)\n"
            "print(json.dumps(outcome))\n"
        )
        result = run_sandboxed(source, limits=LIMITS, force_fallback=fallback)
        assert result.returncode == 0, result.stderr
        outcome = json.loads(result.stdout)
        assert len(outcome) == 12 and set(outcome.values()) == {"EPERM"}, outcome
        made = [path for directory in (victim_dir, "/tmp", "/dev/shm") for path in glob.glob(f"{directory}/*{token}")]
        assert made == []
    finally:
        shutil.rmtree(victim_dir, ignore_errors=True)


@pytest.mark.parametrize("fallback", MODES)
def test_a_sandbox_cannot_signal_or_limit_a_concurrent_one(fallback, no_leftovers):
    require_filter(fallback)
    flag_dir = Path(tempfile.mkdtemp(prefix=".sandbox-flag-", dir=REPO_ROOT))  # readable in both modes
    flag_dir.chmod(0o755)
    flag = flag_dir / "attacker-done"
    victim_source = (
        "import os, time\n"
        "deadline = time.monotonic() + 15\n"
        f"while not os.path.exists({str(flag)!r}) and time.monotonic() < deadline:\n"
        "    time.sleep(0.02)\n"
        "print('survived')\n"
    )
    victim_limits = SandboxLimits(wall_time_s=20.0, cpu_time_s=20.0, memory_mb=256, max_processes=16)
    victim_result = {}
    victim = threading.Thread(target=lambda: victim_result.update(
        result=run_sandboxed(victim_source, limits=victim_limits, force_fallback=fallback)))
    victim.start()
    try:
        victim_pid = _wait_for_launcher_pid()
        attacker = (
            "import json, os, resource, signal\n"
            f"victim = {victim_pid}\n"
            "outcome = {}\n"
            "def attempt(name, action):\n"
            "    try:\n"
            "        action()\n"
            "        outcome[name] = 'done'\n"
            "    except Exception as error:\n"
            "        outcome[name] = type(error).__name__\n"
            "attempt('pidfd_send_signal', lambda: signal.pidfd_send_signal(os.pidfd_open(victim), signal.SIGKILL))\n"
            "attempt('prlimit', lambda: resource.prlimit(victim, resource.RLIMIT_CPU, (0, 0)))\n"
            "attempt('kill', lambda: os.kill(victim, signal.SIGKILL))\n"
            "attempt('kill -1 (signal 0)', lambda: os.kill(-1, 0))\n"
            "print(json.dumps(outcome))\n"
        )
        result = run_sandboxed(attacker, limits=LIMITS, force_fallback=fallback)
        outcome = json.loads(result.stdout)
        assert len(outcome) == 4 and "done" not in outcome.values(), outcome
    finally:
        flag.touch()
        victim.join(timeout=30)
        shutil.rmtree(flag_dir, ignore_errors=True)
    survivor = victim_result["result"]
    assert survivor.returncode == 0 and survivor.stdout == "survived\n", survivor


def _wait_for_launcher_pid(timeout_s: float = 15.0) -> int:
    """Host pid of the (only) sandbox launcher running under this test process."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for child in psutil.Process().children(recursive=True):
            try:
                argv = child.cmdline()
            except psutil.Error:
                continue
            if len(argv) >= 3 and argv[1] == "-I" and argv[2].endswith("_launcher.py"):
                return child.pid
        time.sleep(0.02)
    raise AssertionError("the victim sandbox did not start")


@pytest.mark.parametrize("fallback", MODES)
def test_memory_outside_the_caps_is_refused(fallback, no_leftovers):
    require_filter(fallback)
    source = (
        "import os\n"
        "try:\n"
        "    os.memfd_create('hoard')\n"
        "    print('made')\n"
        "except OSError as error:\n"
        "    print('refused', error.errno)\n"
    )
    result = run_sandboxed(source, limits=LIMITS, force_fallback=fallback)
    assert result.stdout == f"refused {errno.EPERM}\n", result


@pytest.fixture
def without_libseccomp(monkeypatch):
    """Pretend libseccomp is not installed (fresh probes), and restore the real state afterwards."""
    monkeypatch.setattr(_seccomp, "_LIBRARY_NAMES", ("libseccomp-not-installed.so.9",))
    compile_filter.cache_clear()
    sandbox_backend.cache_clear()
    yield
    monkeypatch.undo()
    compile_filter.cache_clear()
    sandbox_backend.cache_clear()


@pytest.mark.parametrize("fallback", MODES)
def test_without_libseccomp_the_sandbox_still_runs_and_warns(fallback, without_libseccomp, caplog, no_leftovers):
    with caplog.at_level(logging.WARNING, logger="megacredit.envs.sandbox"):
        backend = sandbox_backend(fallback)
    assert backend.syscall_filter is None
    assert "NO SECCOMP SYSCALL FILTER" in caplog.text and "libseccomp-not-installed" in caplog.text
    result = run_sandboxed("import os\nos.mkfifo('fifo')\nprint('made a fifo')\n", limits=LIMITS, force_fallback=fallback)
    assert result.returncode == 0 and result.stdout == "made a fifo\n"  # what the filter would have refused


def test_fallback_closes_the_ways_around_its_audit_hook(no_leftovers):
    # Two ways pure Python gets past an audit hook: a C extension it wrote itself (the import is
    # refused before dlopen), and subprocess with its module-level sys.audit silenced (the hook
    # never sees the exec; the fallback's seccomp filter refuses execve itself).
    require_filter(True)
    source = (
        "import importlib.machinery, os, subprocess, sys, types\n"
        "open('own' + importlib.machinery.EXTENSION_SUFFIXES[0], 'wb').write(b'not an ELF file')\n"
        "sys.path.insert(0, os.getcwd())\n"
        "try:\n"
        "    import own\n"
        "except (ImportError, PermissionError) as error:\n"
        "    print('import', type(error).__name__)\n"
        "silent = types.SimpleNamespace(**{name: getattr(sys, name) for name in dir(sys) if not name.startswith('__')})\n"
        "silent.audit = lambda *args: None\n"
        "subprocess.sys = silent\n"
        "try:\n"
        "    subprocess.run(['/bin/touch', 'touched'])\n"
        "    print('exec ran', os.path.exists('touched'))\n"
        "except OSError as error:\n"
        "    print('exec refused', error.errno)\n"
    )
    result = run_sandboxed(source, limits=LIMITS, force_fallback=True)
    assert result.stdout == f"import PermissionError\nexec refused {errno.EPERM}\n", result
    with pytest.raises(ValueError, match="needs bubblewrap"):
        run_sandboxed([PYTHON, "-c", "pass"], limits=LIMITS, force_fallback=True)


@pytest.mark.parametrize("fallback", MODES)
def test_unix_socket_of_the_host_is_unreachable(fallback, no_leftovers):
    # A socket file in a directory the sandbox sees read-only: connect() needs no write access to
    # the file system, so only the syscall filter (no socket() at all) stops this in bwrap mode.
    require_filter(fallback)
    socket_dir = Path(tempfile.mkdtemp(prefix=".sandbox-socket-", dir=REPO_ROOT))
    socket_dir.chmod(0o755)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(socket_dir / "server.sock"))
        os.chmod(socket_dir / "server.sock", 0o777)
        server.listen(8)
        server.setblocking(False)
        source = (
            "import socket\n"
            "try:\n"
            "    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
            f"    client.connect({str(socket_dir / 'server.sock')!r})\n"
            "    client.sendall(b'leak')\n"
            "    print('connected')\n"
            "except Exception as error:\n"
            "    print('blocked', type(error).__name__)\n"
        )
        result = run_sandboxed(source, limits=LIMITS, force_fallback=fallback)
        assert result.stdout == "blocked PermissionError\n", result
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()
        shutil.rmtree(socket_dir, ignore_errors=True)
