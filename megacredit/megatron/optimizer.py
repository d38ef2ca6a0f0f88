"""Megatron DDP wrapping and the Megatron optimizer (Adam) for GPTModel chunks.

``wrap_with_ddp`` puts each model chunk in ``megatron.core.distributed.DistributedDataParallel``
(contiguous fp32 grad buffers, synchronous grad reduction) and registers the hooks the pipeline
schedule needs on the model config (``finalize_model_grads_func``: DP all-reduce, tied-embedding
all-reduce across PP stages; ``no_sync_func``). ``build_optimizer`` calls Megatron's
``get_megatron_optimizer`` with an Adam :class:`OptimizerSettings` (optionally the distributed
optimizer, ZeRO-1). Both run unchanged on GPU; on CPU they need the compatibility layer (``megacredit.megatron.distributed.initialize`` turns it
on), which also makes ``clip_grad > 0`` work.

Gradient scaling convention (see ``megacredit.megatron.rl_passes``): Megatron DDP AVERAGES
gradients over data-parallel ranks (``gradient_scaling_factor = 1/dp``) unless the model config
has ``calculate_per_token_loss=True``. ``rl_passes.run_packed_schedule(..., dp_size=...)``
compensates for it, so a callback that returns additive shares of the global loss yields the
full-batch gradient.

Typical step::

    chunks = wrap_with_ddp(build_gpt_model(...))
    optimizer = build_optimizer(chunks, OptimizerSettings(lr=1e-6, clip_grad=1.0))
    zero_grads(chunks, optimizer)
    run_packed_schedule(chunks, micro_batches, loss_callback, forward_only=False, dp_size=ctx.dp_size)
    result = optimizer_step(optimizer)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from megacredit.megatron import cpu_compat


@dataclass(frozen=True)
class OptimizerSettings:
    """Adam(W) settings handed to Megatron's ``OptimizerConfig``."""

    lr: float = 1e-6
    """Learning rate (constant; a scheduler may change ``param_groups[*]['lr']`` later)."""
    adam_beta1: float = 0.9
    """Adam first-moment decay."""
    adam_beta2: float = 0.999
    """Adam second-moment decay."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW) of matrices; biases and 1-D params (norms) get none."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (over all TP/PP/DP shards); 0 disables clipping."""
    use_distributed_optimizer: bool = False
    """Shard the fp32 main weights and Adam moments over the data-parallel ranks (Megatron's
    DistributedOptimizer, ZeRO-1); on CPU through fixes 6 and 7 of megacredit.megatron.cpu_compat."""
    bf16: bool = False
    """Model parameters are bf16 (fp32 main params and grads are kept by the optimizer)."""
    fp16: bool = False
    """Model parameters are fp16 (dynamic loss scaling; GPU only in practice)."""

    def __post_init__(self) -> None:
        if self.lr < 0:
            raise ValueError(f"OptimizerSettings.lr must be >= 0, got {self.lr}")
        if self.clip_grad < 0:
            raise ValueError(f"OptimizerSettings.clip_grad must be >= 0 (0 disables), got {self.clip_grad}")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"OptimizerSettings.{name} must be in [0, 1), got {value}")
        if self.bf16 and self.fp16:
            raise ValueError("OptimizerSettings: set at most one of bf16 and fp16")


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step reports."""

    success: bool
    """False when the step was skipped (fp16 loss-scale overflow or a non-finite grad norm)."""
    grad_norm: float | None
    """Global L2 norm of the gradients before clipping (None if not computed)."""
    num_zeros_in_grad: int | None
    """Zero gradient entries (only when Megatron's ``log_num_zeros_in_grad`` is on)."""


def _model_config(model_chunks: Sequence[torch.nn.Module]):
    from megatron.core.utils import get_model_config

    return get_model_config(model_chunks[0])


def wrap_with_ddp(
    model_chunks: torch.nn.Module | Sequence[torch.nn.Module],
    use_distributed_optimizer: bool = False,
    grad_reduce_in_fp32: bool = True,
    bucket_size: int | None = None,
    broadcast_params: bool = True,
) -> list[torch.nn.Module]:
    """Wrap every chunk in Megatron's DistributedDataParallel; return the wrapped chunks.

    Args:
        model_chunks: a GPTModel or the list of this rank's chunks (one per virtual stage).
        use_distributed_optimizer: must match ``OptimizerSettings.use_distributed_optimizer``.
        grad_reduce_in_fp32: accumulate and reduce grads in fp32 (keep True for bf16 models).
        bucket_size: grad-reduction bucket size in elements (None = Megatron's default).
        broadcast_params: copy DP rank 0's parameters to the other DP ranks, so replicas start
            identical even if they were initialised differently.

    Also sets ``finalize_model_grads_func`` (DP reduce + tied-embedding/layernorm reduces) and
    ``no_sync_func`` on the shared model config; the schedule calls them.

    With the distributed optimizer the parameters live in DDP's contiguous buffers and each
    rank updates its shard only; ``overlap_param_gather=False`` makes every optimizer step end
    with the synchronous all-gather of the updated shards (``DistributedOptimizer.
    step_with_ready_grads`` -> ``start_param_sync``), so whatever reads the parameters after a
    step (the passes, the weight sync's export, a checkpoint) sees the whole updated weights.
    """
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    chunks = [model_chunks] if isinstance(model_chunks, torch.nn.Module) else list(model_chunks)
    if not chunks:
        raise ValueError("wrap_with_ddp: model_chunks is empty; pass the GPTModel chunk(s) of this rank")
    config = _model_config(chunks)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        overlap_grad_reduce=False,
        overlap_param_gather=False,
        use_distributed_optimizer=use_distributed_optimizer,
        bucket_size=bucket_size,
    )
    wrapped = [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]
    if broadcast_params:
        for chunk in wrapped:
            chunk.broadcast_params()
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = wrapped[0].no_sync if len(wrapped) == 1 else [c.no_sync for c in wrapped]
    return wrapped


