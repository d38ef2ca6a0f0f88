"""Issue 22's memory knobs, measured on a CPU: activation recompute, the trainer's state released
during the rollout, the lean EMA teacher.

1. recompute: peak memory and time of one training pass (forward + backward through
   ``run_packed_schedule``, Megatron DDP, the chunked vocab head) of a Llama-shaped model
   (hidden 256, 8 layers, 8 heads / 4 KV heads, SwiGLU 1024, vocab 1024, fp32) on one packed
   micro-batch of 8 x 512 tokens, with ``parallel.recompute`` none, selective (core_attn),
   selective (core_attn + mlp) and full (uniform, 1 layer). "peak" = VmHWM during the pass minus
   VmRSS before it (VmHWM reset through /proc/self/clear_refs), with glibc's mmap threshold
   pinned at 128 KiB so that every tensor is its own mapping, returned at free (VmRSS follows
   the live tensors; ``_common.pin_mmap_threshold``), of the first pass in a fresh process; the
   time is the second pass's. The settings alternate, one process each.
2. release: one CREDIT step of the real trainer (the tiny model at hidden 256, 4 layers, the
   embedded engine) with ``rollout.offload_trainer_during_rollout``; with its state restored,
   VmRSS before ``trainer_memory_released``, inside it and after it, next to the bytes released
   and the seconds the release and the restore took. Repeated in fresh processes.
3. teacher: what a teacher pass adds around its forward (the swap in and back) and what an EMA
   update costs, for 50M fp32 parameters (8 Linear 2500 x 2500): the previous design (a
   permanent backup buffer as large as the policy), the lean one (a host copy of the policy
   made for the pass), the lean one with the fp32 copy in host memory (on a CPU that is the
   same memory and the same code: the row shows the path costs nothing extra here); and the
   bytes each holds between passes. Alternating, in one process.

Run: ``.venv/bin/python benchmarks/memory_knobs.py [--quick]``; writes
benchmarks/results/memory_knobs.json and the ``memory_recompute``, ``memory_release`` and
``memory_teacher`` tables of benchmarks/README.md. About 6 min on 2 cores (--quick: 2 min).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

MIB = 2**20
VOCAB, HIDDEN, LAYERS, SEQUENCES, SEQUENCE_LENGTH = 1024, 256, 8, 8, 512
RECOMPUTE = {
    "none": ("none",),
    "selective core_attn": ("selective", "uniform", 1, ("core_attn",)),
    "selective core_attn+mlp": ("selective", "uniform", 1, ("core_attn", "mlp")),
    "full uniform 1": ("full", "uniform", 1),
}
TEACHER_LAYERS, TEACHER_WIDTH = 8, 2500


# ----------------------------------------------------------------------------- 1. recompute
def recompute_pass(rank: int, world_size: int, setting: str) -> dict:
    """Peak extra memory and seconds of the second training pass under ``setting`` (a fresh process)."""
    import torch

    from megacredit.data.packing import SequenceToPack, pack_sequences
    from megacredit.megatron import distributed
    from megacredit.megatron.model_provider import build_gpt_model, recompute_overrides
    from megacredit.megatron.optimizer import wrap_with_ddp, zero_grads
    from megacredit.megatron.packed_attention import enable_packed_attention
    from megacredit.megatron.rl_passes import VocabHead, run_packed_schedule
    from megacredit.models.tiny import tiny_config

    _common.pin_mmap_threshold()  # VmHWM then follows the live tensors (see there)
    torch.set_num_threads(2)
    ctx = distributed.initialize(1, 1, seed=0)
    hf_config = tiny_config("llama", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN,
                            num_hidden_layers=LAYERS, num_attention_heads=8, num_key_value_heads=4,
                            max_position_embeddings=SEQUENCE_LENGTH)
    model = build_gpt_model(hf_config, ctx, **recompute_overrides(*RECOMPUTE[setting]))
    enable_packed_attention(model)
    chunks = wrap_with_ddp([model])
    generator = torch.Generator().manual_seed(0)
    groups = [[SequenceToPack(("s", i), tuple(torch.randint(0, VOCAB, (SEQUENCE_LENGTH,), generator=generator).tolist()), 1)]
              for i in range(SEQUENCES)]
    batches = pack_sequences(groups, token_budget=SEQUENCES * SEQUENCE_LENGTH)
    head, targets = VocabHead(chunks), sum(len(b.target_ids) for b in batches)

    def token_mean_nll(hidden, micro_batch):
        share = -head(hidden, sampled_ids=micro_batch.target_ids).sampled_logprobs.sum() / targets
        return share, {"loss": share.detach()}

    measured = []
    for _ in range(2):  # memory: the first pass (nothing of it is resident yet); time: the second
        zero_grads(chunks)
        before = _common.reset_peak_rss()
        start = time.perf_counter()
        run_packed_schedule(chunks, batches, token_mean_nll, forward_only=False)
        measured.append((_common.status_bytes("VmHWM") - before, time.perf_counter() - start))
    return {"peak_bytes": measured[0][0], "seconds": measured[1][1]}


def measure_recompute(repeats: int) -> dict:
    from megacredit.utils.spawn import run_distributed

    runs: dict[str, list[dict]] = {name: [] for name in RECOMPUTE}
    for _ in range(repeats):
        for name in RECOMPUTE:
            runs[name] += run_distributed(recompute_pass, world_size=1, timeout=1800, setting=name)
    none = runs["none"]
    return {name: {"peak_mib": _common.spread([r["peak_bytes"] / MIB for r in results]),
                   "seconds": _common.spread([r["seconds"] for r in results]),
                   "peak_vs_none": _common.ratio_spread([r["peak_bytes"] for r in results], [r["peak_bytes"] for r in none]),
                   "time_vs_none": _common.ratio_spread([r["seconds"] for r in results], [r["seconds"] for r in none])}
            for name, results in runs.items()}


# ----------------------------------------------------------------------------- 2. release
def release_during_rollout(rank: int, world_size: int, run_dir: str) -> dict:
    """VmRSS around the rollout's release, after one CREDIT step of the trainer (a fresh process)."""
    import torch

    from megacredit.config import load_config
    from megacredit.trainer.loop import setup
    from megacredit.trainer.rl_step import run_step, trainer_memory_released
    from megacredit.trainer.rollout import PromptStream
    from megacredit.trainer.weight_sync import sync_weights
    from megacredit.utils.malloc import tune_glibc_malloc

    tune_glibc_malloc()  # as `megacredit train` runs
    torch.set_num_threads(2)
    cfg = load_config(None, [f"logging.run_dir={run_dir}", "model.name_or_path=tiny", "model.tiny.hidden_size=256",
                             "model.tiny.num_hidden_layers=4", "model.tiny.intermediate_size=1024",
                             "model.tiny.num_attention_heads=8", "model.tiny.num_key_value_heads=4",
                             "algorithm.group_size=2", "data.prompts_per_step=4", "training.ppo_mini_batch_size=4",
                             "rollout.max_new_tokens=8", "rollout.max_seq_len=256", "parallel.micro_batch_tokens=512",
                             "logging.console=false", "logging.tensorboard=false", "validation.before_training=false",
                             "rollout.offload_trainer_during_rollout=true", "checkpoint.save_every=0"])
    run, train_records, _ = setup(cfg)
    sync_weights(run)
    prompts = PromptStream(train_records, cfg.data.prompts_per_step, cfg.training.seed, cfg.data.shuffle)
    run_step(run, 0, prompts.batch(0))
    run.actor.memory.restore()  # what the step released for the weight sync comes back first
    resident = _common.status_bytes("VmRSS")
    start = time.perf_counter()
    with trainer_memory_released(run):
        release_seconds = time.perf_counter() - start
        released_rss = _common.status_bytes("VmRSS")
        released = dict(run.actor.memory.released)
        start = time.perf_counter()
    restore_seconds = time.perf_counter() - start
    return {"released_bytes": released, "rss_drop": resident - released_rss,
            "rss_back": _common.status_bytes("VmRSS") - released_rss,
            "release_seconds": release_seconds, "restore_seconds": restore_seconds}


