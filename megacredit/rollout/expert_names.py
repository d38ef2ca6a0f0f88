"""Mixture-of-experts weights under their checkpoint names, as views into transformers' fused
tensors.

transformers 5 keeps a Qwen3-MoE layer's experts fused in memory -- ``mlp.experts.gate_up_proj``
[E, 2 I, H] (each expert's gate rows, then its up rows) and ``mlp.experts.down_proj`` [E, H, I] --
and converts from and to per-expert names when it loads or saves a checkpoint (its
``conversion_mapping.py``, the "qwen2_moe" entry: ``MergeModulelist(dim=0)`` then
``Concatenate(dim=1)``). Checkpoints, vLLM, SGLang and megacredit's weight export name each expert:
``mlp.experts.{e}.gate_proj.weight`` / ``up_proj`` / ``down_proj``. :func:`per_expert_views`
turns the former into the latter without copying, so that writing into a view writes the fused
parameter.
"""

from __future__ import annotations

from typing import Mapping

import torch

FUSED_GATE_UP = "mlp.experts.gate_up_proj"
FUSED_DOWN = "mlp.experts.down_proj"


def per_expert_views(named: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``named`` with every fused expert tensor replaced by one view per expert (checkpoint
    names); other entries unchanged."""
    views: dict[str, torch.Tensor] = {}
    for name, tensor in named.items():
        fused = name.endswith((FUSED_GATE_UP, FUSED_DOWN)) and tensor.dim() == 3
        if not fused:
            views[name] = tensor
            continue
        prefix = name[: -len(name.rpartition(".")[2])]  # "model.layers.{i}.mlp.experts."
        if name.endswith(FUSED_GATE_UP):
            gate, up = tensor.chunk(2, dim=1)
            for expert in range(tensor.shape[0]):
                views[f"{prefix}{expert}.gate_proj.weight"] = gate[expert]
                views[f"{prefix}{expert}.up_proj.weight"] = up[expert]
        else:
            for expert in range(tensor.shape[0]):
                views[f"{prefix}{expert}.down_proj.weight"] = tensor[expert]
    return views
