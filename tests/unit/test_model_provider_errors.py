"""Model provider: clear errors for what it cannot build, the HF -> Megatron config mapping, and
the layer spec ``model.transformer_engine`` chooses (with its reason)."""

import logging
import sys

import pytest
import torch
from transformers import GPT2Config, LlamaConfig

from megacredit.megatron.model_provider import (
    SUPPORTED_MODEL_TYPES,
    UnsupportedArchitectureError,
    choose_layer_spec,
    layer_spec_for,
    padded_vocab_size,
    transformer_config_from_hf,
)
from megacredit.models.tiny import tiny_config
from megacredit.utils.errors import SetupError


def _smollm2_shaped_config() -> LlamaConfig:
    """SmolLM2-135M's attention geometry (9 query heads, 3 KV heads), 2 layers."""
    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                       num_attention_heads=9, num_key_value_heads=3, vocab_size=128)


def test_unsupported_architecture_names_the_model_type_and_the_supported_ones():
    with pytest.raises(UnsupportedArchitectureError) as error:
        transformer_config_from_hf(GPT2Config(), tp=1, pp=1)
    message = str(error.value)
    assert "'gpt2'" in message
    for model_type in SUPPORTED_MODEL_TYPES:
        assert model_type in message


def test_tp_not_dividing_heads_is_a_clear_value_error():
    with pytest.raises(ValueError) as error:
        transformer_config_from_hf(_smollm2_shaped_config(), tp=2, pp=1)
    message = str(error.value)
    assert "tp=2" in message and "num_attention_heads=9" in message and "num_key_value_heads=3" in message
    assert "[1, 3]" in message  # the valid TP sizes are suggested


def test_tp_dividing_heads_but_not_kv_groups_is_rejected():
    config = tiny_config("llama")  # 4 query heads, 2 KV heads
    with pytest.raises(ValueError, match="num_key_value_heads=2"):
        transformer_config_from_hf(config, tp=4, pp=1)


def test_pp_not_dividing_layers_is_rejected():
    with pytest.raises(ValueError, match="pp=3 must divide num_hidden_layers=2"):
        transformer_config_from_hf(tiny_config("llama"), tp=1, pp=3)


@pytest.mark.parametrize(
    "overrides, feature",
    [
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(attention_bias=True), "attention_bias=True"),
        (dict(mlp_bias=True), "mlp_bias=True"),
        (dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0)), "rope_type='yarn'"),
    ],
)
def test_unsupported_features_are_named(overrides, feature):
    with pytest.raises(UnsupportedArchitectureError, match=feature.replace("(", r"\(").replace("[", r"\[")):
        transformer_config_from_hf(tiny_config("llama", **overrides), tp=1, pp=1)


def test_llama3_rope_scaling_with_other_frequency_factors_is_rejected():
    rope = dict(rope_type="llama3", rope_theta=1e4, factor=8.0, low_freq_factor=2.0,
                high_freq_factor=4.0, original_max_position_embeddings=8192)
    with pytest.raises(UnsupportedArchitectureError, match="low_freq_factor=2.0"):
        transformer_config_from_hf(tiny_config("llama", rope_parameters=rope, max_position_embeddings=16384))


def test_qwen2_sliding_window_is_rejected():
    with pytest.raises(UnsupportedArchitectureError, match="sliding-window"):
        transformer_config_from_hf(tiny_config("qwen2", use_sliding_window=True, sliding_window=32))


def test_bad_override_names_the_problem():
    with pytest.raises(TypeError, match="overrides must be TransformerConfig fields"):
        transformer_config_from_hf(tiny_config("llama"), not_a_field=1)


def test_config_fields_follow_the_hf_config():
    qwen3 = tiny_config("qwen3", head_dim=32, rms_norm_eps=1e-5)  # head_dim != hidden / heads
    config = transformer_config_from_hf(qwen3, tp=2, pp=2, dtype=torch.bfloat16)
    assert (config.num_layers, config.hidden_size, config.ffn_hidden_size) == (2, 64, 128)
    assert (config.num_attention_heads, config.num_query_groups, config.kv_channels) == (4, 2, 32)
    assert config.qk_layernorm and not config.add_qkv_bias and not config.add_bias_linear
    assert config.gated_linear_unit and config.activation_func is torch.nn.functional.silu
    assert config.normalization == "RMSNorm" and config.layernorm_epsilon == 1e-5
    assert config.params_dtype == config.pipeline_dtype == torch.bfloat16 and config.bf16
    assert (config.tensor_model_parallel_size, config.pipeline_model_parallel_size) == (2, 2)
    assert config.attention_dropout == 0.0 and config.hidden_dropout == 0.0
    qwen2 = transformer_config_from_hf(tiny_config("qwen2"))
    assert qwen2.add_qkv_bias and not qwen2.qk_layernorm and qwen2.kv_channels == 16


