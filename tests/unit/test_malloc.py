"""glibc malloc tuning: once the heap has grown to a step's peak, the large temporaries of
later steps reuse freed memory without page faults (the warm-up the tuning removes); with
glibc's defaults every temporary above the mmap threshold is faulted in again, every step."""

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, resource, sys
from megacredit.utils.malloc import tune_glibc_malloc
applied = tune_glibc_malloc() if sys.argv[1] == "tuned" else False
import torch
x, w = torch.randn(1024, 256), torch.randn(16384, 256)
faults = []
for _ in range(8):  # a head-like step: 64 MiB logits, a 64 MiB temporary, a small result
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    logits = x @ w.T
    probabilities = (logits - logits.amax(-1, keepdim=True)).exp()
    result = probabilities @ w
    del logits, probabilities, result
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""
PAGES_PER_STEP = 2 * 64 * 2**20 // 4096


def _probe(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "MEGACREDIT_MALLOC_TUNING"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt and getrusage page faults")
def test_tuned_malloc_reuses_freed_memory_without_page_faults():
    default, tuned = _probe("default"), _probe("tuned")
    assert tuned["applied"]
    assert min(default["faults"][4:]) > PAGES_PER_STEP // 2  # mapped and unmapped again every step
    assert max(tuned["faults"][4:]) < PAGES_PER_STEP // 100  # reused from the heap


def test_opt_out_and_user_settings_win(monkeypatch):
    from megacredit.utils import malloc

    monkeypatch.setenv("MEGACREDIT_MALLOC_TUNING", "0")
    assert malloc.tune_glibc_malloc() is False
    monkeypatch.delenv("MEGACREDIT_MALLOC_TUNING")
    for name in malloc.SETTINGS:
        monkeypatch.setenv(name, "12345")
    malloc.tune_glibc_malloc()
    assert all(os.environ[name] == "12345" for name in malloc.SETTINGS)  # not overridden
