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
3. The parameter count of the tiny models (Llama, Qwen2 with QKV bias, Qwen3 with QK-norm, OLMo-3
   with whole-projection QK-norm, Qwen3-MoE with its experts, also split over EP 2; tied or not)
   equals the Hugging Face model's; MoE weights agree with Megatron-LM's count where both count.
The measured CPU peaks are in tests/distributed/test_plan_measured.py.
"""

from __future__ import annotations

import json
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


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3", "olmo3", "qwen3_moe"])
@pytest.mark.parametrize("tied", [True, False])
def test_the_parameter_count_equals_the_hugging_face_models(architecture, tied):
    from transformers import AutoModelForCausalLM

    from megacredit.models.tiny import tiny_config
    from megacredit.planning.memory import stage_expert_parameters, stage_parameters
    from megacredit.planning.shapes import model_shape

    cfg = load_config(None, ["model.name_or_path=tiny", f"model.tiny.architecture={architecture}",
                             "model.tiny.vocab_size=1024", f"model.tiny.tie_word_embeddings={tied}"],  # 1024: no padding
                      check_paths=False)
    fields = cfg.model.tiny.to_hf_config_dict(1024)
    model = AutoModelForCausalLM.from_config(tiny_config(fields.pop("model_type"), **fields))
    shape = model_shape(cfg)
    assert stage_parameters(shape, 1, 1, 0) == sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    assert stage_expert_parameters(shape, 1, 1) == experts  # 0 for the dense families
    if experts:  # EP 2: each rank holds half of every layer's experts, all the rest
        assert stage_parameters(shape, 1, 1, 0, ep=2) == sum(p.numel() for p in model.parameters()) - experts // 2


MOE_LIKE = ModelShape(hidden=2048, layers=48, heads=32, kv_heads=4, head_dim=128, ffn=6144, vocab=151936, tied=False,
                      experts=128, experts_per_token=8, expert_ffn=768)


@pytest.mark.parametrize("pp", [1, 2])
def test_moe_weights_and_optimizer_agree_with_megatron_lm_where_both_count(pp):
    """Megatron-LM's count includes every expert (``moe_ffn_hidden_size * num_experts``) and
    divides the shard by TP only: at TP 1 and EP 1 it counts what megacredit's rank holds, less
    the router (``hidden x experts`` per layer, which it omits)."""
    cfg = load_config(None, ["model.name_or_path=tiny", "model.tiny.architecture=qwen3_moe", "model.dtype=bfloat16",
                             f"parallel.pipeline_model_parallel_size={pp}"], check_paths=False)  # 18 B per parameter
    plan = make_plan(cfg, gpus_per_node=pp, shape=MOE_LIKE)
    ours = sum(plan.stages[0].terms[k] for k in ("weights", "gradients", "optimizer"))
    h = MOE_LIKE.hidden
    self_attn = 2 * h * h * (1 + MOE_LIKE.kv_heads / MOE_LIKE.heads) * (MOE_LIKE.head_dim * MOE_LIKE.heads / h)
    moe_layer = 2 * h * (MOE_LIKE.expert_ffn * MOE_LIKE.experts * 3 / 2 + 1) + self_attn  # RMSNorm: norm_size 1
    block, embedding = moe_layer * MOE_LIKE.layers + h, h * padded_vocab(MOE_LIKE.vocab, 1)
    theirs = (block / pp + embedding + (embedding if pp == 1 else 0)) * 18
    router = MOE_LIKE.layers // pp * h * MOE_LIKE.experts * 18
    final_norm_on_the_last_stage = h / 2 * 18 if pp == 2 else 0
    assert ours == pytest.approx(theirs + router - final_norm_on_the_last_stage, rel=1e-9)


def test_the_moe_recipe_fits_only_with_the_teacher_on_the_host():
    """examples/qwen3_30b_a3b_credit_science.yaml on 8 x 80 GB: its 16 experts per GPU hold
    3.6 B parameters that no DP shards (EP 8 = every rank of the node), so the EMA teacher's fp32
    copy goes to the host (docs/launching.md)."""
    recipe = EXAMPLE.parent / "qwen3_30b_a3b_credit_science.yaml"
    plan = make_plan(load_config(recipe, [], check_paths=False), gpus_per_node=8)
    assert plan.layout.ep == 8 and plan.layout.expert_dp == 1 and plan.fits
    assert plan.stages[0].terms["teacher"] == 0
    assert not make_plan(load_config(recipe, ["algorithm.teacher.offload_to_host=false"], check_paths=False),
                         gpus_per_node=8).fits
    assert make_plan(load_config(recipe, ["algorithm.teacher.offload_to_host=false"], check_paths=False),
                     gpus_per_node=8, nodes=2).fits  # 16 GPUs: the distributed optimizer halves the experts' state


def test_a_family_the_planner_does_not_count_is_refused_naming_the_field(tmp_path: Path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "num_attention_heads": 12}')
    with pytest.raises(ConfigError, match="model.name_or_path.*families"):
        make_plan(_cfg(f"model.name_or_path={tmp_path}"), gpus_per_node=8)
    moe = {"model_type": "qwen3_moe", "num_attention_heads": 4, "hidden_size": 64, "num_hidden_layers": 2,
           "intermediate_size": 128, "vocab_size": 1024, "num_experts": 4, "num_experts_per_tok": 2,
           "moe_intermediate_size": 32, "mlp_only_layers": [0]}
    (tmp_path / "config.json").write_text(json.dumps(moe))
    with pytest.raises(ConfigError, match="model.name_or_path.*every layer a MoE layer"):
        make_plan(_cfg(f"model.name_or_path={tmp_path}"), gpus_per_node=8)


def test_an_expert_parallel_size_that_does_not_divide_the_experts_names_the_field():
    cfg = load_config(None, ["model.name_or_path=tiny", "model.tiny.architecture=qwen3_moe",
                             "parallel.expert_model_parallel_size=2"], check_paths=False)
    with pytest.raises(ConfigError, match="parallel.expert_model_parallel_size"):
        make_plan(cfg, gpus_per_node=2, shape=ModelShape(64, 2, 4, 2, 16, 128, 1024, tied=True, experts=3,
                                                          experts_per_token=1, expert_ffn=32))
