"""Sequence parallelism on Megatron-Core's local (non-Transformer-Engine) layer spec.

With ``config.sequence_parallel`` Megatron keeps the activations between the tensor-parallel
regions (embedding output, norms, residual adds, the final norm) sharded along the sequence:
each TP rank holds ``T / tp`` of a packed row's ``T`` tokens. The parallel linears gather the
sequence before their matmul and reduce-scatter after it
(``megatron/core/tensor_parallel/layers.py``, ``ColumnParallelLinear`` / ``RowParallelLinear``),
so attention, RoPE and megacredit's packed attention still see the whole row; only the norms
run on a shard. A norm's weight is replicated over TP but gets a different partial gradient on
each rank, and Megatron sums such gradients over the TP group for every parameter marked
``param.sequence_parallel = True`` (``megatron/core/distributed/finalize_model_grads.py::
_allreduce_non_tensor_model_parallel_grads``, run by the schedule's ``finalize_model_grads``).
Transformer Engine's norms and apex's ``FusedLayerNorm`` mark their parameters that way.

Megatron-Core 0.16.1's torch norm (``megatron/core/transformer/torch_norm.py::WrappedTorchNorm``,
what the local spec uses without apex) refuses ``sequence_parallel`` with an assertion instead.
:class:`SequenceParallelTorchNorm` builds that same module (torch's ``RMSNorm`` / ``LayerNorm``,
same parameters and state-dict names) and marks its parameters as the others do, and
:func:`with_sequence_parallel_norms` puts it into a local layer spec in place of every
``WrappedTorchNorm``: the layers' input/pre-MLP norms, the QK norms (whose gradients Megatron
sums over TP anyway: each rank normalises only its heads) and the block's final norm.

Every packed row must then hold a multiple of ``tp`` tokens: the embedding reduce-scatters
along the sequence (``megatron/core/tensor_parallel/mappings.py::_reduce_scatter_along_first_dim``
asserts it). megacredit.megatron.actor pads its rows accordingly.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build


class SequenceParallelTorchNorm:
    """Megatron-Core's ``WrappedTorchNorm`` for sequence-sharded activations: the same torch
    norm, its parameters marked ``sequence_parallel`` so that their gradients are summed over TP."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **norm_options: Any):
        unsharded = copy.copy(config)  # WrappedTorchNorm only reads the config to check it
        unsharded.sequence_parallel = False
        norm = WrappedTorchNorm(unsharded, hidden_size, eps, **norm_options)
        for param in norm.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)
        return norm


def _replace_norms(spec: Any) -> Any:
    """A copy of ``spec`` (a ModuleSpec, submodules dataclass, list or class) with every
    ``WrappedTorchNorm`` in it, bare or as a ModuleSpec's module, replaced."""
    if spec is WrappedTorchNorm:
        return SequenceParallelTorchNorm
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return dataclasses.replace(spec, **{f.name: _replace_norms(getattr(spec, f.name))
                                            for f in dataclasses.fields(spec) if f.init})
    if isinstance(spec, list):
        return [_replace_norms(item) for item in spec]
    return spec


def with_sequence_parallel_norms(spec: ModuleSpec | TransformerBlockSubmodules, config):
    """``spec`` with :class:`SequenceParallelTorchNorm` in place of every ``WrappedTorchNorm``;
    unchanged when it has none (Transformer Engine's spec: its norms support SP themselves).

    A local layer ``ModuleSpec`` becomes this pipeline stage's ``TransformerBlockSubmodules`` as
    Megatron's ``TransformerBlock`` would build it (``transformer_block.py::_get_block_submodules``:
    the layer repeated ``get_num_layers_to_build(config)`` times, then the final norm), because
    the final norm can be chosen only there.
    """
    replaced = _replace_norms(spec)
    if replaced == spec:
        return spec
    if isinstance(spec, ModuleSpec):
        return TransformerBlockSubmodules(layer_specs=[replaced] * get_num_layers_to_build(config),
                                          layer_norm=SequenceParallelTorchNorm)
    return replaced
