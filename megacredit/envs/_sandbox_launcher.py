"""Launcher run INSIDE the sandbox (standalone: imports only the standard library).

The sandbox copies this file into the job directory and starts it as
``python -I _sandbox_launcher.py CONFIG_JSON_PATH``. It

1. applies the resource limits (``setrlimit``) from the config; RLIMIT_NPROC is set here, after
   bubblewrap has created the user namespace, so that the process count is per sandbox (the
   kernel counts RLIMIT_NPROC per user namespace and uid, see docs/sandbox.md);
2. in the rlimit-only fallback, installs an audit hook (:func:`install_guard`) that refuses
   sockets, starting other executables, signalling processes outside the sandbox's session and
   writing outside the work directory (a weaker, in-process barrier: ctypes can bypass it);
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
    "os.setgid", "pty.spawn",
}
_PATH_WRITE_EVENTS = {
    "os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.chmod", "os.chown", "os.truncate",
    "os.symlink", "os.link", "shutil.rmtree", "os.utime",
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def apply_limits(limits: dict) -> None:
    """setrlimit for every limit in ``limits`` (keys: cpu, as, nproc, fsize, nofile, core)."""
    names = {
        "cpu": resource.RLIMIT_CPU, "as": resource.RLIMIT_AS, "nproc": resource.RLIMIT_NPROC,
        "fsize": resource.RLIMIT_FSIZE, "nofile": resource.RLIMIT_NOFILE, "core": resource.RLIMIT_CORE,
    }
    for key, (soft, hard) in limits.items():
        resource.setrlimit(names[key], (soft, hard))


def install_guard(work_dir: str) -> None:
    """Install the fallback audit hook (weaker than namespaces; see module docstring)."""
    work_root = os.path.realpath(work_dir) + os.sep
    own_session = os.getsid(0)

    def inside_work_dir(path) -> bool:
        if isinstance(path, int):
            return True  # an already-open descriptor: the open itself was checked
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
        elif event in _PATH_WRITE_EVENTS:
            for path in args[:2]:
                if isinstance(path, (str, bytes, os.PathLike)) and not inside_work_dir(path):
                    raise PermissionError(f"sandbox: {event} on {path!r} outside the work dir is not allowed")
        elif event in ("os.kill", "os.killpg"):
            if not same_session(int(args[0])):
                raise PermissionError(f"sandbox: {event} of a process outside the sandbox is not allowed")

    sys.addaudithook(hook)


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as handle:
        config = json.load(handle)
    apply_limits({key: tuple(value) for key, value in config["rlimits"].items()})
    if config["guard"]:
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
