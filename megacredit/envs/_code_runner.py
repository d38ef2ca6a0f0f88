"""Test runner executed INSIDE the sandbox by the code environment (standard library only).

It reads ``$JOB_DIR/runner.json`` (test types, per-test limits, function name), compiles
``$JOB_DIR/Solution.py`` and runs every test in its OWN forked child (fresh module namespace,
real file descriptors: ``input()``, ``sys.stdin.read()`` and ``open(0)`` all read the test's
input file), so a crash, ``sys.exit``, timeout or signal in one test never hides the verdicts of
the others. It prints one line ``@@RESULT@@ {json}`` per test on its stdout. It never sees the
expected outputs: the host compares, so a program cannot forge a pass.

Per-test record: ``{"index", "status", "output", "error_type", "error_message", "line",
"function", "signal", "exit_code"}`` with status ``ok | error | timeout | output_limit | crash |
skipped``.
"""

import io
import json
import os
import resource
import selectors
import signal
import sys
import time
import traceback

RESULT_MARK = "@@RESULT@@ "
SOLUTION_FILENAME = "Solution.py"
# The imports LiveCodeBench's harness puts in front of every solution (``import_string`` in
# LiveCodeBench/LiveCodeBench lcb_runner/evaluation/testing_util.py; so `List`, `defaultdict`,
# `heapq` etc. work without an import, as on the judge). Run once in the runner before forking.
IMPORT_HEADER = (
    "from string import *\nfrom re import *\nfrom datetime import *\nfrom collections import *\n"
    "from heapq import *\nfrom bisect import *\nfrom copy import *\nfrom math import *\n"
    "from random import *\nfrom statistics import *\nfrom itertools import *\nfrom functools import *\n"
    "from operator import *\nfrom io import *\nfrom sys import *\nfrom json import *\n"
    "from builtins import *\nfrom typing import *\nimport string\nimport re\nimport datetime\n"
    "import collections\nimport heapq\nimport bisect\nimport copy\nimport math\nimport random\n"
    "import statistics\nimport itertools\nimport functools\nimport operator\nimport io\nimport sys\n"
    "import json\n"
)


def emit(record: dict) -> None:
    sys.stdout.write(RESULT_MARK + json.dumps(record) + "\n")
    sys.stdout.flush()


def describe_exception(error: BaseException) -> dict:
    """Type, message and the innermost line of Solution.py in the traceback."""
    line = function = None
    for frame, lineno in traceback.walk_tb(error.__traceback__):
        if frame.f_code.co_filename == SOLUTION_FILENAME:
            line, function = lineno, frame.f_code.co_name
    if isinstance(error, SyntaxError) and error.filename == SOLUTION_FILENAME:
        line = error.lineno
    message = error.msg if isinstance(error, SyntaxError) else str(error)
    return {"status": "error", "error_type": type(error).__name__, "error_message": message[:2000],
            "line": line, "function": function}


def run_stdin_program(code, base_namespace: dict) -> dict:
    namespace = dict(base_namespace)
    namespace.update({"__name__": "__main__", "__file__": SOLUTION_FILENAME})
    try:
        exec(code, namespace)
    except SystemExit as stop:
        if stop.code not in (None, 0):
            return {"status": "error", "error_type": "SystemExit", "error_message": f"exit code {stop.code}",
                    "line": describe_exception(stop)["line"], "function": describe_exception(stop)["function"]}
    sys.stdout.flush()
    return {"status": "ok"}


def run_function_call(code, base_namespace: dict, func_name: str, input_text: str) -> dict:
    arguments = [json.loads(line) for line in input_text.split("\n") if line.strip()]
    namespace = dict(base_namespace)
    namespace.update({"__name__": "__solution__", "__file__": SOLUTION_FILENAME})
    exec(code, namespace)
    if "Solution" in namespace:
        target = getattr(namespace["Solution"](), func_name)
    elif func_name in namespace:
        target = namespace[func_name]
    else:
        return {"status": "error", "error_type": "NameError", "line": None, "function": None,
                "error_message": f"no class Solution and no function {func_name!r} defined"}
    result = target(*arguments)
    return {"status": "ok", "output": json.dumps(result, default=repr)}


