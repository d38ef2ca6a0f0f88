"""OLMo-3 on Megatron-Core: its transformer layer as a module spec of Megatron-Core's own modules.

transformers' ``Olmo3DecoderLayer`` differs from the Llama layer of the other families in four ways:

1. **Norm placement.** No norm before attention or MLP; an RMSNorm on the OUTPUT of each, before
   the residual add: ``h = x + norm_a(attn(x))``, ``y = h + norm_f(mlp(h))``. Megatron's
   ``TransformerLayer`` places norms only before its sublayers (``input_layernorm``,
   ``pre_mlp_layernorm`` of ``TransformerLayerSubmodules``, megatron/core/transformer/
   transformer_layer.py), so both stay ``IdentityOp`` and each post-norm sits at the end of the
   sublayer's output projection (``linear_proj``, ``linear_fc2``), after its tensor-parallel
   reduction: :func:`with_post_norm` adds it to Megatron's row-parallel linear (the parameter is
   ``<linear>.post_layernorm.weight``).
2. **QK-norm over the whole projection.** ``q_norm`` / ``k_norm`` normalise all heads of a token
   together (weights of ``heads * head_dim``), not each head (Qwen3): :class:`ProjectionRMSNorm`,
   whose mean of squares is summed over the TP ranks, each holding its heads' slice of the weight.
   The TransformerConfig keeps ``qk_layernorm=False``: with it set, Megatron's
   ``finalize_model_grads`` would sum every ``q_layernorm`` gradient over TP, which is right for
   per-head norms (replicated weights) and wrong for these TP-sharded ones.
3. **Sliding-window attention** on the layers ``config.layer_types`` marks ``sliding_attention``
   (3 of every 4): ``TransformerConfig.window_size = (sliding_window - 1, 0)`` (HF's window of W
   keys includes the query itself: ``kv_idx > q_idx - W``, transformers' ``sliding_window_overlay``)
   and ``window_attn_skip_freq`` = one 1 (windowed) or 0 (full) per layer, read by Megatron's
   ``DotProductAttention`` and by megacredit's packed attention.
4. **RoPE per layer type.** ``rope_parameters`` holds one entry per layer type; the released 7B/32B
   models use YaRN on the full-attention layers only. The model's rotary table (GPTModel's) is the
   one of the first layer's type (sliding in OLMo-3); layers of the other type whose RoPE differs get
   their own table (:class:`LayerRopeSelfAttention`), and YaRN's attention factor, which HF
   multiplies into cos and sin (so into q and k), is applied by the QK-norms before RoPE (RoPE is
   linear: ``rot(a q) = a rot(q)``).
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

SLIDING, FULL = "sliding_attention", "full_attention"


def layer_types_of(hf_config: Any) -> list[str]:
    """One of "sliding_attention" / "full_attention" per layer (OLMo-3's default pattern when unset)."""
    return list(hf_config.layer_types)


def base_layer_type(hf_config: Any) -> str:
    """The layer type whose RoPE becomes the model's rotary table: the first layer's
    (``model_provider.rope_parameters`` reads the same)."""
    return layer_types_of(hf_config)[0]


def rope_of(hf_config: Any, layer_type: str) -> dict:
    """The ``rope_parameters`` entry of one layer type (with ``rope_type`` always set)."""
    params = dict(hf_config.rope_parameters[layer_type])
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def attention_factor(hf_config: Any, rope: dict) -> float:
    """YaRN's factor on cos and sin, by transformers' rule (modeling_rope_utils.py,
    ``_compute_yarn_parameters``): the given ``attention_factor``, else from factor and mscale."""
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    factor = rope.get("factor") or hf_config.max_position_embeddings / rope["original_max_position_embeddings"]

    def mscale_of(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    if rope.get("mscale") and rope.get("mscale_all_dim"):
        return mscale_of(factor, rope["mscale"]) / mscale_of(factor, rope["mscale_all_dim"])
    return mscale_of(factor)


def config_fields(hf_config: Any) -> dict:
    """TransformerConfig fields of OLMo-3 beyond the shared ones (see the module docstring)."""
    kinds = layer_types_of(hf_config)
    window = None
    if SLIDING in kinds and hf_config.sliding_window:
        window = (int(hf_config.sliding_window) - 1, 0)
    return dict(qk_layernorm=False, window_size=window,
                window_attn_skip_freq=[int(kind == SLIDING) for kind in kinds] if window else None)


def check(hf_config: Any, unsupported) -> None:
    """Raise ``unsupported(hf_config, feature)`` for what this module cannot represent."""
    base = base_layer_type(hf_config)
    if rope_of(hf_config, base)["rope_type"] != "default":
        raise unsupported(hf_config, f"rope_type={rope_of(hf_config, base)['rope_type']!r} on the {base} layers "
                                     f"(only default RoPE there; YaRN on the other layer type)")
    for kind in set(layer_types_of(hf_config)) - {base}:
        if rope_of(hf_config, kind)["rope_type"] not in ("default", "yarn"):
            raise unsupported(hf_config, f"rope_type={rope_of(hf_config, kind)['rope_type']!r} on the "
                                         f"{kind} layers (only default and yarn)")


class ProjectionRMSNorm(torch.nn.Module):
    """RMSNorm over all heads of a token's q (or k) projection, heads split over TP ranks.

    Input [s, b, heads / tp, head_dim]; the sum of squares of this rank's heads is all-reduced over
    the TP group (forward and backward: each rank's slice feeds every rank's normalisation), then
    divided by the full width ``heads * head_dim``. Computed in float32 like transformers'
    ``Olmo3RMSNorm``. ``output_scale`` (default 1) multiplies the result (YaRN's attention factor).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, *, heads: str):
        super().__init__()
        if heads not in ("query", "key"):
            raise ValueError(f"ProjectionRMSNorm: heads must be 'query' or 'key', got {heads!r}")
        total = config.num_attention_heads if heads == "query" else config.num_query_groups
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if total % tp:
            raise ValueError(f"ProjectionRMSNorm: TP size {tp} must divide the {total} {heads} heads")
        self.width = total * hidden_size
        self.eps = eps
        self.output_scale = 1.0
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(
            torch.ones(total // tp * hidden_size, dtype=config.params_dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(*x.shape[:-2], -1).float()
        sum_of_squares = flat.pow(2).sum(-1, keepdim=True)
        sum_of_squares = reduce_from_tensor_model_parallel_region(copy_to_tensor_model_parallel_region(sum_of_squares))
        normed = flat * torch.rsqrt(sum_of_squares / self.width + self.eps)
        out = self.weight.float() * normed
        if self.output_scale != 1.0:
            out = out * self.output_scale
        return out.to(x.dtype).reshape(x.shape)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Checkpoint shards: the weight is split over TP on dim 0 (heads of this rank)."""
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {"weight": 0}, sharded_offsets)


class _PostNorm:
    """Mixin for a Megatron linear: its (TP-reduced) output goes through ``post_layernorm``."""

    def __init__(self, *args, config, post_norm, **kwargs):
        super().__init__(*args, config=config, **kwargs)
        self.post_layernorm = build_module(post_norm, config=config, hidden_size=config.hidden_size,
                                           eps=config.layernorm_epsilon)

    def forward(self, *args, **kwargs):
        output, bias = super().forward(*args, **kwargs)
        if bias is not None:  # OLMo-3 has no linear biases (add_bias_linear=False)
            raise ValueError("a post-norm linear cannot return a separate bias (skip_bias_add with a bias)")
        return self.post_layernorm(output), None


@functools.cache
def with_post_norm(linear_class: type) -> type:
    """``linear_class`` (Megatron's row-parallel linear, local or TE) followed by a norm whose
    ModuleSpec it takes as ``post_norm``."""
    return type(f"{linear_class.__name__}WithPostNorm", (_PostNorm, linear_class), {})


class LayerRopeSelfAttention(SelfAttention):
    """Megatron's SelfAttention whose layers of type ``layer_type`` use their own RoPE table.

    ``rope``: the ``rope_parameters`` entry of that type (default or yarn), ``factor``: YaRN's
    attention factor (applied by the QK-norms). The other layers use the model's table unchanged.
    """

    def __init__(self, config, submodules, layer_number: int, *, rope: dict, factor: float,
                 own_layers: tuple[int, ...], **kwargs):
        super().__init__(config, submodules, layer_number, **kwargs)
        self.own_rotary = None
        if self.layer_number in own_layers:
            self.own_rotary = _rotary_embedding(config, rope)
            self.q_layernorm.output_scale = factor
            self.k_layernorm.output_scale = factor

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs):
        if rotary_pos_emb is not None and self.own_rotary is not None:
            table = self.own_rotary(rotary_pos_emb.shape[0])
            rotary_pos_emb = table[0] if isinstance(table, tuple) else table  # YaRN returns (emb, mscale)
        return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=rotary_pos_emb, **kwargs)


