"""The RL loop: rollout -> reward -> teacher -> advantage -> train -> sync -> eval/save.

``train(cfg)`` is the whole training job (``megacredit train CONFIG``). Launch it with one
process on a laptop, ``torchrun --nproc_per_node N`` or ``srun`` for TP x PP x DP.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megacredit.trainer import builder, checkpointing
from megacredit.config import MegacreditConfig, save_config, validate_against_model
from megacredit.trainer.rl_step import run_step, trainer_memory_released
from megacredit.trainer.run import RLRun
from megacredit.trainer.rollout import PromptStream, step_seed
from megacredit.utils.malloc import PageFaultCheck
from megacredit.utils.preemption import PreemptionFlag


def validate(run: RLRun, val_records: list[dict], step: int, logger) -> None:
    """avg@k on the validation prompts (rank 0 evaluates; the others wait at the next collective,
    or, when the trainer's state is released for the engine, until rank 0 is done)."""
    from megacredit.trainer.validate import evaluate, validation_params

    with trainer_memory_released(run):
        if run.engine is None:
            return
        cfg = run.cfg
        records = val_records[: cfg.validation.num_prompts] if cfg.validation.num_prompts else val_records
        with run.phase("val"):
            result = evaluate(run.engine, run.tokenizer, run.env, records,
                              validation_params(cfg, run.tokenizer, step_seed(cfg.training.seed, step, 3)),
                              cfg.validation.bootstrap_samples, cfg.validation.confidence, seed=step,
                              progress=run.progress)
    logger.log(step, {**result, "perf/time_val": run.timings.pop("perf/time_val")})


def setup(cfg: MegacreditConfig) -> tuple[RLRun, list[dict], list[dict]]:
    """Start the parallel state and build every component of the run (each shown as a stage)."""
    from megacredit.megatron.distributed import initialize
    from megacredit.megatron.model_provider import choose_layer_spec
    from megacredit.utils.progress import make_progress_reporter

    train_records, val_records = builder.build_data(cfg)  # the cheap parts first: bad inputs fail in seconds
    env = builder.build_env(cfg)
    layer_spec = choose_layer_spec(builder.TRANSFORMER_ENGINE[cfg.model.transformer_engine])  # 'on' without TE fails
    ctx = initialize(cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size,
                     seed=cfg.training.seed, timeout_minutes=cfg.parallel.collective_timeout_minutes,
                     expert_model_parallel_size=cfg.parallel.expert_model_parallel_size)
    progress = make_progress_reporter(cfg.logging.progress, enabled=ctx.rank == 0,
                                      interval_s=cfg.logging.progress_interval_s)
    converted = " (converted from its GGUF once per cache dir)" if cfg.model.name_or_path == builder.BUILTIN_SMOLLM2 else ""
    with progress.stage(f"loading the model {cfg.model.name_or_path}{converted}"):
        source = builder.resolve_model(cfg)
    validate_against_model(cfg, source.hf_config)
    with progress.stage(f"building the Megatron model ({layer_spec}), loading its weights, building the optimizer"):
        actor = builder.build_actor(cfg, ctx, source, progress)
    with progress.stage(f"building the {cfg.rollout.engine} rollout engine"):
        engine = builder.build_engine(cfg, source, ctx)  # None on ranks without one
    run = RLRun(cfg, ctx, actor, engine, env, source.tokenizer, source.hf_config, progress=progress)
    return run, train_records, val_records


def train(cfg: MegacreditConfig) -> dict[str, Any]:
    """Run the configured job to ``training.steps``; returns the final logged metrics. A collective
    failed by a lost rank stops this one with one line (RunFault, exit 3: docs/reliability.md)."""
    from megacredit.megatron.distributed import lost_peer_fault
    from megacredit.reporting.metrics import MetricsLogger
    from megacredit.reporting.visualize import render_run
    from megacredit.trainer.weight_sync import sync_weights

    run, train_records, val_records = setup(cfg)
    logger, finished = None, False
    try:
        start_step, resumed = checkpointing.resume(run.actor, run.ctx, cfg, run.progress)
        sync_weights(run)  # the engine starts from the (loaded) policy: the same path as every step
        total = cfg.training.resolved_steps(len(train_records), cfg.data.prompts_per_step)
        if run.is_logger:
            logger = MetricsLogger.from_config(cfg, total, start_step or None, run.progress.console)
            save_config(cfg, Path(cfg.logging.run_dir) / "config.yaml")
        validate_first = resumed.get("validation_pending", start_step == 0 and cfg.validation.before_training)
        run_steps(run, train_records, val_records, start_step, total, logger, validate_first)
        finished = True
    except RuntimeError as error:
        fault = lost_peer_fault(error, run.ctx.rank, cfg.parallel.collective_timeout_minutes)
        if fault is None:
            raise
        raise fault from error
    finally:
        if run.engine is not None:
            run.engine.shutdown()  # engine processes / memory (remote servers are not ours: left running)
        if logger is not None and not finished:
            logger.close(print_summary=False)  # what was logged stays readable
    if logger is None:
        return {}
    logger.close()
    render_run(cfg.logging.run_dir)
    return dict(logger.history[-1][1]) if logger.history else {}


def run_steps(run: RLRun, train_records: list[dict], val_records: list[dict], start_step: int, total: int,
              logger, validate_first: bool) -> None:
    """Steps ``start_step`` .. ``total`` - 1, validation, checkpoints. SIGTERM/SIGUSR1: save at the
    end of the step and stop; a validation due then is skipped and runs first on resume."""
    cfg = run.cfg
    prompts = PromptStream(train_records, cfg.data.prompts_per_step, cfg.training.seed, cfg.data.shuffle)
    preemption = PreemptionFlag().install()
    page_faults = PageFaultCheck()  # does the malloc tuning help on this machine? (utils/malloc.py)
    try:
        if validate_first:
            validate(run, val_records, start_step, logger)
        for step in range(start_step, total):
            metrics = run_step(run, step, prompts.batch(step))
            metrics.update(page_faults.after_step())
            done = step + 1
            if logger is not None:
                logger.save_token_credit(done, metrics.pop("_token_credit", []))
                logger.log(done, metrics)
            last, every = done == total, cfg.validation.every_steps
            due = bool((every and done % every == 0 and not last) or (last and cfg.validation.after_training))
            preempted = preemption.on_any_rank()
            skipped = due and preempted
            if due and not preempted:
                validate(run, val_records, done, logger)
                preempted = preemption.on_any_rank()
            if preempted or (cfg.checkpoint.save_every and (done % cfg.checkpoint.save_every == 0 or last)):
                pending = " (preempted: its validation runs first on resume)" if skipped else ""
                with run.progress.stage(f"saving the checkpoint of step {done}{pending}"):
                    checkpointing.save(run.actor, run.ctx, cfg.checkpoint_dir(), done, cfg.checkpoint.keep_last,
                                       {"completed_steps": done, "validation_pending": skipped})
            if preempted:
                break
    finally:
        preemption.uninstall()