def child_main(code, base_namespace: dict, test: dict, out_fd: int, input_path: str, cpu_s: int) -> dict:
    """In the forked child: wire fds 0/1/2, limit CPU, run the test, return the report."""
    os.setpgid(0, 0)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    stdin_fd = os.open(input_path if test["testtype"] == "stdin" else os.devnull, os.O_RDONLY)
    os.dup2(stdin_fd, 0)
    os.dup2(out_fd, 1)
    null_fd = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null_fd, 2)
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "rb", closefd=False))
    try:
        if test["testtype"] == "stdin":
            return run_stdin_program(code, base_namespace)
        with open(input_path, encoding="utf-8") as handle:
            input_text = handle.read()
        return run_function_call(code, base_namespace, test["func_name"], input_text)
    except SystemExit as stop:
        report = describe_exception(stop)
        report["error_message"] = f"exit code {stop.code}"
        return report
    except BaseException as error:  # noqa: BLE001 - everything the program raises is a verdict
        return describe_exception(error)


def wait_for_child(pid: int, out_read: int, report_read: int, timeout_s: float, output_cap: int) -> tuple:
    """Collect (stdout bytes, report bytes, status_override) until the child exits or the timeout."""
    out, report = bytearray(), bytearray()
    override = None
    deadline = time.monotonic() + timeout_s
    pidfd = os.pidfd_open(pid)
    selector = selectors.DefaultSelector()
    selector.register(out_read, selectors.EVENT_READ, out)
    selector.register(report_read, selectors.EVENT_READ, report)
    selector.register(pidfd, selectors.EVENT_READ, None)
    exited_at = None
    while True:
        now = time.monotonic()
        if now >= deadline:
            override = "timeout"
            break
        if exited_at is not None and (len(selector.get_map()) == 0 or now - exited_at > 0.2):
            break  # done; a lingering grandchild holding a pipe open is not waited for
        for key, _ in selector.select(timeout=min(deadline - now, 0.05 if exited_at else 1.0)):
            if key.data is None:
                exited_at = time.monotonic()
                selector.unregister(pidfd)
                continue
            chunk = os.read(key.fd, 65536)
            if not chunk:
                selector.unregister(key.fd)
            key.data.extend(chunk)
        if len(out) > output_cap:
            override = "output_limit"
            break
    selector.close()
    os.close(pidfd)
    return bytes(out[: output_cap + 1]), bytes(report[:1 << 20]), override


def run_one_test(code, base_namespace: dict, index: int, test: dict, job_dir: str, config: dict) -> dict:
    out_read, out_write = os.pipe()
    report_read, report_write = os.pipe()
    input_path = os.path.join(job_dir, f"input_{index}.txt")
    cpu_s = max(1, int(config["per_test_timeout_s"] + 0.999))
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        report = {"status": "crash"}
        try:
            os.close(out_read)
            os.close(report_read)
            report = child_main(code, base_namespace, test, out_write, input_path, cpu_s)
        finally:
            try:
                sys.stdout.flush()
            except BaseException:  # noqa: BLE001 - e.g. output over RLIMIT_FSIZE, closed stdout
                pass
            try:
                os.write(report_write, json.dumps(report).encode("utf-8"))
            finally:
                os._exit(0)
    try:
        os.setpgid(pid, pid)
    except OSError:
        pass
    os.close(out_write)
    os.close(report_write)
    out, report_bytes, override = wait_for_child(pid, out_read, report_read, config["per_test_timeout_s"],
                                                 test["output_cap"])
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    _, status = os.waitpid(pid, 0)
    os.close(out_read)
    os.close(report_read)
    return make_record(index, test, out, report_bytes, override, status)


def make_record(index: int, test: dict, out: bytes, report_bytes: bytes, override, status: int) -> dict:
    if override is not None:
        return {"index": index, "status": override}
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        verdict = "timeout" if number in (signal.SIGXCPU, signal.SIGKILL) else "crash"
        return {"index": index, "status": verdict, "signal": number}
    try:
        report = json.loads(report_bytes.decode("utf-8"))
    except ValueError:
        return {"index": index, "status": "crash", "exit_code": os.WEXITSTATUS(status)}
    report["index"] = index
    if test["testtype"] == "stdin":
        report["output"] = out.decode("utf-8", "replace")
    return report


def main() -> None:
    job_dir = os.environ["JOB_DIR"]
    with open(os.path.join(job_dir, "runner.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    with open(os.path.join(job_dir, SOLUTION_FILENAME), encoding="utf-8") as handle:
        source = handle.read()
    try:
        code = compile(source, SOLUTION_FILENAME, "exec")
    except (SyntaxError, ValueError) as error:
        emit({"index": -1, **describe_exception(error)})
        return
    base_namespace: dict = {}
    exec(IMPORT_HEADER, base_namespace)
    timeouts = 0
    for index, test in enumerate(config["tests"]):
        if timeouts >= config["stop_after_timeouts"]:
            emit({"index": index, "status": "skipped"})
            continue
        record = run_one_test(code, base_namespace, index, test, job_dir, config)
        timeouts += record["status"] == "timeout"
        emit(record)


if __name__ == "__main__":
    main()