def measure_release(repeats: int) -> dict:
    from megacredit.utils.spawn import run_distributed

    results = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as run_dir:
            results += run_distributed(release_during_rollout, world_size=1, timeout=1800, run_dir=run_dir)
    released = [sum(r["released_bytes"].values()) for r in results]
    return {"released_by_part_mib": {k: v / MIB for k, v in results[0]["released_bytes"].items()},
            "released_mib": _common.spread([b / MIB for b in released]),
            "rss_drop_mib": _common.spread([r["rss_drop"] / MIB for r in results]),
            "rss_drop_vs_released": _common.ratio_spread([r["rss_drop"] for r in results], released),
            "rss_back_mib": _common.spread([r["rss_back"] / MIB for r in results]),
            "release_seconds": _common.spread([r["release_seconds"] for r in results]),
            "restore_seconds": _common.spread([r["restore_seconds"] for r in results])}


# ----------------------------------------------------------------------------- 3. teacher
class PermanentBackupTeacher:
    """The previous design (megacredit/megatron/teacher.py before issue 22), for comparison: an
    fp32 copy plus a permanent buffer as large as the policy, the policy copied there and back."""

    def __init__(self, params):
        self.tensors = [p.detach().float().clone() for p in params]
        self.backup = [p.detach().clone() for p in params]

    @contextlib.contextmanager
    def swapped_in(self, params):
        import torch

        with torch.no_grad():
            for backup, teacher, param in zip(self.backup, self.tensors, params):
                backup.copy_(param)
                param.copy_(teacher)
            yield
            for backup, param in zip(self.backup, params):
                param.copy_(backup)

    def after_optimizer_step(self, params, rate=0.01):
        import torch

        with torch.no_grad():
            for teacher, param in zip(self.tensors, params):
                teacher.lerp_(param.detach().float(), rate)


