"""glibc malloc settings that remove the multi-step warm-up of CPU training.

PyTorch's CPU tensors come from ``malloc``. glibc serves blocks above its mmap threshold with a
fresh ``mmap`` and unmaps them on free, so every large temporary (activations, [chunk, V]
logits) is page-faulted in (and zeroed by the kernel) again at every use. The threshold starts
at 128 KiB and grows with each freed mapped block up to 32 MiB, so the first steps of a run pay
more than later ones (issue 11 reported a demo training pass of 13-14 s in the first steps and
about 9 s from step 5 on), and blocks above 32 MiB keep paying at every step. Measured on the
demo's passes (SmolLM2, 32 samples, five steps in a row): about 140 000 page faults per step
with glibc's defaults from the fourth step on; with these settings 5 000 at the third step and
none at the fifth, at the same peak resident memory (7.36 vs 7.41 GiB). tests/unit/test_malloc.py
checks the effect on a head-like step.

:func:`tune_glibc_malloc` applies the settings to the running process with ``mallopt`` (effective
for every later allocation; call it before the first large one, e.g. before importing torch)
and exports the equivalent ``MALLOC_*_`` variables for child processes. A variable the user set
already wins (not overridden), and ``MEGACREDIT_MALLOC_TUNING=0`` switches the tuning off. On
other C libraries it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4  # glibc <malloc.h>
SETTINGS = {  # env variable: (mallopt parameter, value)
    "MALLOC_MMAP_MAX_": (M_MMAP_MAX, 0),
    "MALLOC_TRIM_THRESHOLD_": (M_TRIM_THRESHOLD, 2**31 - 1),
    "MALLOC_TOP_PAD_": (M_TOP_PAD, 256 * 2**20),
}
"""Never mmap (reuse the heap), return memory to the OS only above 2 GiB of free top, grow the
heap in steps of 256 MiB."""


def tune_glibc_malloc() -> bool:
    """Apply :data:`SETTINGS` (see the module docstring); True when mallopt accepted them."""
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
    return applied
