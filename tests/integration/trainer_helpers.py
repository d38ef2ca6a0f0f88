"""Shared pieces of the trainer's end-to-end tests: a tiny-model config and a runner."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from megacredit.envs.base import EnvResult, Environment

METHODS = ("grpo", "sdpo", "credit", "rlsd", "credit_rlsd", "opsd")


class ParityEnv(Environment):
    """A reward a random tiny model earns about half the time (an even number of characters),
    so group advantages are non-zero; the feedback gives the arithmetic answer, as the real
    environment does, so the teacher context differs from the student's."""

    name = "parity"

    def evaluate(self, record, response, split="train"):
        return EnvResult(float(len(response) % 2 == 0), f"The correct answer is {record['answer']}.")


class SignalledParityEnv(ParityEnv):
    """ParityEnv that sends SIGTERM to its own process while it scores the batch named by the
    environment variable MEGACREDIT_TEST_SIGTERM_AT ("train:2": step 2's rollouts; "val:1": the
    first validation), so a preemption lands at a known point of the loop; a signal sent from
    outside races the steps (a tiny step can end before it arrives). Unset: plain ParityEnv."""

    batches_scored: dict[str, int] = {}  # per process: split -> batches scored so far

    def evaluate_batch(self, records, responses, split="train", max_workers=2):
        self.batches_scored[split] = self.batches_scored.get(split, 0) + 1
        if os.environ.get("MEGACREDIT_TEST_SIGTERM_AT") == f"{split}:{self.batches_scored[split]}":
            os.kill(os.getpid(), signal.SIGTERM)
        return super().evaluate_batch(records, responses, split, max_workers)


def tiny_overrides(method: str, run_dir: Path, steps: int = 3, **extra) -> list[str]:
    """A 2-layer random model (SmolLM2 tokenizer) on 1-digit arithmetic: seconds per step."""
    overrides = {
        "model.name_or_path": "tiny",
        "model.tiny.hidden_size": 64,
        "model.tiny.num_hidden_layers": 2,
        "algorithm.name": method,
        "algorithm.group_size": 2,
        "rollout.max_new_tokens": 5,
        "rollout.temperature": 1.0,
        "rollout.max_seq_len": 256,
        "env.name": "trainer_helpers:ParityEnv",
        "data.num_generated_train": 32,
        "data.num_generated_val": 4,
        "data.generator_kwargs": "{difficulty: 1d+1d}",
        "data.prompts_per_step": 4,
        "training.steps": steps,
        "training.ppo_mini_batch_size": 2,
        "training.seed": 7,
        "optimizer.lr": 1e-3,
        "optimizer.clip_grad": 1.0,
        "parallel.micro_batch_tokens": 512,
        "validation.before_training": False,
        "validation.after_training": False,
        "validation.every_steps": 0,
        "logging.run_dir": str(run_dir),
        "logging.tensorboard": False,
        "logging.console": False,
        "checkpoint.save_every": 0,
        "checkpoint.resume": "none",
    }
    if method in ("sdpo", "credit", "opsd"):
        overrides["algorithm.sdpo.top_k"] = 8
    if method != "grpo":
        overrides["algorithm.teacher.kind"] = "ema"
        overrides["algorithm.teacher.ema_rate"] = 0.5
    if method in ("rlsd", "credit_rlsd"):
        overrides["algorithm.rlsd.lam.steps"] = 2
    overrides.update(extra)
    return [f"{key}={value}" for key, value in overrides.items()]


def read_losses(run_dir: Path) -> dict[int, dict[str, float]]:
    """step -> the step's logged metrics (training steps only)."""
    records = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/loss" in record:
            records[record["step"]] = record
    return records


def train_runs(rank, world_size, runs: list[tuple[str, list[str]]]) -> dict[str, dict]:
    """Train each (name, overrides) config in turn in this process group; rank 0 returns the
    logged metrics of each run."""
    from megacredit.config import load_config
    from megacredit.trainer.loop import train

    results = {}
    for name, overrides in runs:
        cfg = load_config(None, overrides)
        train(cfg)
        if rank == 0:
            results[name] = read_losses(Path(cfg.logging.run_dir))
    return results


def train_and_read_records(rank, world_size, overrides: list[str]) -> list[dict]:
    """Train one config (``overrides`` on the defaults) in this process group; returns every
    record of its metrics.jsonl (training steps, validation, ...)."""
    from megacredit.config import load_config
    from megacredit.trainer.loop import train

    cfg = load_config(None, overrides)
    train(cfg)
    return [json.loads(line) for line in (Path(cfg.logging.run_dir) / "metrics.jsonl").read_text().splitlines()]