def _rotary_embedding(config, rope: dict) -> torch.nn.Module:
    """Megatron's RotaryEmbedding / YarnRotaryEmbedding for one ``rope_parameters`` entry."""
    from megatron.core.models.common.embeddings import RotaryEmbedding, YarnRotaryEmbedding

    common = dict(kv_channels=config.kv_channels, rotary_percent=1.0, rotary_interleaved=False,
                  rotary_base=float(rope["rope_theta"]), use_cpu_initialization=config.use_cpu_initialization)
    if rope["rope_type"] == "default":
        return RotaryEmbedding(**common)
    return YarnRotaryEmbedding(
        **common, scaling_factor=float(rope["factor"]),
        original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
        correction_range_round_to_int=bool(rope.get("truncate", True)))


def _attention_spec(hf_config: Any, base_attention: ModuleSpec, backend, norm) -> ModuleSpec:
    attention = copy.deepcopy(base_attention)
    sub = attention.submodules
    sub.linear_qkv = backend.column_parallel_linear()  # no fused pre-norm (TE's spec fuses one)
    sub.linear_proj = ModuleSpec(module=with_post_norm(backend.row_parallel_linear()), params={"post_norm": norm})
    sub.q_layernorm = ModuleSpec(module=ProjectionRMSNorm, params={"heads": "query"})
    sub.k_layernorm = ModuleSpec(module=ProjectionRMSNorm, params={"heads": "key"})
    base = base_layer_type(hf_config)
    kinds = layer_types_of(hf_config)
    for kind in set(kinds) - {base}:
        rope = rope_of(hf_config, kind)
        if rope != rope_of(hf_config, base):
            own = tuple(index + 1 for index, k in enumerate(kinds) if k == kind)  # 1-based layer numbers
            factor = attention_factor(hf_config, rope) if rope["rope_type"] == "yarn" else 1.0
            attention.module = LayerRopeSelfAttention
            attention.params = {**attention.params, "rope": rope, "factor": factor, "own_layers": own}
    return attention


