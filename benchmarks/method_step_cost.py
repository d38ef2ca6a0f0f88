"""Per-step cost of each method on the same model, data and seed (the CREDIT paper's Table 2 layout).

What is measured: one training step (``megacredit.trainer.rl_step.run_step``) of GRPO, SDPO,
CREDIT with C = 1, 2 and 8 contrastive prompts, RLSD and the hybrid credit_rlsd, on the demo's
setting (SmolLM2-135M-Instruct fp32, one-digit additions, 8 prompts x 4 rollouts, 16 new
tokens; examples/credit_smollm2_arithmetic.yaml). One process holds one actor (model, optimizer,
teacher) and the rollout engine; each method gets its own resolved config and the actor's
objective settings and teacher rule for it (GRPO: no teacher). The learning rate is set to 0, so the
weights never change and every step of every method starts from the same weights, draws the
same prompts and, with the same rollout seed, the same responses: the methods differ only in
what they compute. Every method's step runs once unmeasured, then the methods are interleaved
(the order rotates each repeat).

Reported per method: median seconds of the step and of each phase (rollout, reward, teacher
contexts + passes, train, sync), of each pass (old-policy forward -- skipped in these fully
on-policy steps --, teacher + contrastive forward, training forward + backward + optimizer), the
tokens of each pass, and each ratio to SDPO next to the ratio the token counts predict: passes
cost ~ forward tokens + 3 x training tokens (a backward costs about two forwards), rollout and
reward identical for all methods.

Run: ``.venv/bin/python benchmarks/method_step_cost.py [--quick] [--repeats N]``; writes
benchmarks/results/method_step_cost.json and the ``method_step_cost`` table of
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

METHODS = {  # label: config overrides (algorithm.name first)
    "grpo": ["algorithm.name=grpo"],
    "sdpo": ["algorithm.name=sdpo"],
    "credit C=1": ["algorithm.name=credit", "algorithm.credit.num_contrastive=1"],
    "credit C=2": ["algorithm.name=credit", "algorithm.credit.num_contrastive=2"],
    "credit C=8": ["algorithm.name=credit", "algorithm.credit.num_contrastive=8"],
    "rlsd": ["algorithm.name=rlsd"],
    "credit_rlsd": ["algorithm.name=credit_rlsd", "algorithm.credit.num_contrastive=1"],
}
CONFIG = "examples/credit_smollm2_arithmetic.yaml"
COMMON = ["validation.before_training=false", "validation.after_training=false",
          "validation.every_steps=0", "logging.tensorboard=false", "logging.console=false"]
PHASES = ("rollout", "reward", "teacher", "train", "sync")
PASSES = ("old_policy", "teacher", "train")


class PassRecorder:
    """Wraps the actor's pass methods to time them and count their tokens."""

    def __init__(self, actor) -> None:
        self.seconds: dict[str, float] = {}
        self.tokens: dict[str, int] = {}
        for name, method in (("old_policy", "old_policy_pass"), ("teacher", "teacher_pass"),
                             ("train", "train_mini_batch")):
            setattr(actor, method, self._wrap(name, getattr(actor, method)))

    def reset(self) -> None:
        self.seconds = dict.fromkeys(PASSES, 0.0)
        self.tokens = {"old_policy": 0, "teacher": 0, "contrastive": 0, "train": 0}

    def _wrap(self, name, method):
        def timed(*args, **kwargs):
            self._count(name, args)
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start

        return timed

    def _count(self, name, args) -> None:
        if name == "old_policy":
            self.tokens["old_policy"] += sum(len(s.student_ids) for s in args[0].values())
        elif name == "teacher":
            self.tokens["teacher"] += sum(len(s.teacher_ids) for s in args[0].values())
            self.tokens["contrastive"] += sum(len(c) for s in args[0].values() for c in s.contrastive_ids)
        else:
            mini_batch, samples = args[0], args[1]
            self.tokens["train"] += sum(len(samples[i].student_ids) for i in mini_batch)


def predicted_units(tokens: dict[str, int]) -> float:
    """Pass cost in forward-token units: forward passes 1 per token, training 3 per token."""
    return tokens["old_policy"] + tokens["teacher"] + tokens["contrastive"] + 3 * tokens["train"]


def build(quick: bool):
    from megacredit.config import load_config
    from megacredit.trainer.loop import setup
    from megacredit.trainer.rl_step import sync_weights
    from megacredit.trainer.rollout import PromptStream

    size = ["data.prompts_per_step=4", "training.ppo_mini_batch_size=4"] if quick else []
    configs = {label: load_config(str(_common.REPO / CONFIG), [*overrides, *COMMON, *size])
               for label, overrides in METHODS.items()}
    for cfg in configs.values():
        cfg.optimizer.lr = 0.0  # after validation (which asks for > 0): weights never change
    run, train_records, _ = setup(configs["credit C=8"])  # builds the actor with a teacher
    sync_weights(run)
    prompts = PromptStream(train_records, run.cfg.data.prompts_per_step, run.cfg.training.seed,
                           run.cfg.data.shuffle).batch(0)
    return run, configs, prompts


