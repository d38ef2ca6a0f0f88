"""Peak extra memory of the chunked top-K path vs one fp32 [T, V] tensor.

What is measured: one call of ``chunked_topk_logprobs_from_hidden`` at T = 4096 tokens,
V = 151936 (Qwen vocabulary), K = 100, in the shape the trainer uses it -- this pass's top-100,
log-probs at 100 other ids (the teacher's top-K) and at the sampled token, with gradient --
followed by the backward of a loss over all of them. H = 64 (not a real model width) keeps the
matmuls fast on 2 CPU cores; H only changes the size of the inputs and of grad_weight
([V, H] fp32 = 39 MB here), not the [chunk, V] temporaries this benchmark is about.

How: each configuration runs in a fresh subprocess. The Linux peak-RSS counter (VmHWM in
/proc/self/status) is reset by writing "5" to /proc/self/clear_refs right before the forward
and again right before the backward; "extra" is VmHWM after the phase minus VmRSS before it,
i.e. every byte the phase touched beyond the inputs (and, for backward, beyond the forward's
outputs). Saved-for-backward bytes are counted exactly with saved_tensors_hooks.

Run: ``.venv/bin/python benchmarks/topk_memory.py`` (about 1-2 minutes on 2 cores); writes
benchmarks/results/topk_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

TOKENS, VOCAB, TOP_K, HIDDEN = 4096, 151936, 100, 64
CONFIGS = [  # (tokens, chunk_size)
    (TOKENS, 256),
    (TOKENS, 1024),
    (1024, 256),  # same chunk, 4x fewer tokens: the peak should not change
]
RESULTS = Path(__file__).resolve().parent / "results" / "topk_memory.json"


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> int:
    """Reset VmHWM to the current RSS; return the current RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_bytes("VmRSS")


def measure(tokens: int, chunk_size: int) -> dict:
    """Run one configuration in this process (called in a fresh subprocess)."""
    import torch

    from megacredit.algorithms.topk_fused import chunked_topk_logprobs_from_hidden

    torch.manual_seed(0)
    hidden = torch.randn(tokens, HIDDEN).requires_grad_(True)
    weight = (0.1 * torch.randn(VOCAB, HIDDEN)).requires_grad_(True)
    gather_ids = torch.randint(0, VOCAB, (tokens, TOP_K))
    sampled_ids = torch.randint(0, VOCAB, (tokens,))
    saved_bytes = []

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in (hidden.data_ptr(), weight.data_ptr()):
            saved_bytes.append(tensor.numel() * tensor.element_size())
        return tensor

    rss_before_forward = _reset_peak()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = chunked_topk_logprobs_from_hidden(
            hidden, weight, k=TOP_K, gather_ids=gather_ids, sampled_ids=sampled_ids, chunk_size=chunk_size
        )
    forward_seconds = time.perf_counter() - start
    forward_extra = _status_bytes("VmHWM") - rss_before_forward
    loss = result.topk_logprobs.sum() + result.gathered_logprobs.sum() + result.sampled_logprobs.sum()
    rss_before_backward = _reset_peak()
    start = time.perf_counter()
    loss.backward()
    backward_seconds = time.perf_counter() - start
    backward_extra = _status_bytes("VmHWM") - rss_before_backward
    return dict(
        tokens=tokens,
        chunk_size=chunk_size,
        forward_peak_extra_bytes=forward_extra,
        backward_peak_extra_bytes=backward_extra,
        saved_for_backward_bytes=sum(saved_bytes),
        one_fp32_chunk_by_vocab_bytes=chunk_size * VOCAB * 4,
        grad_weight_bytes=VOCAB * HIDDEN * 4,
        forward_seconds=round(forward_seconds, 2),
        backward_seconds=round(backward_seconds, 2),
    )


def _with_ratios(run: dict, full_fp32: int) -> dict:
    """Add the peak as a fraction of one fp32 [T, V] tensor and in units of one [chunk, V] tensor."""
    peak = max(run["forward_peak_extra_bytes"], run["backward_peak_extra_bytes"])
    return dict(
        run,
        peak_over_one_fp32_tokens_by_vocab=round(peak / full_fp32, 4),
        peak_in_fp32_chunk_by_vocab_tensors=round(peak / run["one_fp32_chunk_by_vocab_bytes"], 2),
    )


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict:
    import torch

    total_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return dict(
        hostname=platform.node(),
        cpu=_cpu_model(),
        cpu_count=os.cpu_count(),
        total_memory_bytes=total_memory,
        python=platform.python_version(),
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", nargs=2, type=int, metavar=("TOKENS", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(*args.worker)))
        return
    runs = []
    for tokens, chunk_size in CONFIGS:
        command = [sys.executable, __file__, "--worker", str(tokens), str(chunk_size)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(output.strip().splitlines()[-1]))
        print(runs[-1], flush=True)
    full_fp32 = TOKENS * VOCAB * 4
    report = dict(
        description=__doc__.split("\n\n")[1].replace("\n", " "),
        method=__doc__.split("\n\n")[2].replace("\n", " "),
        setup=dict(tokens=TOKENS, vocab=VOCAB, top_k=TOP_K, hidden=HIDDEN, dtype="float32"),
        one_fp32_tokens_by_vocab_bytes=full_fp32,
        runs=[_with_ratios(run, full_fp32) for run in runs],
        machine=machine(),
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
