"""Memory per GPU of a run's layout: the arithmetic behind ``megacredit plan``.

Per rank (one TP x PP shard; the most loaded pipeline stage is reported), in bytes:

- weights: the stage's parameters in ``model.dtype``;
- gradients: Megatron DDP's fp32 gradient buffer (``grad_reduce_in_fp32``), 4 B per parameter;
- optimizer: Adam's two fp32 moments, plus fp32 main weights when the model is not fp32
  (12 B or 8 B per parameter), divided by DP with ``optimizer.use_distributed_optimizer``;
- teacher: the lean EMA teacher's one fp32 copy (4 B per parameter) for methods with a teacher
  pass, 0 with ``algorithm.teacher.offload_to_host`` (megacredit/megatron/teacher.py);
- activations: what a training pass keeps for the backward of ``parallel.micro_batch_tokens``
  tokens (:func:`activation_elements_per_token`) x the stage's layers x the micro-batches in
  flight (1F1B: PP - stage), under ``parallel.recompute``, plus one layer's backward working set;
- head: the chunked vocab-parallel top-K head's live [rows, V/TP] fp32 chunks (three of them);
- engine: the colocated engine's ``gpu_memory_utilization`` share, while it generates (it sleeps
  during training); with ``rollout.offload_trainer_during_rollout`` the trainer holds nothing then.

Parameter counts follow Megatron-LM's ``compute_weight_and_optimizer_memory``
(NVIDIA/Megatron-LM, megatron/training/theoretical_memory_usage.py) and add what it leaves out
(QK-norm, QKV bias, the tied embedding's copy on the last stage, the MoE router, the split of the
experts over EP, which it does not make); tests/unit/test_planning.py compares both. Activations
follow Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models"
(section 4), counted per tensor for two kernel sets, see
:data:`KERNEL_SETS`. Not counted: CUDA context, NCCL buffers, fragmentation (``reserve_bytes``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from megacredit.algorithms.methods import get_method
from megacredit.algorithms.topk_fused import DEFAULT_CHUNK_BYTES
from megacredit.config.schema import MegacreditConfig
from megacredit.planning.shapes import ModelShape

GB = 1e9
VOCAB_DIVISIBLE_BY = 128
"""Megatron's make_vocab_size_divisible_by (megacredit.megatron.model_provider.padded_vocab_size)."""
HEAD_LIVE_CHUNKS = 3
"""Logits, their exponentials and their gradient: the head's [rows, V/TP] fp32 tensors alive at once."""
KERNEL_SETS = ("fused", "cpu")
"""``fused``: Transformer Engine on a GPU (norm fused into the next linear, fused attention that
keeps q, k, v, its output and the softmax statistics, fused SwiGLU); UNVERIFIED here (no GPU).
``cpu``: Megatron-Core's local spec with torch kernels as megacredit runs it on a CPU (each
RMSNorm keeps its input, the normalised tensor and its output; the packed attention keeps padded
q, k, v and output; SwiGLU keeps fc1's output and three [T, F] tensors), counted from the
tensors autograd saves and checked against measured peaks (tests/distributed/test_plan_measured.py)."""


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    ep: int = 1

    @property
    def expert_dp(self) -> int:
        """Ranks of a stage that hold the same experts: EP is folded over the stage's TP x DP
        ranks and experts are not split over TP (megacredit/megatron/moe.py)."""
        return self.tp * self.dp // self.ep


@dataclass
class StagePlan:
    """Bytes on one rank of pipeline stage ``stage``."""

    stage: int
    parameters: int
    terms: dict[str, float] = field(default_factory=dict)

    @property
    def training(self) -> float:
        return sum(v for k, v in self.terms.items() if k != "engine")

    @property
    def state(self) -> float:
        return sum(self.terms[k] for k in ("weights", "gradients", "optimizer", "teacher"))


def padded_vocab(vocab: int, tp: int) -> int:
    multiple = VOCAB_DIVISIBLE_BY * tp
    return math.ceil(vocab / multiple) * multiple


def layer_parameters(shape: ModelShape, tp: int, ep: int = 1) -> tuple[int, int, int]:
    """(TP-sharded, replicated, expert) parameters of one transformer layer on one rank: experts
    are split over EP only, the router is replicated (Megatron's ``TopKRouter``)."""
    qkv_out = (shape.heads + 2 * shape.kv_heads) * shape.head_dim
    sharded = (shape.hidden * qkv_out + (qkv_out if shape.qkv_bias else 0) + shape.heads * shape.head_dim * shape.hidden
               + ((shape.heads + shape.kv_heads) * shape.head_dim if shape.qk_norm == "projection" else 0))
    replicated = 2 * shape.hidden + (2 * shape.head_dim if shape.qk_norm == "per_head" else 0)
    if shape.experts:
        experts = shape.experts // ep * 3 * shape.hidden * shape.expert_ffn
        return sharded // tp, replicated + shape.hidden * shape.experts, experts
    return (sharded + 3 * shape.hidden * shape.ffn) // tp, replicated, 0


