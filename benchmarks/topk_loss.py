"""Top-K distillation head: the chunked vocab-parallel path vs a naive full-vocabulary one.

What is measured, for V = 151936 (the Qwen vocabulary), T in {1024, 4096} response positions,
K in {20, 100}, TP in {1, 2} (TP 2 = two gloo processes, each holding half the vocabulary):
one call in the shape the trainer makes it (this pass's top-K, log-probs at K ids chosen
elsewhere -- the teacher's set -- and at the sampled token, all with gradient), then the
backward of a loss over all of them.

* chunked: ``megacredit.algorithms.topk_fused.chunked_topk_logprobs_from_hidden`` with the
  trainer's chunking (``rows_per_chunk``: one [chunk, V/TP] fp32 tensor within 128 MiB, so
  220 rows at TP 1 and 441 at TP 2; the backward recomputes the logits);
* naive: the logits shard ``hidden @ weight_shard^T`` [T, V/TP] materialised in fp32 and
  handed to the unchunked vocab-parallel functions of ``megacredit.algorithms.topk`` (plain
  torch ops at TP 1, autograd through every op) -- what one writes without the toolkit.

Both paths run in the same fresh processes on the same inputs; their outputs and the
gradients w.r.t. hidden and the weight shard are compared there (tolerances in
``TOLERANCE``). Peak memory: Linux VmHWM (peak RSS) is reset through /proc/self/clear_refs
right before the forward and before the backward; a phase's "extra" bytes are VmHWM after it
minus VmRSS before it; the peak of a path is the larger phase. Chunked runs first in each
process, so anything the allocator kept from it can only make the naive path look smaller.
H = 64 (not a real width) keeps the matmuls small on 2 CPU cores: H changes the size of the
inputs and of grad_weight, not the [T or chunk, V] temporaries measured here. Times are the
median of interleaved repeats (chunked, naive, chunked, ...) inside the process, 1 torch thread
per rank. A configuration whose naive path would not fit in the machine's free memory is
recorded as skipped, with the reason.

Run: ``.venv/bin/python benchmarks/topk_loss.py [--quick]``; writes
benchmarks/results/topk_loss.json and the ``topk_loss`` table of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

VOCAB, HIDDEN = 151936, 64
TOLERANCE = {"logprobs": 1e-4, "grad": 1e-4}
"""Max abs difference of log-probs; of gradients relative to the naive gradient's max abs."""


class RssPeak:
    """Peak extra memory of a phase: VmHWM after it minus VmRSS before it (this process)."""

    def start(self) -> int:
        return _common.reset_peak_rss()

    def extra(self, start: int) -> int:
        return _common.status_bytes("VmHWM") - start

    def sync(self) -> None:
        """Wait for the device's queued work (nothing to wait for on a CPU)."""


class NoMemory(RssPeak):
    """Times only (the repeats after the first)."""

    def start(self) -> int:
        return 0

    def extra(self, start: int) -> int:
        return 0


def _inputs(tokens: int, top_k: int, tp: int, rank: int, hidden_size: int = HIDDEN):
    import torch

    generator = torch.Generator().manual_seed(0)  # same full tensors on every rank
    hidden = torch.randn(tokens, hidden_size, generator=generator)
    weight = 0.3 * torch.randn(VOCAB, hidden_size, generator=generator)
    gather_ids = torch.randint(0, VOCAB, (tokens, top_k), generator=generator)
    sampled_ids = torch.randint(0, VOCAB, (tokens,), generator=generator)
    coefficients = torch.rand(3, tokens, top_k, generator=generator)
    shard = VOCAB // tp
    return hidden, weight[rank * shard:(rank + 1) * shard].clone(), gather_ids, sampled_ids, coefficients


def _chunked(hidden, weight, gather_ids, sampled_ids, top_k, group, vocab_start):
    from megacredit.algorithms.topk_fused import chunked_topk_logprobs_from_hidden

    out = chunked_topk_logprobs_from_hidden(hidden, weight, k=top_k, gather_ids=gather_ids, sampled_ids=sampled_ids,
                                            chunk_size=chunk_size_for(weight.shape[0]), group=group,
                                            vocab_start=vocab_start)
    return out.topk_ids, out.topk_logprobs, out.gathered_logprobs, out.sampled_logprobs


def chunk_size_for(vocab_local: int) -> int:
    """The trainer's chunk rows for this shard (megacredit.megatron.rl_passes.VocabHead's rule)."""
    import torch

    from megacredit.algorithms.topk_fused import rows_per_chunk

    return rows_per_chunk(vocab_local, torch.float32)


