"""What every benchmark shares: the machine's description, statistics of interleaved repeats,
results files, the README table rows, and long-lived worker processes driven in alternation.

Conventions (benchmarks/README.md): a benchmark interleaves the things it compares (A, B, A, B,
...) so that load changes on a shared machine hit all of them alike, reports medians with their
spread, and claims ratios; absolute times are printed only next to the machine that made them.
"""

from __future__ import annotations

import json
import os
import platform
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
README = BENCH_DIR / "README.md"
REPO = BENCH_DIR.parent


# ----------------------------------------------------------------------------- the machine
def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mem_available_bytes() -> int:
    """MemAvailable of /proc/meminfo (0 when unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def machine(torch_threads: int | None = None) -> dict[str, Any]:
    """Who measured: CPU model, cores, torch threads, memory, versions, load at the time."""
    import torch

    return {
        "hostname": platform.node(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch_threads if torch_threads is not None else torch.get_num_threads(),
        "total_memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def machine_label(info: dict[str, Any]) -> str:
    """One table cell naming the machine."""
    return f"{info['cpu']}, {info['cpu_count']} cores, {info['torch_threads']} torch threads"


def status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def pin_mmap_threshold(threshold: int = 128 * 1024) -> None:
    """Serve every malloc block above ``threshold`` from its own mmap, unmapped at free.

    glibc's default threshold grows with each freed mapped block (up to 32 MiB), after which large
    temporaries are carved from the heap and stay resident once freed; a later pass then reuses
    them without raising VmHWM, so the peak of a pass measured through VmHWM reads low (even
    below zero). A fixed threshold turns the growth off: VmRSS then follows the live tensors. Call
    it before the first large allocation of the process."""
    import ctypes
    import ctypes.util

    m_mmap_threshold = -3  # glibc <malloc.h>
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not libc.mallopt(ctypes.c_int(m_mmap_threshold), ctypes.c_int(threshold)):
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) refused: not glibc?")


def reset_peak_rss() -> int:
    """Reset VmHWM (peak resident memory) to the current RSS; return the current RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_bytes("VmRSS")


# ----------------------------------------------------------------------------- statistics
def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and the relative spread (max - min) / median of repeated measurements."""
    values = [float(v) for v in values]
    median = statistics.median(values)
    return {
        "median": median, "min": min(values), "max": max(values), "n": len(values),
        "rel_spread": (max(values) - min(values)) / median if median else 0.0,
    }


def ratio_spread(numerators: Sequence[float], denominators: Sequence[float]) -> dict[str, float]:
    """Statistics of per-repeat ratios a_r / b_r (pairs measured back to back)."""
    return spread([a / b for a, b in zip(numerators, denominators)])


def fmt_ratio(stats: dict[str, float]) -> str:
    """'1.23x (1.18-1.30)': median and range of a ratio over the repeats."""
    if stats["n"] == 1:
        return f"{stats['median']:.2f}x (n=1)"
    return f"{stats['median']:.2f}x ({stats['min']:.2f}-{stats['max']:.2f})"


# ----------------------------------------------------------------------------- outputs
def write_results(name: str, report: dict[str, Any]) -> Path:
    """benchmarks/results/<name>.json (written atomically)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)
    return path


def update_readme_table(table: str, header: Sequence[str], rows: Iterable[Sequence[Any]],
                        key_columns: int = 3) -> None:
    """Add ``rows`` to the table between ``<!-- bench:TABLE -->`` markers of benchmarks/README.md.

    A row whose first ``key_columns`` cells equal a new row's (e.g. date-less machine, mode and
    configuration) is replaced, so reruns on one machine update their rows and another machine
    adds its own. The markers are created at the end of the file when missing.
    """
    begin, end = f"<!-- bench:{table} -->", f"<!-- /bench:{table} -->"
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    if begin not in text:
        text = text.rstrip("\n") + f"\n\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    body, tail = rest.split(end, 1)
    existing = [line for line in body.strip().splitlines()[2:] if line.startswith("|")]
    new = ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    new_keys = {_cells(line)[:key_columns] for line in new}
    kept = [line for line in existing if _cells(line)[:key_columns] not in new_keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *kept, *new]
    README.write_text(head + begin + "\n" + "\n".join(lines) + "\n" + end + tail)


def _cells(line: str) -> tuple[str, ...]:
    return tuple(cell.strip() for cell in line.strip().strip("|").split("|"))


# ----------------------------------------------------------------------------- workers
class Worker:
    """A long-lived Python process running ``script --worker ...`` that answers JSON requests.

    The protocol uses two private pipes (not stdout, which libraries print to): the parent
    writes one JSON line per request, the worker one JSON line per answer (see
    :func:`serve`). ``env`` lets a worker import another source tree (``PYTHONPATH``).
    The process is ended by its pid in :meth:`close` (also on errors, via ``with``).
    """

    def __init__(self, script: str | Path, args: Sequence[str], env: dict[str, str] | None = None,
                 log: Path | None = None, python: str = sys.executable) -> None:
        to_worker_r, self._to_worker = os.pipe()
        self._from_worker, from_worker_w = os.pipe()
        self.log = log
        output = open(log, "ab") if log else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [python, str(script), "--worker", str(to_worker_r), str(from_worker_w), *args],
            pass_fds=(to_worker_r, from_worker_w), env={**os.environ, **(env or {})},
            stdout=output, stderr=subprocess.STDOUT,
        )
        os.close(to_worker_r)
        os.close(from_worker_w)
        self._reader = os.fdopen(self._from_worker, "r")
        self._writer = os.fdopen(self._to_worker, "w")

    def request(self, timeout: float = 3600.0, **message: Any) -> Any:
        """Send one request; wait for its answer (raises if the worker died or reported an error)."""
        self._writer.write(json.dumps(message) + "\n")
        self._writer.flush()
        ready, _, _ = select.select([self._reader], [], [], timeout)
        line = self._reader.readline() if ready else ""
        if not line:
            raise RuntimeError(f"benchmark worker {self.process.args[1:3]} gave no answer "
                               f"(exit code {self.process.poll()}); see {self.log or 'its output'}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"benchmark worker failed: {answer['error']}")
        return answer["result"]

    def close(self) -> None:
        """Ask the worker to stop; kill it (by pid) if it does not within 30 s."""
        try:
            self._writer.write(json.dumps({"command": "exit"}) + "\n")
            self._writer.close()
        except (BrokenPipeError, ValueError):
            pass
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.close()

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def serve(read_fd: int, write_fd: int, handler) -> None:
    """The worker side of :class:`Worker`: answer ``handler(**request)`` until "exit"."""
    import traceback

    with os.fdopen(read_fd, "r") as reader, os.fdopen(write_fd, "w") as writer:
        for line in reader:
            request = json.loads(line)
            if request.get("command") == "exit":
                return
            try:
                answer = {"result": handler(**request)}
            except Exception as error:  # noqa: BLE001 - reported to the parent, which raises
                answer = {"error": f"{type(error).__name__}: {error}\n{traceback.format_exc()}"}
            writer.write(json.dumps(answer) + "\n")
            writer.flush()


def timestamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M")


def matmul_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Best fp32 GFLOP/s of a [size, size] @ [size, size] matmul with the current torch threads."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # first call pays the page faults
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9