def step_of(run, cfg, prompts, recorder: PassRecorder, teacher) -> dict:
    """One step of ``cfg``'s method on the shared actor; returns its timings and token counts."""
    from megacredit.trainer.builder import objective_settings
    from megacredit.trainer.rl_step import run_step

    actor = run.actor
    actor.settings = dataclasses.replace(actor.settings, objective=objective_settings(cfg),
                                         top_k=cfg.algorithm.sdpo.top_k, topk_source=cfg.algorithm.sdpo.topk_source)
    actor.teacher = None if cfg.algorithm.name == "grpo" else teacher
    if teacher is not None:
        teacher.kind, teacher.ema_rate = cfg.algorithm.teacher.kind, cfg.algorithm.teacher.ema_rate
        teacher.sync_every = cfg.algorithm.teacher.sync_every
    run.cfg = cfg
    recorder.reset()
    metrics = run_step(run, 0, prompts)
    return {"step": metrics["perf/time_step"], "loss": metrics.get("train/loss"),
            **{f"phase/{p}": metrics.get(f"perf/time_{p}", 0.0) for p in PHASES},
            **{f"pass/{p}": recorder.seconds[p] for p in PASSES}, "tokens": dict(recorder.tokens)}


def summarise(samples: dict[str, list[dict]]) -> dict:
    out = {}
    for label, runs in samples.items():
        keys = [k for k in runs[0] if k not in ("tokens", "loss")]
        out[label] = {k: _common.spread([r[k] for r in runs]) for k in keys}
        out[label]["tokens"] = runs[0]["tokens"]
        out[label]["predicted_units"] = predicted_units(runs[0]["tokens"])
        out[label]["passes_seconds"] = _common.spread([r["phase/teacher"] + r["phase/train"] for r in runs])
    sdpo_runs, sdpo_units = samples["sdpo"], out["sdpo"]["predicted_units"]
    for label, runs in samples.items():
        out[label]["step_ratio_to_sdpo"] = _common.ratio_spread([r["step"] for r in runs], [r["step"] for r in sdpo_runs])
        out[label]["passes_ratio_to_sdpo"] = _common.ratio_spread(
            [r["phase/teacher"] + r["phase/train"] for r in runs],
            [r["phase/teacher"] + r["phase/train"] for r in sdpo_runs])
        out[label]["predicted_passes_ratio_to_sdpo"] = out[label]["predicted_units"] / sdpo_units
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 prompts per step, 2 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3, quick 2)")
    args = parser.parse_args()
    from megacredit.utils.malloc import tune_glibc_malloc

    tune_glibc_malloc()  # as `megacredit train` does
    repeats = args.repeats or (2 if args.quick else 3)
    run, configs, prompts = build(args.quick)
    recorder, teacher = PassRecorder(run.actor), run.actor.teacher
    for label, cfg in configs.items():  # unmeasured warm-up of every method
        step_of(run, cfg, prompts, recorder, teacher)
    labels = list(configs)
    samples: dict[str, list[dict]] = {label: [] for label in labels}
    for repeat in range(repeats):
        order = labels[repeat % len(labels):] + labels[:repeat % len(labels)]
        for label in order:
            samples[label].append(step_of(run, configs[label], prompts, recorder, teacher))
        print(f"repeat {repeat + 1}/{repeats}:", {k: round(v[-1]["step"], 1) for k, v in samples.items()}, flush=True)
    summary = summarise(samples)
    info = _common.machine()
    mode = "quick" if args.quick else "full"
    report = {"description": __doc__.split("\n\n")[1].replace("\n", " "), "mode": mode, "repeats": repeats,
              "config": CONFIG, "overrides": COMMON, "methods": summary, "machine": info,
              "date": _common.timestamp()}
    path = _common.write_results("method_step_cost", report)
    rows = []
    for label, m in summary.items():
        tokens = m["tokens"]
        rows.append([_common.machine_label(info), mode, label, f"{m['step']['median']:.1f}",
                     _common.fmt_ratio(m["step_ratio_to_sdpo"]), f"{m['passes_seconds']['median']:.1f}",
                     _common.fmt_ratio(m["passes_ratio_to_sdpo"]), f"{m['predicted_passes_ratio_to_sdpo']:.2f}x",
                     " / ".join(f"{m[f'pass/{p}']['median']:.1f}" for p in PASSES),
                     f"{tokens['old_policy']} / {tokens['teacher']} / {tokens['contrastive']} / {tokens['train']}",
                     _common.timestamp()])
    header = ["machine", "mode", "method", "s/step", "step / SDPO", "passes s", "passes / SDPO",
              "predicted passes / SDPO (tokens)", "s old-policy / teacher+contrastive / train",
              "tokens old-policy / teacher / contrastive / train", "date"]
    _common.update_readme_table("method_step_cost", header, rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
