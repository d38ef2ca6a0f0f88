"""glibc malloc settings that keep CPU training's large temporaries on the heap.

PyTorch's CPU tensors come from ``malloc``. glibc serves blocks above its mmap threshold with a
fresh ``mmap`` and unmaps them on free, so every large temporary (activations, [chunk, V]
logits) is page-faulted in (and zeroed by the kernel) again at every use. The threshold starts
at 128 KiB and grows with each freed mapped block up to 32 MiB, so the first steps of a run pay
more than later ones and blocks above 32 MiB keep paying at every step.

What the settings do (a property of glibc, on every machine; tests/unit/test_malloc.py checks it
through ``mallinfo2``): no block is mmapped, and freed heap memory is kept by the process up to
2 GiB of free top. Whether that saves the page faults is up to the KERNEL: memory the process
keeps can still be taken back by it. Measured (benchmarks/malloc_tuning.py, results in
benchmarks/README.md): on an Intel Xeon VM (THP ``madvise``, no DAMON) a head-like step's 192 MiB
of temporaries faulted 0 pages per step with the tuning against about 49 000 without it, and the
demo's passes went from about 140 000 faults per step to none by the fifth step at the same peak
memory; on an AMD EPYC VM (THP ``always``, a DAMON ``kdamond`` thread running) every step still
faulted all pages with the tuning applied, so no speed-up there. :class:`PageFaultCheck` measures
it where a run happens: ``perf/page_faults`` per step, and one warning when the tuning does not
help on this machine.

:func:`tune_glibc_malloc` applies the settings to the running process with ``mallopt`` (effective
for every later allocation; call it before the first large one, e.g. before importing torch)
and exports the equivalent ``MALLOC_*_`` variables for child processes. A variable the user set
already wins (not overridden), and ``MEGACREDIT_MALLOC_TUNING=0`` switches the tuning off. On
other C libraries it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import resource
from pathlib import Path

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4  # glibc <malloc.h>
SETTINGS = {  # env variable: (mallopt parameter, value)
    "MALLOC_MMAP_MAX_": (M_MMAP_MAX, 0),
    "MALLOC_TRIM_THRESHOLD_": (M_TRIM_THRESHOLD, 2**31 - 1),
    "MALLOC_TOP_PAD_": (M_TOP_PAD, 256 * 2**20),
}
"""Never mmap (reuse the heap), return memory to the OS only above 2 GiB of free top, grow the
heap in steps of 256 MiB."""

_tuned = False


def tune_glibc_malloc() -> bool:
    """Apply :data:`SETTINGS` (see the module docstring); True when mallopt accepted them."""
    global _tuned
    if os.environ.get("MEGACREDIT_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    applied = True
    for name, (parameter, value) in SETTINGS.items():
        if name in os.environ:
            continue  # the user's choice (glibc already read it at start-up)
        applied = bool(mallopt(ctypes.c_int(parameter), ctypes.c_int(value))) and applied
        os.environ[name] = str(value)
    _tuned = applied
    return applied


def return_freed_memory() -> bool:
    """Hand the heap's free memory back to the kernel now (glibc ``malloc_trim(0)``): what the
    tuning above otherwise keeps. For a deliberate release (the trainer's state during a
    colocated rollout, megacredit.utils.storage_stash), not for a step's temporaries. True
    when glibc returned something; False elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(ctypes.c_size_t(0)))
    except (OSError, AttributeError):
        return False


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:  # unreadable, or a process that ended while we looked
        return ""


def _kernel_memory_policy() -> str:
    """The kernel settings that decide whether kept memory stays resident (for the warning)."""
    thp = _read(Path("/sys/kernel/mm/transparent_hugepage/enabled"))
    thp = thp.split("[")[1].split("]")[0] if "[" in thp else "unknown"
    damon = any(_read(p / "comm").startswith("kdamond") for p in Path("/proc").glob("[0-9]*"))
    return f"transparent hugepages '{thp}', DAMON {'running' if damon else 'not running'}"


class PageFaultCheck:
    """Minor page faults per training step, and whether the malloc tuning helps on this machine.

    ``after_step()`` returns ``{"perf/page_faults": n}`` (this process, since the previous call).
    Once, after ``warmup_steps`` steps, when the tuning is applied but a step still faults more
    than ``threshold`` of the process's peak resident pages, it warns (once) that the kernel is
    returning freed memory here, so the tuning brings no speed-up on this machine.
    """

    def __init__(self, tuned: bool | None = None, warmup_steps: int = 3, threshold: float = 0.1):
        self.tuned = _tuned if tuned is None else tuned
        self.warmup_steps, self.threshold = warmup_steps, threshold
        self.steps, self.verdict = 0, None
        self._last = self._faults()

    @staticmethod
    def _faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    @staticmethod
    def _peak_resident_pages() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 // resource.getpagesize()

    def after_step(self) -> dict[str, float]:
        now = self._faults()
        faults, self._last = now - self._last, now
        self.steps += 1
        if self.tuned and self.verdict is None and self.steps > self.warmup_steps:
            self.verdict = self.judge(faults, self._peak_resident_pages())
        return {"perf/page_faults": float(faults)}

    def judge(self, faults: int, peak_pages: int) -> str:
        """'helps' or 'does not help' (warned once), from one warmed-up step's faults."""
        if faults <= self.threshold * peak_pages:
            return "helps"
        log.warning("malloc tuning is applied but step %d still page-faulted %d pages (%.0f%% of the peak "
                    "resident memory; %s): this kernel takes freed memory back, so the tuning brings no "
                    "speed-up here (MEGACREDIT_MALLOC_TUNING=0 switches it off)", self.steps, faults,
                    100 * faults / max(peak_pages, 1), _kernel_memory_policy())
        return "does not help"