def stage_parameters(shape: ModelShape, tp: int, pp: int, stage: int, ep: int = 1) -> int:
    """Parameters on one rank of pipeline stage ``stage``."""
    count = (shape.layers // pp) * sum(layer_parameters(shape, tp, ep))
    embedding = padded_vocab(shape.vocab, tp) * shape.hidden // tp
    if stage == 0:
        count += embedding
    if stage == pp - 1:
        count += shape.hidden  # final norm
        if not shape.tied or pp > 1:  # the output layer, or the tied embedding's copy on the last stage
            count += embedding
    return count


def stage_expert_parameters(shape: ModelShape, pp: int, ep: int) -> int:
    """The experts' share of :func:`stage_parameters` (the distributed optimizer shards it over
    :attr:`Layout.expert_dp`, the rest over DP)."""
    return (shape.layers // pp) * layer_parameters(shape, 1, ep)[2]


def activation_elements_per_token(shape: ModelShape, tp: int, sp: bool, kernels: str,
                                  selective: tuple[str, ...] = ()) -> float:
    """Elements one layer keeps per token for its backward (module docstring); ``selective``:
    the modules recomputed (core_attn, mlp) instead of kept."""
    h, s = shape.hidden, (tp if sp else 1)
    q, kv = shape.heads * shape.head_dim / tp, shape.kv_heads * shape.head_dim / tp
    if kernels == "fused":
        attention_norm, qkv, core_attn, mlp_norm, mlp = 2 * h / s, q + 2 * kv, 0.0, h / s, h / s + 3 * shape.ffn / tp
    elif kernels == "cpu":
        attention_norm, qkv, mlp_norm = (3 * h + 1) / s, 0.0, (2 * h + 1) / s
        core_attn, mlp = 2 * q + 2 * kv + shape.heads / tp, h / s + 5 * shape.ffn / tp
    else:
        raise ValueError(f"kernels must be one of {KERNEL_SETS}, got {kernels!r}")
    if "core_attn" in selective:  # the checkpoint keeps its inputs q, k, v
        core_attn = q + 2 * kv if kernels == "cpu" else core_attn
    if shape.experts:
        mlp = h / s + moe_elements_per_token(shape, kernels) / s
    if "mlp" in selective:  # the checkpoint keeps the MLP's input
        mlp = h / s
    return attention_norm + qkv + core_attn + q + mlp_norm + mlp  # q: the output projection's input


def moe_elements_per_token(shape: ModelShape, kernels: str) -> float:
    """What a MoE MLP keeps per token beyond its input (which the router reads): the router's
    logits and probabilities (``experts`` each), and for each of the ``experts_per_token`` copies
    of the token the dispatched input and the weighted expert output (``hidden`` each) and the
    expert's SwiGLU tensors (as the dense MLP's, of ``expert_ffn``). Assumes balanced routing: a
    rank's experts see its tokens x top-k (an unbalanced router gives some ranks more)."""
    swiglu = (3 if kernels == "fused" else 5) * shape.expert_ffn
    return 2 * shape.experts + shape.experts_per_token * (2 * shape.hidden + swiglu)


def activation_bytes(cfg: MegacreditConfig, shape: ModelShape, layout: Layout, stage: int, kernels: str,
                     element_bytes: int) -> float:
    """What a training pass keeps on stage ``stage`` (micro-batches in flight included), plus
    the recomputed unit alive during its backward and the backward's working set: the gradients
    of one layer's kept tensors, about as large as they are (measured: without it the plan read
    16-18 % low at TP 2 and PP 2, tests/distributed/test_plan_measured.py)."""
    par = cfg.parallel
    layers, tokens = shape.layers // layout.pp, par.micro_batch_tokens
    selective = tuple(par.recompute_modules) if par.recompute == "selective" else ()
    per_layer = activation_elements_per_token(shape, layout.tp, par.sequence_parallel, kernels, selective)
    layer_input = shape.hidden / (layout.tp if par.sequence_parallel else 1)
    if par.recompute == "full" and par.recompute_method == "uniform":
        n = par.recompute_num_layers
        kept, alive = math.ceil(layers / n) * layer_input, n * per_layer
    elif par.recompute == "full":  # block: the first n layers of the stage keep their input only
        n = min(par.recompute_num_layers, layers)
        kept, alive = n * layer_input + (layers - n) * per_layer, per_layer
    else:
        kept, alive = layers * per_layer, 0.0
    in_flight = layout.pp - stage
    return (in_flight * kept + alive + per_layer) * tokens * element_bytes


def plan_stage(cfg: MegacreditConfig, shape: ModelShape, layout: Layout, stage: int, kernels: str,
               gpu_bytes: float) -> StagePlan:
    """Every term of :class:`StagePlan` for stage ``stage``."""
    n = stage_parameters(shape, layout.tp, layout.pp, stage, layout.ep)
    element_bytes = 4 if cfg.model.dtype == "float32" else 2
    optimizer = (8 + (0 if element_bytes == 4 else 4)) * n
    if cfg.optimizer.use_distributed_optimizer:
        experts = stage_expert_parameters(shape, layout.pp, layout.ep)
        optimizer *= ((n - experts) / layout.dp + experts / layout.expert_dp) / n
    has_teacher = get_method(cfg.algorithm.name).teacher_pass and not cfg.algorithm.teacher.offload_to_host
    vocab_local = padded_vocab(shape.vocab, layout.tp) // layout.tp
    rows = max(16, min(1024, DEFAULT_CHUNK_BYTES // (vocab_local * 4)))
    colocated = cfg.rollout.placement == "colocated" and cfg.rollout.engine != "embedded"
    return StagePlan(stage, n, {
        "weights": element_bytes * n, "gradients": 4 * n, "optimizer": optimizer,
        "teacher": 4 * n if has_teacher else 0,
        "activations": activation_bytes(cfg, shape, layout, stage, kernels, element_bytes),
        "head": HEAD_LIVE_CHUNKS * rows * vocab_local * 4 if stage == layout.pp - 1 else 0,
        "engine": cfg.rollout.gpu_memory_utilization * gpu_bytes if colocated else 0})