def _naive(hidden, weight, gather_ids, sampled_ids, top_k, group, vocab_start):
    from megacredit.algorithms.topk import vocab_parallel_logprobs_at, vocab_parallel_topk

    logits = hidden @ weight.T  # [T, V / TP], fp32, kept for the backward
    topk_ids, topk_logprobs = vocab_parallel_topk(logits, top_k, group, vocab_start)
    gathered = vocab_parallel_logprobs_at(logits, gather_ids, group, vocab_start)
    sampled = vocab_parallel_logprobs_at(logits, sampled_ids, group, vocab_start)
    return topk_ids, topk_logprobs, gathered, sampled


def _run_path(path_fn, inputs, top_k, group, vocab_start, meter: RssPeak) -> dict:
    """One forward + backward; returns outputs, grads, seconds and the peak extra bytes ``meter``
    saw (RssPeak: this process's RSS; NoMemory: none; benchmarks/gpu_check.py: the GPU's)."""
    import torch

    hidden, weight, gather_ids, sampled_ids, coefficients = inputs
    hidden, weight = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    before = meter.start()
    start = time.perf_counter()
    ids, topk_logp, gathered, sampled = path_fn(hidden, weight, gather_ids, sampled_ids, top_k, group, vocab_start)
    meter.sync()
    forward_seconds = time.perf_counter() - start
    forward_extra = meter.extra(before)
    loss = ((coefficients[0] * topk_logp).sum() + (coefficients[1] * gathered).sum()
            + (coefficients[2, :, 0] * sampled).sum())
    before = meter.start()
    start = time.perf_counter()
    loss.backward()
    if path_fn is _naive and group is not None:
        # The chunked path sums grad_hidden over the vocabulary shards (all_reduce_grad_hidden);
        # unchunked code gets that from Megatron's copy_to_tensor_model_parallel_region.
        torch.distributed.all_reduce(hidden.grad, group=group)
    meter.sync()
    backward_seconds = time.perf_counter() - start
    backward_extra = meter.extra(before)
    return {"outputs": [t.detach() for t in (ids, topk_logp, gathered, sampled)],
            "grads": [hidden.grad, weight.grad], "seconds": forward_seconds + backward_seconds,
            "forward_seconds": forward_seconds, "backward_seconds": backward_seconds,
            "peak_extra_bytes": max(forward_extra, backward_extra)}


def _differences(chunked: dict, naive: dict) -> dict:
    ids_equal = bool((chunked["outputs"][0] == naive["outputs"][0]).all())
    logprob_diff = max(float((a - b).abs().max()) for a, b in zip(chunked["outputs"][1:], naive["outputs"][1:]))
    grad_diff = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
                    for a, b in zip(chunked["grads"], naive["grads"]))
    return {"topk_ids_equal": ids_equal, "max_abs_logprob_diff": logprob_diff, "max_rel_grad_diff": grad_diff,
            "equal": ids_equal and logprob_diff <= TOLERANCE["logprobs"] and grad_diff <= TOLERANCE["grad"]}


