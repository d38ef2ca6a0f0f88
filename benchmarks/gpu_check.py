"""GPU check (issue 17 item 6): what megacredit has never run, on one NVIDIA GPU, in under 8 minutes.

UNRUN ON A GPU: written without one (none was lent to this project when it was written), against
torch's CUDA APIs (torch.cuda.synchronize / reset_peak_memory_stats / max_memory_allocated /
memory_allocated / get_device_properties, torch.multiprocessing.reductions.reduce_tensor). On a
CPU, ``--dry-run`` and the ``--small`` runs of rl_step and topk_head are tested
(tests/unit/test_gpu_check.py); the CUDA paths and ipc_handoff run for the first time on a GPU.

Three checks, each in its own process (a crash or a hang in one is reported, the others still run):

1. ``rl_step``: one CREDIT step of a small random Qwen3-shaped model (QK-norm, GQA, head_dim 128,
   untied embeddings, a byte-level tokenizer written here) through the trainer: Megatron-Core on
   CUDA in bf16 (NCCL, no CPU compatibility layer), the embedded rollout engine, the weight sync
   and its check at start-up and after the step. Recorded: the step's metrics (losses, grad norm,
   sync/*), the layer spec chosen, peak GPU memory.
2. ``topk_head``: the chunked top-K head against the naive full-vocabulary one at V = 151936,
   T = 4096, H = 4096, K = 20 in fp32 (benchmarks/topk_loss.py's two paths, on the GPU): time
   (median of interleaved repeats, CUDA synchronised), peak extra GPU memory
   (max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before) and
   agreement (topk_loss.TOLERANCE).
3. ``ipc_handoff``: 1 GiB flat bf16 weight buckets (megacredit/rollout/flat_buckets.py, SGLang's
   layout) handed to a second process through a CUDA-IPC handle (reduce_tensor, what SGLang's
   ``update_weights_from_tensor`` serialises), checked bit-exact there and copied into that
   process's own tensors: handoff latency, copy bandwidth.

The machine: one NVIDIA GPU, PyTorch installed, no network. What else megacredit needs comes as
wheels in ``--wheels`` (``make gpu-check-wheels`` fetches them here: megatron-core and the small
packages pinned in benchmarks/gpu_check_requirements.txt); those the machine lacks are installed
offline into .gpu_site/ of this checkout, never into the machine's own environment.

Run: ``make gpu-check`` there (results: benchmarks/results/gpu_check.json; exit 1 when a check
fails); ``make gpu-check-dry-run`` / ``--dry-run`` anywhere prints what would run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SITE = REPO / ".gpu_site"
for _path in (str(BENCH), str(REPO), str(SITE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import _common  # noqa: E402
import topk_loss  # noqa: E402

CHECKS = {  # name: (time limit in seconds, what it checks); together under 8 minutes
    "ipc_handoff": (90, "CUDA-IPC handoff of 1 GiB flat bf16 weight buckets to a second process"),
    "topk_head": (150, "chunked top-K head vs naive, V=151936 T=4096 H=4096 K=20 fp32: time, peak GPU memory"),
    "rl_step": (210, "one CREDIT step of a random Qwen3-shaped model: Megatron-Core on CUDA, bf16, embedded engine"),
}
MODEL = {"architecture": "qwen3", "hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8,
         "num_key_value_heads": 4, "intermediate_size": 1536, "tie_word_embeddings": False}
SMALL_MODEL = {**MODEL, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "intermediate_size": 128}
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# ------------------------------------------------------------------------------ the wheels
def missing_wheels(wheels: Path) -> list[Path]:
    """The wheels in ``wheels`` whose distribution this Python lacks (.gpu_site/ counts)."""
    from importlib import metadata

    missing = []
    for wheel in sorted(wheels.glob("*.whl")):
        try:
            metadata.version(wheel.name.split("-")[0])
        except metadata.PackageNotFoundError:
            missing.append(wheel)
    return missing


def install_missing(wheels: Path, site: Path = SITE) -> list[str]:
    """pip-install the missing wheels into ``site`` (.gpu_site/), offline and without dependencies."""
    missing = missing_wheels(wheels)
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                        "--target", str(site), *map(str, missing)], check=True)
    return [wheel.name for wheel in missing]


# --------------------------------------------------------------------------- check: rl_step
def write_tokenizer(folder: Path):
    """A byte-level tokenizer (256 bytes + ChatML's special tokens) with a chat template, saved
    with a config.json so that ``model.tiny.tokenizer`` accepts the folder (no hub, no model)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PretrainedConfig, PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>"], chat_template=CHAT_TEMPLATE)
    tokenizer.save_pretrained(folder)
    PretrainedConfig().save_pretrained(folder)
    return tokenizer


def rl_step_overrides(folder: Path, small: bool, dtype: str) -> list[str]:
    """The run: CREDIT, G=4, 8 prompts (small: G=2, 4 prompts), one step, the sync check on."""
    model = SMALL_MODEL if small else MODEL
    overrides = {
        "model.name_or_path": "tiny", "model.dtype": dtype, "model.tiny.tokenizer": str(folder / "tokenizer"),
        **{f"model.tiny.{key}": value for key, value in model.items()},
        "algorithm.name": "credit", "algorithm.group_size": 2 if small else 4, "algorithm.sdpo.top_k": 20,
        "rollout.max_new_tokens": 8 if small else 32, "rollout.max_seq_len": 512,
        "rollout.check_weight_sync_every": 1, "data.prompts_per_step": 4 if small else 8,
        "data.num_generated_train": 16, "data.num_generated_val": 4, "data.generator_kwargs": "{difficulty: 1d+1d}",
        "training.steps": 1, "training.ppo_mini_batch_size": 4 if small else 8,
        "parallel.micro_batch_tokens": 1024 if small else 4096, "optimizer.lr": 1e-4,
        "validation.before_training": False, "validation.after_training": False, "validation.every_steps": 0,
        "logging.run_dir": str(folder / "run"), "logging.tensorboard": False, "logging.console": False,
        "logging.progress": "off", "checkpoint.save_every": 0, "checkpoint.resume": "none",
    }
    return [f"{key}={value}" for key, value in overrides.items()]


def check_rl_step(small: bool = False) -> dict:
    import math

    import torch

    from megacredit.config import load_config
    from megacredit.megatron.distributed import shutdown
    from megacredit.megatron.model_provider import choose_layer_spec
    from megacredit.trainer.builder import TRANSFORMER_ENGINE
    from megacredit.trainer.loop import setup
    from megacredit.trainer.rl_step import run_step
    from megacredit.trainer.rollout import PromptStream
    from megacredit.trainer.weight_sync import sync_weights

    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp) / "tokenizer")
        cfg = load_config(None, rl_step_overrides(Path(tmp), small, "bfloat16" if cuda else "float32"))
        start = time.monotonic()
        run, train_records, _ = setup(cfg)
        first_sync = sync_weights(run)
        setup_seconds = time.monotonic() - start
        metrics = run_step(run, 0, PromptStream(train_records, cfg.data.prompts_per_step, cfg.training.seed).batch(0))
        param = next(run.actor.model_chunks[0].parameters())
        run.engine.shutdown()
        shutdown()
    metrics = {key: value for key, value in metrics.items() if not key.startswith("_")}
    tolerance = cfg.rollout.check_weight_sync_tolerance
    checks = {
        "loss_finite": math.isfinite(metrics["train/loss"]),
        "grad_norm_positive": math.isfinite(metrics["train/grad_norm"]) and metrics["train/grad_norm"] > 0,
        "sync_checked": max(first_sync["sync/probe_logprob_diff"], metrics["sync/probe_logprob_diff"]) < tolerance,
        "weights_on_device": param.device.type == ("cuda" if cuda else "cpu") and param.dtype == (
            torch.bfloat16 if cuda else torch.float32),
    }
    return {"passed": all(checks.values()), "checks": checks, "setup_seconds": setup_seconds,
            "layer_spec": str(choose_layer_spec(TRANSFORMER_ENGINE[cfg.model.transformer_engine])),
            "first_sync": first_sync, "metrics": metrics,
            "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


# ------------------------------------------------------------------------- check: topk_head
class CudaPeak(topk_loss.RssPeak):
    """Peak extra GPU memory of a phase: max_memory_allocated after it minus memory_allocated
    before it, the device synchronised at both ends."""

    def start(self) -> int:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def extra(self, start: int) -> int:
        import torch

        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start

    def sync(self) -> None:
        import torch

        torch.cuda.synchronize()


def check_topk_head(small: bool = False, top_k: int = 20, repeats: int = 5) -> dict:
    import torch

    tokens, hidden, repeats = (64, 64, 2) if small else (4096, 4096, repeats)
    cuda = torch.cuda.is_available()
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 on both paths, compared within topk_loss.TOLERANCE
    inputs = [t.to("cuda" if cuda else "cpu") for t in topk_loss._inputs(tokens, top_k, 1, 0, hidden)]
    meter = CudaPeak() if cuda else topk_loss.RssPeak()
    paths = {"chunked": topk_loss._chunked, "naive": topk_loss._naive}
    first = {name: topk_loss._run_path(fn, inputs, top_k, None, 0, meter) for name, fn in paths.items()}
    agreement = topk_loss._differences(first["chunked"], first["naive"])
    peak = {name: run["peak_extra_bytes"] for name, run in first.items()}
    seconds = {name: [run["seconds"]] for name, run in first.items()}
    del first
    for _ in range(repeats - 1):  # interleaved: chunked, naive, chunked, ...
        for name, fn in paths.items():
            seconds[name].append(topk_loss._run_path(fn, inputs, top_k, None, 0, meter)["seconds"])
    return {"passed": agreement["equal"], "agreement": agreement,
            "config": {"vocab": topk_loss.VOCAB, "tokens": tokens, "hidden": hidden, "top_k": top_k, "dtype": "float32",
                       "chunk_rows": topk_loss.chunk_size_for(topk_loss.VOCAB), "repeats": repeats},
            "peak_extra_gib": {name: value / 2**30 for name, value in peak.items()},
            "memory_ratio_chunked_over_naive": peak["chunked"] / peak["naive"],
            "seconds": {name: _common.spread(values) for name, values in seconds.items()},
            "time_ratio_chunked_over_naive": _common.ratio_spread(seconds["chunked"], seconds["naive"])}


# ----------------------------------------------------------------------- check: ipc_handoff
def checksums(named) -> list[int]:
    """Bit-exact fingerprints: each bf16 tensor's bits as int16, summed in int64."""
    import torch

    return [int(t.view(torch.int16).sum(dtype=torch.int64)) for _, t in named]


def _ipc_consumer(inbox, outbox) -> None:
    """The second process: open each bucket from its CUDA-IPC handle, check it, copy it out."""
    import torch

    from megacredit.rollout.flat_buckets import unflatten_tensors

    torch.cuda.init()
    outbox.put("ready")
    while (message := inbox.get(timeout=120)) is not None:
        rebuild, args, metadata = message
        flat = rebuild(*args)
        opened = time.monotonic()
        views = unflatten_tensors(flat, metadata)
        own = [torch.empty_like(tensor) for _, tensor in views]
        torch.cuda.synchronize()
        start = time.monotonic()
        for target, (_, tensor) in zip(own, views):
            target.copy_(tensor)
        torch.cuda.synchronize()
        outbox.put({"opened_at": opened, "copy_seconds": time.monotonic() - start, "device": str(flat.device),
                    "checksums": checksums(views), "copies_equal": all(torch.equal(a, b) for a, (_, b) in zip(own, views))})
        del flat, views, own


def check_ipc_handoff(small: bool = False, tensors: int = 64, repeats: int = 3) -> dict:
    import torch
    import torch.multiprocessing as mp
    from torch.multiprocessing.reductions import reduce_tensor

    from megacredit.rollout.flat_buckets import flatten_tensors

    bucket_mib = 64 if small else 1024
    context = mp.get_context("spawn")
    inbox, outbox = context.Queue(), context.Queue()
    consumer = context.Process(target=_ipc_consumer, args=(inbox, outbox))
    consumer.start()
    runs = []
    try:
        assert outbox.get(timeout=120) == "ready"
        for _ in range(repeats):
            named = [(f"model.layers.{i}.mlp.down_proj.weight",
                      torch.randn(bucket_mib * 2**19 // tensors // 1024, 1024, device="cuda", dtype=torch.bfloat16))
                     for i in range(tensors)]
            flat, metadata = flatten_tensors(named)
            torch.cuda.synchronize()
            sent = time.monotonic()
            inbox.put((*reduce_tensor(flat), metadata))
            answer = outbox.get(timeout=120)  # the bucket stays alive here until the consumer is done
            runs.append({"handoff_seconds": answer["opened_at"] - sent, "device": answer["device"],
                         "copy_gb_per_s": flat.numel() * 2 / answer["copy_seconds"] / 1e9,
                         "bit_exact": answer["checksums"] == checksums(named) and answer["copies_equal"]})
            del flat, named
        inbox.put(None)
        consumer.join(timeout=60)
    finally:
        if consumer.is_alive():
            consumer.kill()  # by its pid: the one process this check started
            consumer.join()
    return {"passed": len(runs) == repeats and all(run["bit_exact"] for run in runs), "bucket_mib": bucket_mib,
            "tensors_per_bucket": tensors, "runs": runs,
            "handoff_seconds": _common.spread([run["handoff_seconds"] for run in runs]),
            "copy_gb_per_s": _common.spread([run["copy_gb_per_s"] for run in runs])}


# ------------------------------------------------------------------------------- the driver
CHECK_FUNCTIONS = {"ipc_handoff": check_ipc_handoff, "topk_head": check_topk_head, "rl_step": check_rl_step}


def run_one(name: str, out: Path, small: bool) -> None:
    """``--check NAME``: run one check in this process; its result (or error) as JSON in ``out``."""
    try:
        result = CHECK_FUNCTIONS[name](small=small)
    except Exception as error:  # noqa: BLE001 - reported in the results, the other checks still run
        result = {"passed": False, "error": f"{type(error).__name__}: {error}",
                  "traceback": traceback.format_exc().splitlines()[-12:]}
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")


def run_checks(names: list[str], small: bool) -> dict:
    """Each check in a child process (its own session), ended by its process group on timeout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SITE), str(REPO), os.environ.get("PYTHONPATH", "")])}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            limit, _ = CHECKS[name]
            out, start = Path(tmp) / f"{name}.json", time.monotonic()
            command = [sys.executable, __file__, "--check", name, "--out", str(out), *(["--small"] if small else [])]
            child = subprocess.Popen(command, env=env, start_new_session=True)
            try:
                code = child.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)  # the child and what it started (IPC consumer)
                code = child.wait()
            result = json.loads(out.read_text()) if out.exists() else {
                "passed": False, "error": f"no result: exit code {code} after {time.monotonic() - start:.0f} s (limit {limit} s)"}
            results[name] = {**result, "wall_seconds": time.monotonic() - start}
            print(f"gpu-check: {name}: {'passed' if result['passed'] else 'FAILED'} "
                  f"({results[name]['wall_seconds']:.0f} s){'' if result['passed'] else ': ' + str(result.get('error', ''))}")
    return results


def gpu_machine() -> dict:
    import torch
    from importlib import metadata

    info = _common.machine()
    properties = torch.cuda.get_device_properties(0)
    info.update(gpu=properties.name, gpu_memory_gib=round(properties.total_memory / 2**30, 1),
                cuda=torch.version.cuda, megatron_core=metadata.version("megatron-core"),
                transformers=metadata.version("transformers"))
    return info


def dry_run(wheels: Path, names: list[str]) -> None:
    """What a run would do, here: the wheels it would install, each check, the RL step's config
    (loaded and validated with a tokenizer written to a temporary folder); needs no CUDA."""
    from megacredit.config import load_config

    print(f"gpu-check --dry-run (Python {sys.version.split()[0]}, this machine's packages)")
    if wheels.is_dir():
        size = sum(w.stat().st_size for w in wheels.glob("*.whl")) / 2**20
        print(f"wheels: {wheels} ({len(list(wheels.glob('*.whl')))} wheels, {size:.1f} MiB); "
              f"would install into {SITE}: {[w.name for w in missing_wheels(wheels)] or 'none (all present)'}")
    else:
        print(f"wheels: {wheels} does not exist (make gpu-check-wheels fetches them)")
    for name in names:
        limit, what = CHECKS[name]
        print(f"check {name} (limit {limit} s): {what}")
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp) / "tokenizer")
        cfg = load_config(None, rl_step_overrides(Path(tmp), small=False, dtype="bfloat16"))
    print(f"rl_step config (validated): {cfg.algorithm.name}, tiny {cfg.model.tiny.architecture} hidden "
          f"{cfg.model.tiny.hidden_size} x {cfg.model.tiny.num_hidden_layers} layers, {cfg.model.dtype}, "
          f"G={cfg.algorithm.group_size}, {cfg.data.prompts_per_step} prompts, {cfg.rollout.engine} engine, "
          f"model.transformer_engine={cfg.model.transformer_engine}")
    print(f"results: {_common.RESULTS_DIR / 'gpu_check.json'}; total limit {sum(CHECKS[n][0] for n in names)} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print what would run; needs no GPU")
    parser.add_argument("--wheels", type=Path, default=BENCH / "gpu_wheels", help="wheels to install offline")
    parser.add_argument("--only", nargs="+", choices=list(CHECKS), default=list(CHECKS), help="run these checks")
    parser.add_argument("--check", choices=list(CHECKS), help=argparse.SUPPRESS)  # one check, in a child
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--small", action="store_true", help="tiny sizes (a CPU smoke run of rl_step, topk_head)")
    args = parser.parse_args(argv)
    if args.dry_run:
        dry_run(args.wheels, args.only)
        return 0
    if args.check:
        run_one(args.check, args.out, args.small)
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; run it on a machine with one NVIDIA GPU (--dry-run shows the plan)")
        return 2
    try:
        installed = install_missing(args.wheels) if args.wheels.is_dir() else []
    except subprocess.CalledProcessError:
        print(f"gpu-check: pip could not install from {args.wheels}; were they fetched for this Python "
              f"({sys.version_info.major}.{sys.version_info.minor})? make gpu-check-wheels GPU_PYTHON_VERSION=...")
        return 2
    start = time.monotonic()
    results = run_checks(args.only, args.small)
    report = {"machine": gpu_machine(), "installed_from_wheels": installed, "checks": results,
              "passed": all(r["passed"] for r in results.values()), "seconds": time.monotonic() - start,
              "date": _common.timestamp()}
    print(f"gpu-check: {'passed' if report['passed'] else 'FAILED'}; wrote {_common.write_results('gpu_check', report)}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