def build_optimizer(model_chunks: Sequence[torch.nn.Module], settings: OptimizerSettings):
    """Megatron's optimizer (Adam) over DDP-wrapped ``model_chunks`` (from :func:`wrap_with_ddp`).

    Returns a ``MegatronOptimizer`` (a ``ChainedOptimizer`` in 0.16). For fp16 the loss scaler is
    registered as the config's ``grad_scale_func`` so the schedule scales the loss.

    The distributed optimizer (``use_distributed_optimizer=True``) needs chunks wrapped with the
    same flag. Megatron-Core 0.16's accepts only ``torch.cuda.*Tensor`` parameters and its
    checkpoint load trips over torch AdamW's per-parameter ``step``: the CPU compatibility
    layer fixes both (cpu_compat fixes 6 and 7), so it runs here on gloo
    (tests/distributed/test_distributed_optimizer.py).
    """
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import (
        OptimizerConfig,
        get_megatron_optimizer,
        get_standard_config_overrides,
    )

    chunks = list(model_chunks)
    not_wrapped = [type(c).__name__ for c in chunks if not isinstance(c, DistributedDataParallel)]
    if not_wrapped:
        raise TypeError(f"build_optimizer needs DDP-wrapped chunks (call wrap_with_ddp first), got {not_wrapped}")
    ddp_sharded = chunks[0].ddp_config.use_distributed_optimizer
    if ddp_sharded != settings.use_distributed_optimizer:
        raise ValueError(
            f"OptimizerSettings.use_distributed_optimizer={settings.use_distributed_optimizer} but the "
            f"chunks were wrapped with use_distributed_optimizer={ddp_sharded}; pass the same value to both"
        )
    model_config = _model_config(chunks)
    megatron_config = OptimizerConfig(
        optimizer="adam",
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1,
        adam_beta2=settings.adam_beta2,
        adam_eps=settings.adam_eps,
        clip_grad=settings.clip_grad,
        use_distributed_optimizer=settings.use_distributed_optimizer,
        bf16=settings.bf16,
        fp16=settings.fp16,
        params_dtype=model_config.params_dtype,
    )
    # On CPU megacredit does not create Megatron's extra gloo groups (the main groups are gloo).
    # Megatron's standard parameter groups (megatron/core/optimizer/__init__.py::
    # get_standard_config_overrides): no weight decay on biases and 1-D parameters (norm
    # weights); without these overrides 0.16 decays every parameter.
    optimizer = get_megatron_optimizer(
        megatron_config, chunks,
        config_overrides=get_standard_config_overrides(megatron_config),
        use_gloo_process_groups=cpu_compat.cuda_available(),
    )
    if settings.fp16:
        model_config.grad_scale_func = optimizer.scale_loss
    set_learning_rate(optimizer, settings.lr, settings.weight_decay)
    return optimizer


def zero_grads(model_chunks: Sequence[torch.nn.Module], optimizer=None) -> None:
    """Clear the DDP grad buffers (and the optimizer's main grads) before a new accumulation."""
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    if optimizer is not None:
        optimizer.zero_grad()


def optimizer_step(optimizer) -> StepResult:
    """One optimizer step (unscale, clip by global norm, Adam update, copy to model params)."""
    success, grad_norm, num_zeros = optimizer.step()
    return StepResult(
        success=bool(success),
        grad_norm=None if grad_norm is None else float(grad_norm),
        num_zeros_in_grad=None if num_zeros is None else int(num_zeros),
    )


def set_learning_rate(optimizer, lr: float, weight_decay: float | None = None) -> None:
    """Set every parameter group's lr (and weight decay), honouring Megatron's per-group
    ``lr_mult``/``wd_mult`` (``wd_mult=0`` for biases and norms).

    Megatron-Core's ``OptimizerParamScheduler.step`` (megatron/core/optimizer_param_scheduler.py)
    sets each group's lr and weight decay times ``wd_mult``; megacredit has no scheduler, so this
    does it (called once by :func:`build_optimizer`, and by a warm-up schedule each step).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
        if weight_decay is not None:
            group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)
