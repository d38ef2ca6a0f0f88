"""Model provider: a Megatron-Core ``GPTModel`` built from a Hugging Face config.

Supported families (``hf_config.model_type``): llama, mistral (without sliding window), qwen2
(q/k/v biases) and qwen3 (QK-norm, explicit head_dim). All share GQA, RoPE (HF's rotate-half
convention, i.e. Megatron's ``rotary_interleaved=False``), SwiGLU and RMSNorm. Families with a
layer of their own add their TransformerConfig fields, checks and layer spec through one module
each (``FAMILY_MODULES``): olmo3 (megacredit/megatron/olmo3.py: post-norms, whole-projection
QK-norm, sliding-window layers, RoPE per layer type) and qwen3_moe (megacredit/megatron/moe.py:
mixture of experts, expert parallelism).

Layer spec (``model.transformer_engine``): auto = Transformer Engine's when
``transformer_engine.pytorch`` imports (GPU machines), the Megatron-Core local spec otherwise (CPU,
the only path run here; the TE path is unverified on this machine); on = TE's or a one-line error;
off = the local spec. :func:`choose_layer_spec` says which and why (shown at start-up).

Vocabulary padding follows Megatron-LM (``megatron/training/vocab_utils.py::
calculate_padded_vocab_size``; ``--make-vocab-size-divisible-by`` defaults to 128 in
``megatron/training/arguments.py``): the embedding/output rows are padded to a multiple of
``make_vocab_size_divisible_by * tp`` (default 128 * tp) so every TP rank holds an equal,
aligned slice. The real vocabulary size is kept on the model as ``model.megacredit_vocab_size``;
logits of the padding rows are meaningless and must be dropped (``rl_passes.VocabHead`` masks
them: ids >= ``megacredit_vocab_size`` get -inf).
"""

from __future__ import annotations

import logging
import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from megacredit.megatron import cpu_compat
from megacredit.megatron.distributed import ParallelContext, current_context
from megacredit.utils.errors import SetupError, one_line

logger = logging.getLogger(__name__)
FAMILY_MODULES = {"olmo3": "megacredit.megatron.olmo3", "qwen3_moe": "megacredit.megatron.moe"}
"""model_type -> the module holding that family's ``config_fields``, ``check`` and ``layer_spec``."""
PER_HEAD_QK_NORM = ("qwen3", "qwen3_moe")
"""Families with an RMSNorm per query / key head (Megatron's ``qk_layernorm``)."""
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", *FAMILY_MODULES)
DEFAULT_MAKE_VOCAB_SIZE_DIVISIBLE_BY = 128


class UnsupportedArchitectureError(SetupError, ValueError):
    """The Hugging Face config describes a model family (or feature) megacredit cannot build."""


def _unsupported(hf_config: Any, feature: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"model_type {hf_config.model_type!r}: {feature} is not supported by megacredit's "
        f"Megatron model provider"
    )


def rope_parameters(hf_config: Any) -> dict:
    """The RoPE settings of ``hf_config`` as one dict with at least ``rope_type``/``rope_theta``.

    transformers >= 5 keeps them in ``config.rope_parameters``; 4.x in ``rope_theta`` and
    ``rope_scaling``. Both are read. Where they are given per layer type, these are the first
    layer's (the model's rotary table; megacredit/megatron/olmo3.py handles the other type).
    """
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types and isinstance(params.get(layer_types[0]), dict):
        params = dict(params[layer_types[0]])  # one entry per layer type (OLMo-3): the first layer's
    legacy_scaling = getattr(hf_config, "rope_scaling", None)
    if not params and isinstance(legacy_scaling, dict):
        params.update(legacy_scaling)
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(hf_config, "rope_theta", 10000.0)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def _llama3_rope_scaling_factor(hf_config: Any, rope: dict) -> float:
    """Megatron's built-in Llama-3 RoPE scaling hard-codes low/high frequency factors 1 and 4
    and an original context of 8192 (``RotaryEmbedding.__init__`` passes only the factor to
    ``_apply_scaling``, megatron/core/models/common/embeddings/rotary_pos_embedding.py); only
    that variant (Llama 3.1/3.2/3.3 checkpoints) can be represented."""
    expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    for key, value in expected.items():
        if float(rope.get(key, value)) != float(value):
            raise _unsupported(hf_config, f"llama3 rope scaling with {key}={rope[key]} (only {value})")
    return float(rope.get("factor", 8.0))


