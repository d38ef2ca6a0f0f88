"""``megacredit plan``'s arithmetic (megacredit/planning/) against independent counts.

1. Megatron-LM's own estimate, re-derived here from NVIDIA/Megatron-LM
   megatron/training/theoretical_memory_usage.py (``compute_weight_and_optimizer_memory``: the
   parameters of the most loaded shard x 18 bytes, or 6 + 12 / DP with the distributed
   optimizer; ``compute_activation_memory``: s b h (18 + 4 ffn / h) per layer / TP, which assumes
   selective recompute and sequence parallelism), for a dense GQA SwiGLU model without QK-norm
   or biases: weights + gradients + optimizer equal it exactly at PP 1 and within the final
   norm's h / 2 parameters at PP 2 (Megatron spreads the final norm over the stages; megacredit
   puts it on the last); the activations per layer differ by exactly the two terms named there
   (dropout masks, which these models do not have; SwiGLU's gate, which its GeLU count lacks).
2. The 8B recipe's numbers in docs/launching.md, and the verdict and the knobs of the CLI.
3. The parameter count of the tiny models (Llama, Qwen2 with QKV bias, Qwen3 with QK-norm; tied
   or not) equals the Hugging Face model's.
The measured CPU peaks are in tests/distributed/test_plan_measured.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from megacredit.cli import main
from megacredit.config import load_config
from megacredit.config.parsing import ConfigError
from megacredit.planning.memory import GB, activation_elements_per_token, padded_vocab
from megacredit.planning.report import make_plan
from megacredit.planning.shapes import ModelShape

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "qwen3_8b_credit_code.yaml"
LLAMA_LIKE = ModelShape(hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, ffn=14336, vocab=128256, tied=False)


def megatron_weight_and_optimizer_bytes(shape: ModelShape, tp: int, pp: int, dp: int, distributed: bool) -> float:
    """compute_weight_and_optimizer_memory's dense, non-MoE, RMSNorm, untied path, re-derived."""
    h, vocab = shape.hidden, padded_vocab(shape.vocab, tp)
    q_ratio = shape.head_dim * shape.heads / h
    self_attn = 2 * h * h * ((1 + shape.kv_heads / shape.heads) * q_ratio)
    dense_mlp = 2 * h * shape.ffn * 3 / 2
    layernorms, final_norm, embedding = 2 * h, h, h * vocab
    tp_sharded = (self_attn + dense_mlp) * shape.layers
    replicated = layernorms * shape.layers + final_norm
    tp_on_most_loaded = (tp_sharded / pp + embedding) / tp
    if pp == 1:  # untie_embeddings_and_output_weights and PP 1: the output layer too
        tp_on_most_loaded += embedding / tp
    per_parameter = 6 + 12 / dp if distributed else 18
    return (tp_on_most_loaded + replicated / pp) * per_parameter


def _cfg(*overrides: str):
    return load_config(EXAMPLE, list(overrides), check_paths=False)


@pytest.mark.parametrize("pp", [1, 2])
@pytest.mark.parametrize("distributed", [False, True])
def test_weights_gradients_and_optimizer_agree_with_megatron_lm(pp, distributed):
    cfg = _cfg(f"parallel.pipeline_model_parallel_size={pp}", f"optimizer.use_distributed_optimizer={distributed}")
    plan = make_plan(cfg, gpus_per_node=8, shape=LLAMA_LIKE)
    ours = sum(plan.stages[0].terms[k] for k in ("weights", "gradients", "optimizer"))
    theirs = megatron_weight_and_optimizer_bytes(LLAMA_LIKE, 4, pp, plan.layout.dp, distributed)
    bound = 0 if pp == 1 else LLAMA_LIKE.hidden / 2 * (6 + 12 / plan.layout.dp if distributed else 18)
    assert abs(ours - theirs) <= bound + 1e-6 * theirs  # float rounding of the per-parameter bytes only