def test_olmo3_config_fields_window_per_layer_and_no_per_head_qk_norm():
    olmo3 = tiny_config("olmo3", num_hidden_layers=8, sliding_window=6)
    config = transformer_config_from_hf(olmo3, tp=2)
    assert config.window_size == (5, 0)  # HF's window of 6 keys counts the query itself
    assert config.window_attn_skip_freq == [1, 1, 1, 0, 1, 1, 1, 0]  # 1 = sliding window
    # The whole-projection QK-norms are TP-sharded: Megatron must not sum their gradients over TP.
    assert not config.qk_layernorm
    full_only = transformer_config_from_hf(tiny_config("olmo3", layer_types=["full_attention"] * 2))
    assert full_only.window_size is None and full_only.window_attn_skip_freq is None


@pytest.mark.parametrize(
    "rope, feature",
    [
        ({"sliding_attention": dict(rope_type="yarn", rope_theta=1e4, factor=4.0, original_max_position_embeddings=64),
          "full_attention": dict(rope_type="default", rope_theta=1e4)}, "rope_type='yarn' on the sliding_attention layers"),
        ({"sliding_attention": dict(rope_type="default", rope_theta=1e4),
          "full_attention": dict(rope_type="linear", rope_theta=1e4, factor=2.0)}, "rope_type='linear' on the full_attention"),
    ],
)
def test_olmo3_rope_it_cannot_build_is_named(rope, feature):
    with pytest.raises(UnsupportedArchitectureError, match=feature):
        transformer_config_from_hf(tiny_config("olmo3", num_hidden_layers=4, rope_parameters=rope,
                                               max_position_embeddings=512))


@pytest.mark.parametrize("vocab, tp, expected", [(101, 1, 128), (101, 2, 256), (49152, 1, 49152), (151936, 4, 152064)])
def test_vocab_padding_follows_megatron_lm(vocab, tp, expected):
    assert padded_vocab_size(vocab, tp) == expected


# -- model.transformer_engine: which layer spec, and why ------------------------------------
BROKEN_TE = "raise ImportError('libcudart.so.12: cannot open shared object file')\n"  # a TE built for another CUDA


@pytest.fixture
def fake_transformer_engine(tmp_path, monkeypatch):
    """Puts a ``transformer_engine`` package first on sys.path whose ``pytorch`` module runs the
    given source (a TE installed but broken on this machine, or one that imports)."""
    def install(pytorch_source: str) -> None:
        package = tmp_path / "transformer_engine"
        (package / "pytorch").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "pytorch" / "__init__.py").write_text(pytorch_source)
        monkeypatch.syspath_prepend(str(tmp_path))
        for name in [m for m in sys.modules if m.split(".")[0] == "transformer_engine"]:
            monkeypatch.delitem(sys.modules, name)
    yield install
    for name in [m for m in sys.modules if m.split(".")[0] == "transformer_engine"]:
        del sys.modules[name]  # the fake must not outlive its test


def test_auto_falls_back_to_the_local_spec_and_says_why(fake_transformer_engine, caplog):
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    fake_transformer_engine(BROKEN_TE)
    choice = choose_layer_spec(None)
    assert not choice.transformer_engine
    assert str(choice) == ("Megatron-Core local layer spec: model.transformer_engine=auto, Transformer Engine "
                           "cannot load (ImportError: libcudart.so.12: cannot open shared object file)")
    with caplog.at_level(logging.INFO, logger="megacredit.megatron.model_provider"):
        spec = layer_spec_for(tiny_config("qwen3"))
    assert str(choice) in caplog.text
    assert spec.submodules.input_layernorm is WrappedTorchNorm  # the local spec's RMSNorm


def test_on_without_a_loadable_transformer_engine_fails_in_one_line(fake_transformer_engine):
    fake_transformer_engine(BROKEN_TE)
    for call in (lambda: choose_layer_spec(True), lambda: layer_spec_for(tiny_config("qwen3"), True)):
        with pytest.raises(SetupError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message and message.startswith("model.transformer_engine=on but Transformer Engine cannot load")
        assert "ImportError: libcudart.so.12" in message and "model.transformer_engine=auto or off" in message


def test_auto_and_on_choose_transformer_engine_when_it_imports(fake_transformer_engine):
    fake_transformer_engine("")
    assert choose_layer_spec(None) == (True, "model.transformer_engine=auto, transformer_engine.pytorch imports")
    assert choose_layer_spec(True).transformer_engine


def test_off_never_tries_transformer_engine(fake_transformer_engine):
    fake_transformer_engine("raise AssertionError('off must not import Transformer Engine')\n")
    assert choose_layer_spec(False) == (False, "model.transformer_engine=off")