def measure(rank: int, world_size: int, tokens: int, top_k: int, repeats: int, run_naive: bool) -> dict:
    """One configuration on this rank (run by megacredit.utils.spawn.run_distributed)."""
    import torch.distributed as dist

    group = dist.new_group(list(range(world_size))) if world_size > 1 else None
    inputs = _inputs(tokens, top_k, world_size, rank)
    vocab_start = rank * (VOCAB // world_size)
    paths = {"chunked": _chunked, "naive": _naive} if run_naive else {"chunked": _chunked}
    first = {name: _run_path(fn, inputs, top_k, group, vocab_start, RssPeak()) for name, fn in paths.items()}
    result: dict = {name: {"peak_extra_bytes": run["peak_extra_bytes"], "seconds": [run["seconds"]]}
                    for name, run in first.items()}
    if run_naive:
        result["check"] = _differences(first["chunked"], first["naive"])
    del first
    for _ in range(repeats - 1):
        for name, fn in paths.items():
            result[name]["seconds"].append(_run_path(fn, inputs, top_k, group, vocab_start, NoMemory())["seconds"])
    return result


def naive_peak_estimate(tokens: int, tp: int) -> int:
    """Bytes the naive path needs per rank, roughly six fp32 [T, V/TP] tensors."""
    return 6 * tokens * (VOCAB // tp) * 4


def run_config(tokens: int, top_k: int, tp: int, repeats: int) -> dict:
    from megacredit.utils.spawn import run_distributed

    needed = naive_peak_estimate(tokens, tp) * tp + 2 * 2**30
    available = _common.mem_available_bytes()
    run_naive = available >= needed
    ranks = run_distributed(measure, world_size=tp, timeout=3600, tokens=tokens, top_k=top_k, repeats=repeats,
                            run_naive=run_naive)
    config = {"tokens": tokens, "top_k": top_k, "tp": tp, "vocab": VOCAB, "hidden": HIDDEN,
              "chunk_size": chunk_size_for(VOCAB // tp)}
    for name in ("chunked", "naive"):
        if name not in ranks[0]:
            config[name] = {"skipped": f"needs about {needed / 2**30:.1f} GiB free, {available / 2**30:.1f} GiB available"}
            continue
        seconds = [max(rank[name]["seconds"][r] for rank in ranks) for r in range(repeats)]
        config[name] = {"peak_extra_bytes_per_rank": max(rank[name]["peak_extra_bytes"] for rank in ranks),
                        "seconds": _common.spread(seconds), "seconds_per_repeat": seconds}
    if run_naive:
        config["check"] = {key: (all(r["check"][key] for r in ranks) if isinstance(ranks[0]["check"][key], bool)
                                 else max(r["check"][key] for r in ranks)) for key in ranks[0]["check"]}
        config["memory_ratio_chunked_over_naive"] = (config["chunked"]["peak_extra_bytes_per_rank"]
                                                     / config["naive"]["peak_extra_bytes_per_rank"])
        config["time_ratio_chunked_over_naive"] = _common.ratio_spread(
            config["chunked"]["seconds_per_repeat"], config["naive"]["seconds_per_repeat"])
    return config


def _row(config: dict, info: dict, mode: str) -> list:
    gib = lambda value: f"{value / 2**30:.2f}"  # noqa: E731
    chunked, naive = config["chunked"], config["naive"]
    shape = f"T={config['tokens']} K={config['top_k']} TP={config['tp']}"
    if "skipped" in naive:
        return [_common.machine_label(info), mode, shape, gib(chunked["peak_extra_bytes_per_rank"]),
                "skipped", "-", "-", naive["skipped"], _common.timestamp()]
    check = config["check"]
    verdict = "equal" if check["equal"] else "DIFFERENT"
    ids = "same" if check["topk_ids_equal"] else "differ"
    detail = (f"{verdict} (ids {ids}, logp {check['max_abs_logprob_diff']:.1e}, "
              f"grad {check['max_rel_grad_diff']:.1e})")
    return [_common.machine_label(info), mode, shape, gib(chunked["peak_extra_bytes_per_rank"]),
            gib(naive["peak_extra_bytes_per_rank"]), f"{config['memory_ratio_chunked_over_naive']:.3f}",
            _common.fmt_ratio(config["time_ratio_chunked_over_naive"]), detail, _common.timestamp()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="T=1024 only, 2 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3, quick 2)")
    args = parser.parse_args()
    for name in [key for key in os.environ if key.startswith("MALLOC_")]:
        del os.environ[name]  # peak-RSS accounting needs glibc's default (memory returned on free)
    repeats = args.repeats or (2 if args.quick else 3)
    token_counts = (1024,) if args.quick else (1024, 4096)
    configs = []
    for tokens in token_counts:
        for top_k in (20, 100):
            for tp in (1, 2):
                configs.append(run_config(tokens, top_k, tp, repeats))
                print({k: v for k, v in configs[-1].items() if k in ("tokens", "top_k", "tp", "check",
                                                                      "memory_ratio_chunked_over_naive")}, flush=True)
    info = _common.machine(torch_threads=1)
    mode = "quick" if args.quick else "full"
    report = {"description": __doc__.split("\n\n")[1].replace("\n", " "), "mode": mode, "repeats": repeats,
              "tolerance": TOLERANCE, "configs": configs, "machine": info, "date": _common.timestamp()}
    path = _common.write_results("topk_loss", report)
    header = ["machine", "mode", "shape", "chunked peak GiB/rank", "naive peak GiB/rank", "memory chunked/naive",
              "time chunked/naive (median, range)", "results", "date"]
    _common.update_readme_table("topk_loss", header, [_row(c, info, mode) for c in configs])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