def _held(teacher) -> str:
    """MiB the teacher holds between passes, and where (the device's memory, or the host's)."""
    held = [t for name in ("tensors", "backup") for t in getattr(teacher, name, [])]
    where = "host" if getattr(teacher, "on_host", False) else "device"
    return f"{sum(t.untyped_storage().nbytes() for t in held) / MIB:.0f} ({where})"


def measure_teacher(repeats: int) -> dict:
    import torch

    from megacredit.megatron.teacher import TeacherWeights

    torch.set_num_threads(2)
    model = torch.nn.Sequential(*[torch.nn.Linear(TEACHER_WIDTH, TEACHER_WIDTH, bias=False) for _ in range(TEACHER_LAYERS)])
    params = list(model.parameters())
    designs = {"permanent backup (before)": PermanentBackupTeacher(params),
               "lean (host copy per pass)": TeacherWeights([model], ema_rate=0.01),
               "lean, fp32 copy on host": TeacherWeights([model], ema_rate=0.01, on_host=True)}
    swap, ema = {name: [] for name in designs}, {name: [] for name in designs}
    for _ in range(repeats):
        for name, teacher in designs.items():
            start = time.perf_counter()
            with teacher.swapped_in(params if isinstance(teacher, PermanentBackupTeacher) else [model]):
                pass
            swap[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            teacher.after_optimizer_step(params if isinstance(teacher, PermanentBackupTeacher) else [model])
            ema[name].append(time.perf_counter() - start)
    before = swap["permanent backup (before)"]
    return {"parameters": sum(p.numel() for p in params), **{name: {
        "swap_seconds": _common.spread(swap[name]), "ema_seconds": _common.spread(ema[name]),
        "swap_vs_before": _common.ratio_spread(swap[name], before),
        "held_between_passes": _held(teacher)} for name, teacher in designs.items()}}


# ----------------------------------------------------------------------------- output
def _rows(report: dict, mode: str) -> dict[str, list[list]]:
    label, date = _common.machine_label(report["machine"]), report["date"]
    recompute = [[label, mode, name, f"{r['peak_mib']['median']:.0f}", f"{r['peak_vs_none']['median']:.2f}x",
                  f"{r['seconds']['median']:.2f}", _common.fmt_ratio(r["time_vs_none"]), date]
                 for name, r in report["recompute"].items()]
    rel = report["release"]
    parts = ", ".join(f"{part} {mib:.0f}" for part, mib in rel["released_by_part_mib"].items())
    release = [[label, mode, f"{rel['released_mib']['median']:.0f} ({parts})", f"{rel['rss_drop_mib']['median']:.0f}",
                _common.fmt_ratio(rel["rss_drop_vs_released"]), f"{rel['rss_back_mib']['median']:.0f}",
                f"{rel['release_seconds']['median']:.3f} / {rel['restore_seconds']['median']:.3f}", date]]
    teacher = [[label, mode, f"{name}, {report['teacher']['parameters'] / 1e6:.0f}M params",
                t["held_between_passes"], f"{t['swap_seconds']['median']:.3f}",
                _common.fmt_ratio(t["swap_vs_before"]), f"{t['ema_seconds']['median']:.3f}", date]
               for name, t in report["teacher"].items() if name != "parameters"]
    return {"memory_recompute": recompute, "memory_release": release, "memory_teacher": teacher}


HEADERS = {
    "memory_recompute": ["machine", "mode", "parallel.recompute", "peak MiB (median)", "peak / none", "s per pass",
                         "time / none (median, range)", "date"],
    "memory_release": ["machine", "mode", "released MiB (by part)", "VmRSS drop MiB (median)",
                       "drop / released (median, range)", "VmRSS back MiB", "s release / restore", "date"],
    "memory_teacher": ["machine", "mode", "teacher", "MiB held between passes (where)", "s swap in + back (median)",
                       "swap / before (median, range)", "s EMA update", "date"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat of each measurement")
    args = parser.parse_args()
    repeats = 1 if args.quick else 3
    mode = "quick" if args.quick else "full"
    report = {"machine": _common.machine(torch_threads=2), "date": _common.timestamp(), "mode": mode,
              "recompute": measure_recompute(repeats), "release": measure_release(repeats),
              "teacher": measure_teacher(3 * repeats)}
    path = _common.write_results("memory_knobs", report)
    for table, rows in _rows(report, mode).items():
        _common.update_readme_table(table, HEADERS[table], rows, key_columns=3)
        for row in rows:
            print(" | ".join(str(cell) for cell in row))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
