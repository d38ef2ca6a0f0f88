"""glibc malloc tuning: what the tuning changes in glibc (exact, on every Linux machine), and the
run-time check of whether it saves page faults on the machine at hand.

The page faults themselves are NOT asserted here: whether memory the process keeps stays resident
is the kernel's policy (transparent hugepages, DAMON), so the same code saves every fault on one
machine and none on another (docs in megacredit/utils/malloc.py; the measurement is
benchmarks/malloc_tuning.py)."""

import json
import logging
import os
import subprocess
import sys

import pytest

from megacredit.utils import malloc

MIB = 2**20
PROBE = """
import ctypes, json, sys
from megacredit.utils.malloc import tune_glibc_malloc
applied = tune_glibc_malloc() if sys.argv[1] == "tuned" else False
import torch


class Mallinfo2(ctypes.Structure):  # glibc >= 2.33, <malloc.h>
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]


mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo2.restype = Mallinfo2
temporary = torch.ones(16 * 2**20)  # 64 MiB, twice glibc's largest dynamic mmap threshold
alive = mallinfo2()
del temporary
freed = mallinfo2()
print(json.dumps({"applied": applied, "mmapped_alive": alive.hblkhd, "heap_alive": alive.arena,
                  "mmapped_freed": freed.hblkhd, "heap_freed": freed.arena}))
"""


def _probe(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "MEGACREDIT_MALLOC_TUNING"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and mallinfo2")
def test_tuning_keeps_large_temporaries_on_the_heap():
    """With glibc's defaults a 64 MiB tensor is its own mapping, returned to the kernel on free
    (so its pages are faulted in again at the next use); tuned, it lives in the heap and the
    heap keeps its size after the free. Exact: glibc's allocation policy, not the kernel's."""
    default, tuned = _probe("default"), _probe("tuned")
    assert tuned["applied"]
    assert default["mmapped_alive"] - default["mmapped_freed"] >= 64 * MIB  # its own mapping, unmapped
    assert tuned["mmapped_alive"] == tuned["mmapped_freed"] and tuned["heap_alive"] >= 64 * MIB
    assert tuned["heap_freed"] >= 64 * MIB, "the heap was trimmed: freed memory went back to the kernel"


def test_opt_out_and_user_settings_win(monkeypatch):
    monkeypatch.setenv("MEGACREDIT_MALLOC_TUNING", "0")
    assert malloc.tune_glibc_malloc() is False
    monkeypatch.delenv("MEGACREDIT_MALLOC_TUNING")
    for name in malloc.SETTINGS:
        monkeypatch.setenv(name, "12345")
    malloc.tune_glibc_malloc()
    assert all(os.environ[name] == "12345" for name in malloc.SETTINGS)  # not overridden


def test_page_fault_check_counts_this_process_faults():
    check = malloc.PageFaultCheck(tuned=False)
    pages = bytearray(32 * MIB)  # fresh memory: the kernel faults it in page by page
    pages[::4096] = b"x" * len(pages[::4096])
    faults = check.after_step()["perf/page_faults"]
    assert faults >= 32 * MIB // (2 * MIB)  # at least one fault per page, 2 MiB ones under THP 'always'
    assert check.verdict is None  # not tuned: nothing to judge


def test_page_fault_check_warns_once_when_the_kernel_takes_memory_back(caplog):
    check = malloc.PageFaultCheck(tuned=True, warmup_steps=1, threshold=0.1)
    with caplog.at_level(logging.WARNING, logger="megacredit.utils.malloc"):
        assert check.judge(faults=50, peak_pages=1000) == "helps"
        assert not caplog.records
        assert check.judge(faults=500, peak_pages=1000) == "does not help"
    (record,) = caplog.records
    assert "no speed-up here" in record.getMessage() and "transparent hugepages" in record.getMessage()
    check.verdict = "does not help"
    check.after_step()  # judged already: no second warning
    assert len(caplog.records) == 1
