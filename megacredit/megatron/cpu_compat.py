"""Run the real Megatron-Core on a CPU (gloo backend): the one compatibility layer.

Megatron-Core assumes CUDA in a handful of places. This module switches on ONLY when CUDA is
absent (``enable_cpu_compat()`` returns False and changes nothing on a GPU machine) and fixes,
in one place, what running Megatron-Core 0.16.1 on CPU with gloo showed to break:

1. Hard-coded CUDA tensors (global memory buffer, pipeline schedules, p2p, clip_grads): a
   ``TorchFunctionMode`` rewrites ``device="cuda"``/``cuda:N``/``torch.device("cuda")`` to CPU in
   factory calls and ``Tensor.to``; ``Tensor.cuda()`` returns the tensor itself;
   ``torch.cuda.current_device()`` returns ``"cpu"``; streams, events and ``synchronize`` are
   no-op stand-ins.
2. The RNG tracker: ``torch.cuda.{manual_seed,get_rng_state,set_rng_state}`` and Megatron's
   ``_get_cuda_rng_state``/``_set_cuda_rng_state`` act on the CPU generator, so
   ``model_parallel_cuda_manual_seed`` and ``get_cuda_rng_tracker().fork()`` work.
3. Attention masks: the unfused softmax builds its default causal mask on "cuda"; (1) already
   covers it, and megacredit's passes use none (packed sequences, ``packed_attention``).
4. Gradient clipping asserts ``torch.cuda.FloatTensor``: the optimizer's clip function is
   replaced by one that checks fp32 on any device (same arithmetic).
5. ``dist_checkpointing`` needs ``psutil`` (a dependency) and a ``__main__`` guard in launched
   scripts; nothing to patch, noted here for users.
6. The distributed optimizer (and the fp16/bf16 one) sort parameters by their legacy type name
   and refuse anything but ``torch.cuda.{Float,Half,BFloat16}Tensor``
   (``megatron/core/optimizer/distrib_optimizer.py::DistributedOptimizer.
   _build_model_and_main_param_groups`` and ``__init__``; ``optimizer.py::
   Float16OptimizerWithFloat16Params.__init__``): while those two constructors run (and only
   then), ``Tensor.type()`` without arguments answers ``torch.cuda.*`` for a CPU tensor.
7. Without Apex or Transformer Engine Megatron steps ``torch.optim.AdamW``, whose state holds a
   ``step`` per parameter and is empty before the first step; the distributed optimizer's
   checkpointing expects one common step (Megatron-LM runs it with TE's or Apex's FusedAdam).
   (a) ``DistributedOptimizer.state_dict`` asserts that every parameter's state has a step, so
   building the state to load into a fresh optimizer fails: there, the state is first
   initialised as AdamW's first step would (zero moments, step 0; the load overwrites it).
   (b) ``load_state_dict`` restores the step from the parameter groups as ONE tensor shared by
   all parameters (which AdamW would then advance once per parameter at every step), then
   copies every state key from the checkpoint's per-parameter tensors, which hold no step
   (``_set_main_param_and_optimizer_states``: ``KeyError: 'step'``): each parameter gets its
   own copy of the restored step, handed over as itself.
8. Mixture of experts. Without Transformer Engine, ``megatron/core/transformer/moe/moe_utils.py``
   imports ``te_general_gemm`` from TE inside a ``try`` and never defines the name when that
   fails, so the router's ``RouterGatingLinearFunction`` raises ``NameError``: it is set to None,
   which selects the function's own ``torch.mm`` branch. The all-to-all token dispatcher turns its
   split sizes into numpy arrays with ``maybe_move_tensor_to_cpu(..., as_numpy=True)``, which
   converts only CUDA tensors, and gloo's ``all_to_all_single`` refuses tensors as split sizes:
   the dispatcher gets a twin that converts host tensors too. Its stream event (``record_event``)
   is the no-op stand-in of (1).

The mode is pushed on the thread that calls ``enable_cpu_compat`` (torch function modes are
per-thread); call it in each process (megacredit.megatron.distributed.initialize does).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_STATE: dict[str, Any] = {"enabled": False, "mode": None, "thread": None}


def cuda_available() -> bool:
    """True when a usable CUDA device exists (then the compatibility layer stays off)."""
    return torch.cuda.is_available()


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int as a device means "cuda:<int>" in torch.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU in every torch call made under it.

    Every torch call of the thread passes through here, so the common case (no keyword
    arguments, not ``Tensor.to``/``Tensor.cuda``) does no allocation and two identity checks.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs:
            device = kwargs.get("device")
            if device is not None and _is_cuda_device(device):
                kwargs = {**kwargs, "device": "cpu"}
        else:
            kwargs = {}
        if func is _TENSOR_CUDA:
            return args[0]
        if func is _TENSOR_TO and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


_TENSOR_TO, _TENSOR_CUDA, _TENSOR_TYPE = torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.type


class _CudaTypeNamesMode(TorchFunctionMode):
    """``tensor.type()`` (no arguments) of a CPU tensor answers the CUDA name, e.g.
    ``torch.cuda.FloatTensor``; every other call is unchanged (fix 6 of the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func is _TENSOR_TYPE and len(args) == 1 and not kwargs and result.startswith("torch."):
            return result if result.startswith("torch.cuda.") else "torch.cuda." + result[len("torch."):]
        return result


def _with_cuda_type_names(constructor):
    """``constructor`` run under :class:`_CudaTypeNamesMode`."""
    def constructor_on_cpu(*args, **kwargs):
        with _CudaTypeNamesMode():
            return constructor(*args, **kwargs)

    constructor_on_cpu.__wrapped__ = constructor
    return constructor_on_cpu


class _NoOpStream:
    """Stand-in for ``torch.cuda.Stream``/``Event`` on CPU: every method does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None

    def record_event(self, *args: Any, **kwargs: Any) -> "_NoOpStream":
        """An event stand-in (Megatron's all-to-all MoE dispatcher synchronizes on it)."""
        return _NoOpStream()

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> bool:
        return False


def _clip_grad_by_total_norm_fp32_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """CPU twin of ``megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32``.

    Same arithmetic (scale every fp32 grad by ``max_norm / (total_norm + 1e-6)`` when below 1),
    without the ``torch.cuda.FloatTensor`` assertion.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    for grad in grads:
        if grad.dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"gradient clipping expects fp32/bf16 main grads, got {grad.dtype}")
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for grad in grads:
            grad.detach().mul_(clip_coeff)


def _initialised_adam_state(state_dict):
    """``DistributedOptimizer.state_dict`` that also answers before the first step (fix 7a)."""
    def state_dict_after_initialising(self):
        inner = self.optimizer
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            for param in (p for group in inner.param_groups for p in group["params"]):
                state = inner.state[param]
                if "step" not in state:  # what AdamW's first step creates (torch/optim/adam.py::_init_group)
                    state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(param),
                                 exp_avg_sq=torch.zeros_like(param))
        return state_dict(self)

    state_dict_after_initialising.__wrapped__ = state_dict
    return state_dict_after_initialising


def _keep_restored_step(set_states):
    """``DistributedOptimizer._set_main_param_and_optimizer_states`` that accepts the
    checkpoint's tensors without ``step`` (fix 7b of the module docstring)."""
    def set_states_keeping_step(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            state = self.optimizer.state[main_param]
            if "step" in state:  # restored from the parameter groups already, as a shared tensor
                state["step"] = state["step"].detach().clone()
                tensors = {**tensors, "step": state["step"]}
        return set_states(self, model_param, tensors)

    set_states_keeping_step.__wrapped__ = set_states
    return set_states_keeping_step


def _host_tensor(tensor, as_numpy: bool = False, record_stream: bool = False):
    """CPU twin of Megatron's ``moe_utils.maybe_move_tensor_to_cpu``: the tensor is already on
    the host; with ``as_numpy`` it becomes a numpy array, as a device tensor would."""
    return tensor.numpy() if as_numpy and torch.is_tensor(tensor) else tensor


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.synchronize = lambda *args, **kwargs: None
    cuda.Stream = _NoOpStream
    cuda.Event = _NoOpStream
    cuda.current_stream = lambda *args, **kwargs: _NoOpStream()
    cuda.default_stream = lambda *args, **kwargs: _NoOpStream()
    cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    cuda.set_device = lambda *args, **kwargs: None
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.memory_allocated = lambda *args, **kwargs: 0
    cuda.max_memory_allocated = lambda *args, **kwargs: 0
    cuda.empty_cache = lambda: None


class _DropSharedRngWarning(logging.Filter):
    """On CPU the "CUDA" RNG tracker state IS the CPU generator, so Megatron's check that the
    CPU state is unchanged inside ``tracker.fork()`` always fires; it carries no information."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _patch_megatron() -> None:
    from megatron.core.optimizer import distrib_optimizer
    from megatron.core.optimizer import optimizer as megatron_optimizer
    from megatron.core.tensor_parallel import random as megatron_random

    logging.getLogger(megatron_random.__name__).addFilter(_DropSharedRngWarning())

    megatron_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    megatron_random._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)
    megatron_optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32_cpu
    for cls in (distrib_optimizer.DistributedOptimizer, megatron_optimizer.Float16OptimizerWithFloat16Params):
        cls.__init__ = _with_cuda_type_names(cls.__init__)
    optimizer_class = distrib_optimizer.DistributedOptimizer
    optimizer_class.state_dict = _initialised_adam_state(optimizer_class.state_dict)
    optimizer_class._set_main_param_and_optimizer_states = _keep_restored_step(
        optimizer_class._set_main_param_and_optimizer_states)

    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    token_dispatcher.maybe_move_tensor_to_cpu = _host_tensor


def enable_cpu_compat() -> bool:
    """Switch the layer on if (and only if) CUDA is absent. Idempotent per thread.

    Returns True when the layer is active, False on a CUDA machine (nothing is changed there).
    """
    if cuda_available():
        return False
    if not _STATE["enabled"]:
        _patch_torch_cuda()
        _patch_megatron()
        _STATE["enabled"] = True
    if _STATE["thread"] != threading.get_ident():
        mode = _CudaToCpuMode()
        mode.__enter__()
        _STATE.update(mode=mode, thread=threading.get_ident())
    return True


def device() -> torch.device:
    """The device megacredit places model tensors on: the current CUDA device, else CPU."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
