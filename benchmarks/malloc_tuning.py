"""glibc malloc tuning (megacredit/utils/malloc.py) on this machine: page faults and time of a
head-like step (64 MiB logits, a 64 MiB temporary), tuned vs glibc's defaults, in alternating
fresh processes. Whether the tuning helps is the kernel's choice (transparent hugepages, DAMON),
so each row names the kernel's memory policy next to the CPU.

    python benchmarks/malloc_tuning.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from _common import machine, machine_label, ratio_spread, fmt_ratio, spread, timestamp, update_readme_table, write_results

STEP = """
import json, resource, sys, time
from megacredit.utils.malloc import tune_glibc_malloc
applied = tune_glibc_malloc() if sys.argv[1] == "tuned" else False
import torch
x, w = torch.randn(1024, 256), torch.randn(16384, 256)
faults, seconds = [], []
for _ in range(8):
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    logits = x @ w.T
    probabilities = (logits - logits.amax(-1, keepdim=True)).exp()
    result = probabilities @ w
    del logits, probabilities, result
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    seconds.append(time.perf_counter() - start)
print(json.dumps({"applied": applied, "faults": faults[4:], "seconds": seconds[4:]}))
"""


def run_step(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "MEGACREDIT_MALLOC_TUNING"}
    out = subprocess.run([sys.executable, "-c", STEP, mode], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one repeat")
    args = parser.parse_args()
    from megacredit.utils.malloc import _kernel_memory_policy

    runs = {"default": [], "tuned": []}
    for _ in range(1 if args.quick else args.repeats):
        for mode in runs:  # alternating: load changes hit both alike
            runs[mode].append(run_step(mode))
    per_step = {mode: {"faults": spread([f for r in rs for f in r["faults"]]),
                       "seconds": spread([s for r in rs for s in r["seconds"]])} for mode, rs in runs.items()}
    ratio = ratio_spread([sum(r["seconds"]) for r in runs["tuned"]], [sum(r["seconds"]) for r in runs["default"]])
    info = {**machine(), "kernel_memory_policy": _kernel_memory_policy(), "kernel": os.uname().release}
    report = {"machine": info, "date": timestamp(), "per_step": per_step, "time_tuned_over_default": ratio, "runs": runs}
    print(json.dumps({k: report[k] for k in ("per_step", "time_tuned_over_default")}, indent=2))
    write_results("malloc_tuning", report)
    update_readme_table("malloc_tuning", [
        "machine", "kernel memory policy", "page faults / step, default (median)", "page faults / step, tuned (median)",
        "time tuned / default (median, range)", "date"], [[
            machine_label(info), info["kernel_memory_policy"], int(per_step["default"]["faults"]["median"]),
            int(per_step["tuned"]["faults"]["median"]), fmt_ratio(ratio), report["date"]]], key_columns=2)


if __name__ == "__main__":
    main()