def layer_spec(hf_config: Any, base_spec: ModuleSpec, use_transformer_engine: bool) -> ModuleSpec:
    """OLMo-3's layer spec, derived from the dense spec megacredit builds (``base_spec``: Megatron's
    local or Transformer Engine GPT layer): same core attention and norm class, norms moved after
    the output projections, whole-projection QK-norms, no pre-norms."""
    from megatron.core.models.backends import LocalSpecProvider

    if use_transformer_engine:
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        backend = TESpecProvider()
    else:
        backend = LocalSpecProvider()
    spec = copy.deepcopy(base_spec)
    sub = spec.submodules
    norm = sub.input_layernorm
    if norm is IdentityOp:  # TE's spec fuses its pre-norms into the next linear
        norm = backend.layer_norm(rms_norm=True, for_qk=False)
    sub.input_layernorm = IdentityOp
    sub.pre_mlp_layernorm = IdentityOp
    sub.self_attention = _attention_spec(hf_config, sub.self_attention, backend, norm)
    mlp = sub.mlp.submodules
    mlp.linear_fc1 = backend.column_parallel_linear()
    mlp.linear_fc2 = ModuleSpec(module=with_post_norm(backend.row_parallel_linear()), params={"post_norm": norm})
    sub.sharded_state_dict_keys_map = {}  # no pre-norms to alias to TE's fused names
    return spec