@pytest.mark.parametrize("ffn", [4 * 4096, 14336])
def test_activations_per_layer_differ_from_megatron_lm_by_the_named_terms_only(ffn):
    h, tp = 4096, 4
    mha = ModelShape(hidden=h, layers=32, heads=32, kv_heads=32, head_dim=128, ffn=ffn, vocab=50257, tied=False)
    ours = 2 * activation_elements_per_token(mha, tp, sp=True, kernels="fused", selective=("core_attn",))
    theirs = h * (18 + 4 * ffn / h) / tp
    dropout_masks, swiglu_gate = 2 * h / tp, 2 * ffn / tp
    assert ours == pytest.approx(theirs - dropout_masks + swiglu_gate, rel=1e-12)


def test_the_8b_recipe_matches_docs_launching_md():
    plan = make_plan(_cfg(), gpus_per_node=8, gpu_mem_gb=80)
    terms = {k: v / GB for k, v in plan.stages[0].terms.items()}
    assert plan.stages[0].parameters == pytest.approx(2.048e9, rel=1e-3)
    expected = {"weights": 4.10, "gradients": 8.19, "optimizer": 12.29, "teacher": 8.19, "engine": 40.0}
    assert {k: round(terms[k], 2) for k in expected} == expected
    without = make_plan(_cfg("parallel.recompute=none", "optimizer.use_distributed_optimizer=false"), gpus_per_node=8)
    assert without.stages[0].terms["optimizer"] / GB == pytest.approx(24.58, abs=0.01)
    per_layer_bytes = 31744  # docs/launching.md's count at TP 4 with sequence parallelism
    kept = 36 * per_layer_bytes * 37888
    assert without.stages[0].terms["activations"] == pytest.approx(kept + per_layer_bytes * 37888, rel=1e-9)
    assert plan.fits and not without.fits


def test_the_cli_says_whether_it_fits_and_which_knob_to_turn(capsys):
    assert main(["plan", str(EXAMPLE)]) == 0
    assert "fits" in capsys.readouterr().out
    off = ["parallel.recompute=none", "optimizer.use_distributed_optimizer=false",
           "rollout.offload_trainer_during_rollout=false"]
    assert main(["plan", str(EXAMPLE), *off]) == 3
    out = capsys.readouterr().out
    for knob in ("parallel.recompute=full", "optimizer.use_distributed_optimizer=true",
                 "rollout.offload_trainer_during_rollout=true", "parallel.micro_batch_tokens<="):
        assert knob in out
    assert main(["plan", str(EXAMPLE), "--gpus-per-node", "6"]) == 2  # TP 4 does not divide 6 GPUs


def test_an_unknown_model_names_the_field():
    with pytest.raises(ConfigError, match="model.name_or_path"):
        make_plan(_cfg("model.name_or_path=/nonexistent/folder"))


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("tied", [True, False])
def test_the_parameter_count_equals_the_hugging_face_models(architecture, tied):
    from transformers import AutoModelForCausalLM

    from megacredit.models.tiny import tiny_config
    from megacredit.planning.memory import stage_parameters
    from megacredit.planning.shapes import model_shape

    cfg = load_config(None, ["model.name_or_path=tiny", f"model.tiny.architecture={architecture}",
                             "model.tiny.vocab_size=1024", f"model.tiny.tie_word_embeddings={tied}"],  # 1024: no padding
                      check_paths=False)
    fields = cfg.model.tiny.to_hf_config_dict(1024)
    model = AutoModelForCausalLM.from_config(tiny_config(fields.pop("model_type"), **fields))
    assert stage_parameters(model_shape(cfg), 1, 1, 0) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("architecture", ["olmo3", "qwen3_moe"])
def test_a_family_the_planner_does_not_count_is_refused_naming_the_field(architecture):
    cfg = load_config(None, ["model.name_or_path=tiny", f"model.tiny.architecture={architecture}"], check_paths=False)
    with pytest.raises(ConfigError, match="model.name_or_path.*dense"):
        make_plan(cfg, gpus_per_node=1)