def _check_family_features(hf_config: Any) -> None:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"unsupported architecture model_type={model_type!r} "
            f"(architectures={getattr(hf_config, 'architectures', None)}); megacredit's Megatron "
            f"model provider supports model_type in {list(SUPPORTED_MODEL_TYPES)}"
        )
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise _unsupported(hf_config, f"hidden_act={hf_config.hidden_act!r} (only silu/SwiGLU)")
    if getattr(hf_config, "mlp_bias", False):
        raise _unsupported(hf_config, "mlp_bias=True")
    if model_type != "qwen2" and getattr(hf_config, "attention_bias", False):
        raise _unsupported(hf_config, "attention_bias=True (bias on o_proj)")
    if getattr(hf_config, "use_sliding_window", False) or (
        model_type == "mistral" and getattr(hf_config, "sliding_window", None) is not None
    ):
        raise _unsupported(hf_config, "sliding-window attention (set sliding_window=None to disable)")
    family = family_module(hf_config)
    if family is not None:
        family.check(hf_config, _unsupported)
    rope = rope_parameters(hf_config)
    if rope["rope_type"] not in ("default", "llama3"):
        raise _unsupported(hf_config, f"rope_type={rope['rope_type']!r} (only default and llama3)")
    if rope["rope_type"] == "llama3":
        _llama3_rope_scaling_factor(hf_config, rope)


def family_module(hf_config: Any):
    """The module of ``FAMILY_MODULES`` for this config's family, or None for the Llama-shaped ones."""
    import importlib

    name = FAMILY_MODULES.get(getattr(hf_config, "model_type", None))
    return importlib.import_module(name) if name else None


def head_dim_of(hf_config: Any) -> int:
    """Per-head width: ``head_dim`` when the config sets it (Qwen3), else hidden / heads."""
    head_dim = getattr(hf_config, "head_dim", None)
    return int(head_dim) if head_dim else hf_config.hidden_size // hf_config.num_attention_heads


def num_kv_heads_of(hf_config: Any) -> int:
    """Number of key/value heads (query groups); equals the head count without GQA."""
    return int(getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads)


def _check_parallel_sizes(hf_config: Any, tp: int, pp: int, overrides: dict, ep: int = 1) -> None:
    heads, kv_heads = hf_config.num_attention_heads, num_kv_heads_of(hf_config)
    if tp < 1 or pp < 1:
        raise ValueError(f"tp and pp must be >= 1, got tp={tp}, pp={pp}")
    if heads % tp or kv_heads % tp:
        options = [d for d in range(1, kv_heads + 1) if kv_heads % d == 0 and heads % d == 0]
        raise ValueError(
            f"tensor parallel size tp={tp} must divide both num_attention_heads={heads} and "
            f"num_key_value_heads={kv_heads} of this {hf_config.model_type} model; "
            f"use tp in {options} (and pipeline parallelism to split further)"
        )
    if hf_config.intermediate_size % tp:
        raise ValueError(f"tp={tp} must divide intermediate_size={hf_config.intermediate_size}")
    experts = int(getattr(hf_config, "num_experts", 0) or 0)
    if ep > 1 and (not experts or experts % ep):
        raise ValueError(f"expert parallel size ep={ep} must divide the experts of the model "
                         f"(num_experts={experts or 'none: not a mixture-of-experts model'}); set "
                         f"parallel.expert_model_parallel_size to a divisor of num_experts, or 1")
    uneven = {"num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage",
              "pipeline_model_parallel_layout"} & set(overrides)
    if hf_config.num_hidden_layers % pp and not uneven:
        raise ValueError(
            f"pp={pp} must divide num_hidden_layers={hf_config.num_hidden_layers}, or pass "
            f"num_layers_in_first_pipeline_stage / num_layers_in_last_pipeline_stage overrides"
        )


