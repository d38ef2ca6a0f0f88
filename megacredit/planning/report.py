"""``megacredit plan``: every rank's memory, whether it fits, and which knob to turn."""

from __future__ import annotations

from dataclasses import dataclass

from megacredit.config.parsing import ConfigError
from megacredit.config.schema import MegacreditConfig
from megacredit.planning.memory import GB, Layout, StagePlan, plan_stage
from megacredit.planning.shapes import ModelShape, model_shape


@dataclass
class Plan:
    layout: Layout
    gpu_bytes: float
    reserve_bytes: float
    offload_during_rollout: bool
    stages: list[StagePlan]
    shape: ModelShape

    @property
    def worst(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.training)

    def training_bytes(self) -> float:
        return self.worst.training + self.reserve_bytes

    def rollout_bytes(self) -> float:
        trainer = 0.0 if self.offload_during_rollout else self.worst.state
        return trainer + self.worst.terms["engine"] + self.reserve_bytes

    @property
    def fits(self) -> bool:
        return max(self.training_bytes(), self.rollout_bytes()) <= self.gpu_bytes


def make_plan(cfg: MegacreditConfig, gpus_per_node: int = 8, nodes: int = 1, gpu_mem_gb: float = 80.0,
              reserve_gb: float = 3.0, kernels: str = "fused", shape: ModelShape | None = None) -> Plan:
    """The plan of ``cfg`` on ``nodes`` x ``gpus_per_node`` GPUs of ``gpu_mem_gb`` each."""
    par, world = cfg.parallel, gpus_per_node * nodes
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    if world % (tp * pp):
        raise ConfigError(f"parallel: TP {tp} x PP {pp} does not divide the {world} GPUs "
                          f"(--gpus-per-node x --nodes); change the layout or the GPU count")
    shape = shape or model_shape(cfg)
    ep = par.expert_model_parallel_size
    if ep > 1 and (not shape.experts or shape.experts % ep or (world // pp) % ep):
        raise ConfigError(f"parallel.expert_model_parallel_size: EP {ep} must divide the model's "
                          f"{shape.experts} experts and the {world // pp} GPUs of a pipeline stage; change EP")
    layout, gpu_bytes = Layout(tp, pp, world // (tp * pp), ep), gpu_mem_gb * GB
    stages = [plan_stage(cfg, shape, layout, s, kernels, gpu_bytes) for s in range(pp)]
    return Plan(layout, gpu_bytes, reserve_gb * GB, cfg.rollout.offload_trainer_during_rollout, stages, shape)


def knobs(cfg: MegacreditConfig, plan: Plan) -> list[str]:
    """The settings that would bring the plan within the GPU, each with what it saves."""
    worst, found = plan.worst, []
    over_training = plan.training_bytes() - plan.gpu_bytes
    if over_training > 0:
        if cfg.parallel.recompute != "full":
            found.append("parallel.recompute=full (keeps each layer's input only)")
        if not cfg.optimizer.use_distributed_optimizer and plan.layout.dp > 1:
            saved = worst.terms["optimizer"] * (1 - 1 / plan.layout.dp)
            found.append(f"optimizer.use_distributed_optimizer=true (saves {saved / GB:.1f} GB)")
        if worst.terms["teacher"]:
            found.append(f"algorithm.teacher.offload_to_host=true (saves {worst.terms['teacher'] / GB:.1f} GB)")
        tokens = cfg.parallel.micro_batch_tokens
        room = plan.gpu_bytes - (plan.training_bytes() - worst.terms["activations"])
        if worst.terms["activations"] > 0 and room > 0:
            found.append(f"parallel.micro_batch_tokens<={int(tokens * room / worst.terms['activations'])}")
        if plan.shape.experts:  # experts are split over EP only; their Adam state over TP x DP / EP ranks
            found.append("more GPUs per pipeline stage, with a larger parallel.expert_model_parallel_size or "
                         "optimizer.use_distributed_optimizer=true (the experts are not split over TP)")
        found.append("a larger parallel.tensor_model_parallel_size or pipeline_model_parallel_size (or more GPUs)")
    if plan.rollout_bytes() > plan.gpu_bytes:
        if not plan.offload_during_rollout:
            found.append(f"rollout.offload_trainer_during_rollout=true (frees {worst.state / GB:.1f} GB while the engine generates)")
        found.append("a lower rollout.gpu_memory_utilization")
    return found


def render(cfg: MegacreditConfig, plan: Plan) -> str:
    """The plan as a table in GB, one column per pipeline stage, then the verdict and the knobs."""
    lay = plan.layout
    lines = [f"layout: TP {lay.tp} x PP {lay.pp} x DP {lay.dp}{f' (EP {lay.ep})' if lay.ep > 1 else ''}, "
             f"{plan.gpu_bytes / GB:.0f} GB per GPU "
             f"(GB = 1e9 bytes; per rank of each pipeline stage)",
             "term".ljust(28) + "".join(f"stage {s.stage}".rjust(12) for s in plan.stages),
             "parameters (millions)".ljust(28) + "".join(f"{s.parameters / 1e6:12.1f}" for s in plan.stages)]
    for term in plan.stages[0].terms:
        lines.append(term.ljust(28) + "".join(f"{s.terms[term] / GB:12.2f}" for s in plan.stages))
    lines.append("training (+ reserve)".ljust(28) + "".join(
        f"{(s.training + plan.reserve_bytes) / GB:12.2f}" for s in plan.stages))
    lines.append(f"while the engine generates: {plan.rollout_bytes() / GB:.2f} GB "
                 f"({'trainer released' if plan.offload_during_rollout else 'trainer state kept'})")
    lines.append(f"reserve (CUDA context, NCCL, fragmentation): {plan.reserve_bytes / GB:.1f} GB")
    lines.append("fits" if plan.fits else "DOES NOT FIT; turn: " + "; ".join(knobs(cfg, plan)))
    return "\n".join(lines)
