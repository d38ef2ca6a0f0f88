"""Launcher run INSIDE the sandbox (standalone: imports only the standard library).

The sandbox copies this file into the job directory and starts it as
``python -I _sandbox_launcher.py CONFIG_JSON_PATH``. It

1. applies the resource limits (``setrlimit``) from the config; RLIMIT_NPROC is set here, after
   bubblewrap has created the user namespace, so that the process count is per sandbox (the
   kernel counts RLIMIT_NPROC per user namespace and uid, see docs/sandbox.md);
2. in the rlimit-only fallback, sets ``no_new_privs`` and loads the host's seccomp filter
   (:func:`load_syscall_filter`, the same BPF program bubblewrap loads with ``--seccomp``; see
   ``_seccomp.py``), then installs an audit hook (:func:`install_guard`) that refuses sockets,
   starting other executables, loading C extensions from outside the interpreter's own
   directories, signalling processes outside the sandbox's session and writing outside the
   work directory (a weaker, in-process barrier; the kernel-enforced filter, which in the
   fallback also denies execve, holds whatever happens in the process);
3. runs the target: a Python program in this same process (``exec`` of its compiled source, so
   the guard stays installed), or ``os.execv`` of an argv.
"""

import json
import os
import resource
import sys

_BLOCKED_EVENTS = {
    "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
    "socket.getaddrinfo", "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn",
    "os.spawn", "os.startfile", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "os.setuid",
    "os.setgid", "pty.spawn", "code.__new__",
}
_PATH_WRITE_EVENTS = {
    "os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.chmod", "os.chown", "os.truncate",
    "os.symlink", "os.link", "shutil.rmtree", "os.utime", "os.setxattr", "os.removexattr",
}
_TWO_PATH_EVENTS = {"os.rename", "os.link", "os.symlink"}
"""Events whose first two arguments are both paths (the others: path or descriptor first)."""
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PR_SET_SECCOMP = 22
_PR_SET_NO_NEW_PRIVS = 38
_SECCOMP_MODE_FILTER = 2


def apply_limits(limits: dict) -> None:
    """setrlimit for every limit in ``limits`` (keys: cpu, as, nproc, fsize, nofile, core)."""
    names = {
        "cpu": resource.RLIMIT_CPU, "as": resource.RLIMIT_AS, "nproc": resource.RLIMIT_NPROC,
        "fsize": resource.RLIMIT_FSIZE, "nofile": resource.RLIMIT_NOFILE, "core": resource.RLIMIT_CORE,
    }
    for key, (soft, hard) in limits.items():
        resource.setrlimit(names[key], (soft, hard))


def load_syscall_filter(path) -> None:
    """Set no_new_privs and, when ``path`` is given, load that cBPF program as a seccomp filter.

    Fails closed: an error here stops the launcher before any untrusted code runs (the host's
    probe then sees the failure and picks a backend without a filter, loudly)."""
    import ctypes

    class SockFprog(ctypes.Structure):  # struct sock_fprog (linux/filter.h)
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    libc = ctypes.CDLL(None, use_errno=True)
    ulong = ctypes.c_ulong
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, ulong(1), ulong(0), ulong(0), ulong(0)) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    if path is None:
        return
    with open(path, "rb") as handle:
        program = handle.read()
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    if libc.prctl(_PR_SET_SECCOMP, ulong(_SECCOMP_MODE_FILTER), ctypes.byref(fprog), ulong(0), ulong(0)) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP) failed")


def install_guard(work_dir: str) -> None:
    """Install the fallback audit hook (weaker than namespaces; see module docstring)."""
    work_root = os.path.realpath(work_dir) + os.sep
    own_session = os.getsid(0)
    # Extension modules load only from the interpreter's own directories (as they are now, before
    # any untrusted code): a .so the program wrote itself would run outside this hook.
    trusted_dirs = tuple(os.path.realpath(entry) + os.sep for entry in sys.path
                         if entry and os.path.isdir(entry) and not os.path.realpath(entry).startswith(work_root))

    def inside_work_dir(path) -> bool:
        if isinstance(path, int):  # a descriptor (os.fchmod, os.utime(fd), ...): check the file it names
            try:
                path = os.readlink(f"/proc/self/fd/{path}")
            except OSError:
                return False
            if not path.startswith("/"):
                return True  # pipe:[N], socket:[N], anon_inode:...: not a file of the host
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        return os.path.realpath(str(path)).startswith(work_root) or str(path) in ("/dev/null",)

    def same_session(pid: int) -> bool:
        try:
            return pid > 0 and os.getsid(pid) == own_session
        except OSError:
            return False

    def hook(event: str, args: tuple) -> None:
        if event in _BLOCKED_EVENTS:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open" and len(args) >= 3 and args[0] is not None:
            flags = args[2] if isinstance(args[2], int) else 0
            mode = args[1] or ""
            writes = bool(flags & _WRITE_FLAGS) or any(c in str(mode) for c in "wax+")
            if writes and not inside_work_dir(args[0]):
                raise PermissionError(f"sandbox: writing {args[0]!r} outside the work dir is not allowed")
            if not isinstance(args[0], int) and os.path.isdir(args[0]) and not inside_work_dir(args[0]):
                # A directory descriptor would let os.open(..., dir_fd=) and friends write outside
                # (the "open" event does not carry dir_fd).
                raise PermissionError(f"sandbox: opening directory {args[0]!r} outside the work dir is not allowed")
        elif event in _PATH_WRITE_EVENTS:
            for path in args[:2] if event in _TWO_PATH_EVENTS else args[:1]:
                if isinstance(path, (str, bytes, os.PathLike, int)) and not inside_work_dir(path):
                    raise PermissionError(f"sandbox: {event} on {path!r} outside the work dir is not allowed")
        elif event in ("os.kill", "os.killpg"):
            if not same_session(int(args[0])):
                raise PermissionError(f"sandbox: {event} of a process outside the sandbox is not allowed")
        elif event == "import" and len(args) >= 2 and args[1] is not None:  # an extension module's file
            if not os.path.realpath(os.fsdecode(args[1])).startswith(trusted_dirs):
                raise PermissionError(f"sandbox: loading the extension module {args[1]!r} is not allowed")
        elif event == "resource.prlimit" and int(args[0]) not in (0, os.getpid()):
            raise PermissionError("sandbox: resource.prlimit of another process is not allowed")

    sys.addaudithook(hook)


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as handle:
        config = json.load(handle)
    apply_limits({key: tuple(value) for key, value in config["rlimits"].items()})
    if config["guard"]:
        load_syscall_filter(config["syscall_filter_path"])
        install_guard(os.getcwd())
    if config["python_source_path"] is not None:
        path = config["python_source_path"]
        with open(path, encoding="utf-8") as handle:
            source = handle.read()
        sys.argv = [path]
        code = compile(source, path, "exec")
        del handle, source, config
        exec(code, {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__})
    else:
        argv = config["argv"]
        os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