def _rope_fusion_available() -> bool:
    """Without Transformer Engine, Megatron's fused-RoPE hook gets megacredit's torch kernel
    (``rope_kernel``: same values, cos/sin once per forward); TE's own fused RoPE stays off."""
    if transformer_engine_available():
        return False
    from megacredit.megatron import rope_kernel

    return rope_kernel.install()


def transformer_config_from_hf(
    hf_config: Any,
    *,
    tp: int = 1,
    pp: int = 1,
    dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    ep: int = 1,
    **overrides: Any,
):
    """Megatron ``TransformerConfig`` equivalent to ``hf_config`` at the given TP/PP (and, for
    mixture-of-experts models, EP) sizes.

    dtype: parameter (and pipeline communication) dtype; bf16/fp16 set Megatron's flags.
    overrides: any further ``TransformerConfig`` field (e.g. recompute settings).
    Raises UnsupportedArchitectureError for other families/features, ValueError for TP/PP
    sizes that do not divide the model.
    """
    _check_family_features(hf_config)
    _check_parallel_sizes(hf_config, tp, pp, overrides, ep)
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields: dict[str, Any] = dict(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=num_kv_heads_of(hf_config),
        kv_channels=head_dim_of(hf_config),
        ffn_hidden_size=hf_config.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=float(hf_config.rms_norm_eps),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=hf_config.model_type == "qwen2",
        qk_layernorm=hf_config.model_type in PER_HEAD_QK_NORM,
        rotary_interleaved=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=not cpu_compat.cuda_available(),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        attention_softmax_in_fp32=True,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=_rope_fusion_available(),
        gradient_accumulation_fusion=False,
    )
    family = family_module(hf_config)
    if family is not None:
        fields.update(family.config_fields(hf_config))
    if fields.get("num_moe_experts"):
        fields["expert_model_parallel_size"] = ep
    fields.update(overrides)
    try:
        return TransformerConfig(**fields)
    except TypeError as error:
        raise TypeError(f"transformer_config_from_hf: bad override ({error}); overrides must be "
                        f"TransformerConfig fields") from error


def recompute_overrides(recompute: str, method: str = "uniform", num_layers: int = 1,
                        modules: tuple[str, ...] | list[str] = ("core_attn",)) -> dict[str, Any]:
    """``TransformerConfig`` fields of an activation-recompute setting (``parallel.recompute``):
    "none" -> none; "selective" -> the submodules ``modules``; "full" -> ``method`` (uniform /
    block) over units of ``num_layers`` layers. Only training passes recompute: the
    forward-only passes run under ``torch.no_grad``, which keeps no activations to begin with."""
    if recompute == "none":
        return {}
    if recompute == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": list(modules)}
    if recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": method, "recompute_num_layers": num_layers}
    raise ValueError(f"recompute must be 'none', 'selective' or 'full', got {recompute!r}")


def padded_vocab_size(vocab_size: int, tp: int, make_vocab_size_divisible_by: int = DEFAULT_MAKE_VOCAB_SIZE_DIVISIBLE_BY) -> int:
    """Megatron-LM's rule: round ``vocab_size`` up to a multiple of ``divisible_by * tp``."""
    if make_vocab_size_divisible_by < 1:
        raise ValueError(f"make_vocab_size_divisible_by must be >= 1, got {make_vocab_size_divisible_by}")
    multiple = make_vocab_size_divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def transformer_engine_problem() -> str | None:
    """Why Transformer Engine's PyTorch extension does not import (one line), None when it does."""
    try:
        import transformer_engine.pytorch  # noqa: F401, PLC0415
    except Exception as error:  # noqa: BLE001 - TE raises RuntimeError/ImportError/OSError without CUDA
        return one_line(error)
    return None


def transformer_engine_available() -> bool:
    """True when Transformer Engine's PyTorch extension imports (never on a CPU machine)."""
    return transformer_engine_problem() is None


