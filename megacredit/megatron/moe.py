"""Qwen3-MoE on Megatron-Core: mixture-of-experts layers, expert parallelism, router diagnostics.

The layer is Megatron-Core's own: the dense layer megacredit builds (Qwen3's attention with its
per-head QK-norm, the pre-MLP RMSNorm) with its MLP replaced by Megatron's MoE module spec
(``get_moe_module_spec_for_backend``: a ``TopKRouter`` and ``SequentialMLP`` experts, no shared
expert). transformers' ``Qwen3MoeSparseMoeBlock`` routes each token to the top ``k`` of ``E``
experts by ``softmax(router logits)``, renormalised over the chosen ``k`` when ``norm_topk_prob``;
Megatron's router does the same with ``moe_router_pre_softmax=False`` (softmax over the top-k
logits, which is the renormalised full softmax), and without renormalisation with
``moe_router_pre_softmax=True``.

Parallelism: experts are split over the expert-parallel (EP) ranks, EP folded over the TP x DP
ranks of a pipeline stage (``parallel.expert_model_parallel_size``;
megacredit/megatron/distributed.py), and not split over TP (expert tensor parallelism 1, as
slime runs Qwen3-30B-A3B). Tokens travel with Megatron's all-to-all dispatcher, which gloo runs
on CPU. Megatron's MoE layer refuses to train with TP > 1 without sequence parallelism
(``MoELayer.forward``), so config validation asks for it.

Auxiliary loss: Megatron's switch load-balancing loss (``moe_router_load_balancing_type="aux_loss"``,
per micro-batch) with ``model.moe_aux_loss_coeff`` (default: the checkpoint's
``router_aux_loss_coef``, 0.001 for Qwen3-MoE); it reaches the gradients only (the logged RL loss
does not include it) and is logged as ``moe/load_balancing_loss``. :class:`RouterLoad` counts the
tokens each expert receives in the training forwards and logs how even that is.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch

def config_fields(hf_config: Any) -> dict:
    """TransformerConfig fields of a Qwen3-MoE model (expert parallel sizes are set by the
    model provider from the parallel layout)."""
    return dict(
        num_moe_experts=int(hf_config.num_experts),
        moe_ffn_hidden_size=int(hf_config.moe_intermediate_size),
        moe_router_topk=int(hf_config.num_experts_per_tok),
        moe_router_pre_softmax=not bool(getattr(hf_config, "norm_topk_prob", True)),
        moe_router_score_function="softmax",
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=float(getattr(hf_config, "router_aux_loss_coef", 0.0) or 0.0),
        moe_router_dtype="fp32",
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
        expert_tensor_parallel_size=1,
    )


def check(hf_config: Any, unsupported) -> None:
    """Raise ``unsupported(hf_config, feature)`` for a Qwen3-MoE this module cannot build."""
    if getattr(hf_config, "mlp_only_layers", None):
        raise unsupported(hf_config, f"dense layers among the MoE ones (mlp_only_layers={hf_config.mlp_only_layers})")
    if int(getattr(hf_config, "decoder_sparse_step", 1)) != 1:
        raise unsupported(hf_config, f"decoder_sparse_step={hf_config.decoder_sparse_step} (only 1: every layer MoE)")
    if getattr(hf_config, "shared_expert_intermediate_size", None):
        raise unsupported(hf_config, "shared experts")


def layer_spec(hf_config: Any, base_spec, use_transformer_engine: bool):
    """The dense layer spec with Megatron's MoE block (router + SequentialMLP experts) as its MLP."""
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend

    if use_transformer_engine:
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        backend = TESpecProvider()
    else:
        backend = LocalSpecProvider()
    spec = copy.deepcopy(base_spec)
    spec.submodules.mlp = get_moe_module_spec_for_backend(backend, num_experts=int(hf_config.num_experts),
                                                          moe_grouped_gemm=False)
    if use_transformer_engine:  # TE's dense spec fuses the pre-MLP norm into linear_fc1; the MoE block has none
        spec.submodules.pre_mlp_layernorm = backend.layer_norm(rms_norm=True, for_qk=False)
    return spec


def is_moe(model_chunks: Sequence[torch.nn.Module]) -> bool:
    """Whether the (possibly wrapped) model chunks hold MoE layers."""
    from megatron.core.utils import get_model_config

    return get_model_config(model_chunks[0]).num_moe_experts is not None


class RouterLoad:
    """Tokens routed to each expert of each MoE layer in the training forwards (gradients on),
    counted by forward hooks on Megatron's routers; the teacher and old-policy passes (no
    gradients) are not counted."""

    def __init__(self, model_chunks: Sequence[torch.nn.Module]):
        from megatron.core.transformer.moe.router import TopKRouter
        from megatron.core.utils import get_model_config

        config = get_model_config(model_chunks[0])
        self.counts = torch.zeros(config.num_layers, config.num_moe_experts, dtype=torch.float64)
        self.micro_batches = 0
        routers = [m for chunk in model_chunks for m in chunk.modules() if isinstance(m, TopKRouter)]
        self._handles = [router.register_forward_hook(self._count) for router in routers]
        self._first = routers[0] if routers else None

    def _count(self, router, inputs, outputs) -> None:
        if not torch.is_grad_enabled():
            return
        _, routing_map = outputs
        self.counts[router.layer_number - 1] += routing_map.sum(dim=0).to(self.counts)
        if router is self._first:
            self.micro_batches += 1

    def step_metrics(self) -> dict[str, float]:
        """``moe/`` metrics of the training forwards since the last call, on every rank
        (collective over the world), then the counters and Megatron's aux-loss tracker reset."""
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        counts = self.counts.clone()
        torch.distributed.all_reduce(counts)  # each layer lives on one stage; ranks add their tokens
        used = counts[counts.sum(dim=1) > 0]
        metrics: dict[str, float] = {}
        if len(used):
            load = used / used.mean(dim=1, keepdim=True)  # 1 = the expert got its even share
            metrics["moe/expert_load_max"] = float(load.max(dim=1).values.mean())
            metrics["moe/expert_load_min"] = float(load.min(dim=1).values.mean())
        metrics.update(_aux_loss_metrics(self.micro_batches, int(len(used) or 1)))
        self.counts.zero_()
        self.micro_batches = 0
        clear_aux_losses_tracker()
        return metrics


def _aux_loss_metrics(micro_batches: int, num_layers: int) -> dict[str, float]:
    """Megatron's load-balancing loss (its tracker: summed over this rank's micro-batches per
    layer), as the mean over layers and over the training micro-batches of all ranks."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import (
        get_moe_layer_wise_logging_tracker,
        reduce_aux_losses_tracker_across_ranks,
    )

    tracker = get_moe_layer_wise_logging_tracker()
    present = torch.tensor([float("load_balancing_loss" in tracker)])
    torch.distributed.all_reduce(present, op=torch.distributed.ReduceOp.MIN)
    if not present.item():  # the coefficient is 0: Megatron computes no aux loss
        return {}
    # Sum over PP stages and TP (sequence-parallel shards), average over DP (Megatron's reduction).
    reduce_aux_losses_tracker_across_ranks(["load_balancing_loss"])
    per_rank = torch.tensor([float(micro_batches)], dtype=torch.float64)
    torch.distributed.all_reduce(per_rank, group=parallel_state.get_data_parallel_group())
    mean_micro_batches = per_rank.item() / parallel_state.get_data_parallel_world_size()
    total = float(tracker["load_balancing_loss"]["values"].sum())
    return {"moe/load_balancing_loss": total / num_layers / max(mean_micro_batches, 1.0)}