class LayerSpecChoice(NamedTuple):
    """Which layer spec ``model.transformer_engine`` gives on this machine, and why."""

    transformer_engine: bool
    reason: str

    def __str__(self) -> str:
        spec = "Transformer Engine" if self.transformer_engine else "Megatron-Core local"
        return f"{spec} layer spec: {self.reason}"


def choose_layer_spec(use_transformer_engine: bool | None) -> LayerSpecChoice:
    """``model.transformer_engine`` auto (None) / on (True) / off (False) -> the spec; "on"
    without a loadable Transformer Engine raises one line instead of falling back."""
    if use_transformer_engine is False:
        return LayerSpecChoice(False, "model.transformer_engine=off")
    setting = "on" if use_transformer_engine else "auto"
    problem = transformer_engine_problem()
    if problem is None:
        return LayerSpecChoice(True, f"model.transformer_engine={setting}, transformer_engine.pytorch imports")
    if use_transformer_engine:
        raise SetupError(f"model.transformer_engine=on but Transformer Engine cannot load ({problem}); install it "
                         f"(an NGC PyTorch container has it) or set model.transformer_engine=auto or off")
    return LayerSpecChoice(False, f"model.transformer_engine=auto, Transformer Engine cannot load ({problem})")


def layer_spec_for(hf_config: Any, use_transformer_engine: bool | None = None):
    """The transformer layer spec of :func:`choose_layer_spec` (logged with its reason)."""
    from megatron.core.models.gpt import gpt_layer_specs

    qk_layernorm = hf_config.model_type in PER_HEAD_QK_NORM
    choice = choose_layer_spec(use_transformer_engine)
    logger.info("%s", choice)
    if choice.transformer_engine:
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")
    family = family_module(hf_config)
    return spec if family is None else family.layer_spec(hf_config, spec, choice.transformer_engine)


def _rope_arguments(hf_config: Any) -> dict:
    rope = rope_parameters(hf_config)
    arguments: dict[str, Any] = dict(position_embedding_type="rope", rotary_base=float(rope["rope_theta"]))
    if rope["rope_type"] == "llama3":
        arguments.update(rope_scaling=True, rope_scaling_factor=_llama3_rope_scaling_factor(hf_config, rope))
    return arguments


def build_gpt_model(
    hf_config: Any,
    ctx: ParallelContext | None = None,
    *,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    make_vocab_size_divisible_by: int = DEFAULT_MAKE_VOCAB_SIZE_DIVISIBLE_BY,
    use_transformer_engine: bool | None = None,
    parallel_output: bool = True,
    **config_overrides: Any,
):
    """Build this rank's ``GPTModel`` stage for ``hf_config`` (randomly initialised).

    ctx: the parallel layout (default: the initialised Megatron state). pre/post_process
    default to "first/last pipeline stage". Load weights with megacredit.megatron.bridge.
    The returned model carries ``megacredit_vocab_size`` (real vocab, without padding) and
    ``megacredit_hf_config``.
    """
    from megatron.core.models.gpt import GPTModel

    ctx = ctx or current_context()
    config = transformer_config_from_hf(
        hf_config, tp=ctx.tp_size, pp=ctx.pp_size, dtype=dtype,
        sequence_parallel=sequence_parallel, ep=ctx.ep_size, **config_overrides,
    )
    layer_spec = layer_spec_for(hf_config, use_transformer_engine)
    if config.sequence_parallel:  # the local spec's torch norms refuse it as they are
        from megacredit.megatron.sequence_parallel import with_sequence_parallel_norms

        layer_spec = with_sequence_parallel_norms(layer_spec, config)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=padded_vocab_size(hf_config.vocab_size, ctx.tp_size, make_vocab_size_divisible_by),
        max_sequence_length=hf_config.max_position_embeddings,
        pre_process=ctx.is_first_stage if pre_process is None else pre_process,
        post_process=ctx.is_last_stage if post_process is None else post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=bool(getattr(hf_config, "tie_word_embeddings", False)),
        **_rope_arguments(hf_config),
    )
    model.megacredit_vocab_size = int(hf_config.vocab_size)
    model.megacredit_hf_config = hf_config
    return model.to(ctx.device)

