"""Typed config: defaults = papers' values, presets, overrides, errors, round trip, examples."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from megacredit.algorithms.methods import METHODS as METHOD_TABLE
from megacredit.config import (
    ConfigError,
    MegacreditConfig,
    check_world_size,
    config_to_dict,
    config_to_yaml,
    load_config,
    replace,
    save_config,
    validate_against_model,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PAPER_SCALE_PREFIXES = ("qwen3_8b", "_qwen3_8b", "olmo3_7b", "qwen3_30b_a3b")
"""GPU-scale examples: hub ids and placeholder data paths, validated as configs only."""
METHODS = sorted(METHOD_TABLE)


def write_yaml(tmp_path: Path, data: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_are_credit_table3_values():
    cfg = load_config(None)
    alg = cfg.algorithm
    assert alg.name == "credit"
    assert (alg.group_size, alg.clip_eps_low, alg.clip_eps_high) == (8, 0.2, 0.2)
    assert (alg.sdpo.top_k, alg.sdpo.topk_source, alg.sdpo.alpha) == (20, "teacher", 1.0)
    assert (alg.credit.num_contrastive, alg.credit.lam) == (1, 0.1)
    assert (alg.teacher.kind, alg.teacher.ema_rate) == ("ema", 0.01)
    assert cfg.optimizer.lr == 1e-6 and cfg.optimizer.warmup_steps == 0
    assert (cfg.data.prompts_per_step, cfg.training.ppo_mini_batch_size) == (32, 8)
    assert (cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k) == (1.0, 1.0, -1)
    assert cfg.rollout.max_seq_len == 18944
    assert (cfg.validation.temperature, cfg.validation.top_p) == (0.6, 0.95)
    assert (cfg.validation.every_steps, cfg.validation.k) == (5, 4)
    assert cfg.validation.bootstrap_samples == 2000


def test_rlsd_preset_applies_and_explicit_values_win():
    cfg = load_config(None, ["algorithm.name=rlsd"])
    alg = cfg.algorithm
    assert (alg.clip_eps_low, alg.clip_eps_high) == (0.2, 0.28)
    assert alg.loss_agg_mode == "seq-mean-token-mean"
    assert (alg.teacher.kind, alg.teacher.sync_every) == ("hard_copy", 10)
    assert alg.rlsd.eps_w == 0.2
    lam = alg.rlsd.lam
    assert (lam.kind, lam.start, lam.end, lam.steps) == ("linear", 0.5, 0.0, 50)
    # A value the user sets beats the preset.
    cfg = load_config(None, ["algorithm.name=rlsd", "algorithm.clip_eps_high=0.3"])
    assert cfg.algorithm.clip_eps_high == 0.3
    # Other methods keep the symmetric CREDIT clip and the EMA teacher.
    grpo = load_config(None, ["algorithm.name=grpo"]).algorithm
    assert grpo.clip_eps_high == 0.2 and grpo.teacher.kind == "ema"


def test_overrides_are_parsed_as_yaml_scalars(tmp_path):
    path = write_yaml(tmp_path, {"training": {"steps": 3}, "data": {"val_path": None}})
    cfg = load_config(path, [
        "training.steps=7", "optimizer.lr=1e-5", "optimizer.betas=[0.8, 0.9]",
        "logging.wandb=true", "validation.num_prompts=null", "env.kwargs.seed=5",
        "model.name_or_path=tiny",
    ])
    assert cfg.training.steps == 7 and isinstance(cfg.training.steps, int)
    assert cfg.optimizer.lr == pytest.approx(1e-5) and isinstance(cfg.optimizer.lr, float)
    assert cfg.optimizer.betas == [0.8, 0.9]
    assert cfg.logging.wandb is True
    assert cfg.validation.num_prompts is None
    assert cfg.env.kwargs == {"seed": 5}
    assert cfg.model.name_or_path == "tiny"


def test_unknown_key_names_full_key_and_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"'algorithm\.sdpo\.topk_sorce'.*Did you mean 'topk_source'"):
        load_config(None, ["algorithm.sdpo.topk_sorce=student"])
    path = write_yaml(tmp_path, {"optimizer": {"learning_rate": 1e-5}})
    with pytest.raises(ConfigError, match=r"'optimizer\.learning_rate'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"'trainig'.*Did you mean 'training'"):
        load_config(None, ["trainig.steps=1"])
    with pytest.raises(ConfigError, match=r"not of the form key\.sub=value"):
        load_config(None, ["training.steps"])


def test_wrong_type_names_key_expected_type_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"'training\.steps' expects int, got 'ten'"):
        load_config(None, ["training.steps=ten"])
    with pytest.raises(ConfigError, match=r"'logging\.jsonl' expects bool, got 1"):
        load_config(write_yaml(tmp_path, {"logging": {"jsonl": 1}}))
    with pytest.raises(ConfigError, match=r"'algorithm\.name' must be one of .*Did you mean 'credit'"):
        load_config(None, ["algorithm.name=credt"])
    with pytest.raises(ConfigError, match=r"'rollout\.max_new_tokens' is of type int"):
        load_config(None, ["rollout.max_new_tokens.value=3"])


@pytest.mark.parametrize("overrides, pattern", [
    (["algorithm.name=rlsd", "algorithm.sdpo.topk_source=student"],
     r"'algorithm\.sdpo\.topk_source' has no effect with algorithm\.name=rlsd"),
    (["algorithm.name=grpo", "algorithm.credit.lam=0.2"], r"algorithm\.credit\.lam' has no effect"),
    (["algorithm.name=credit_rlsd", "algorithm.credit.lam=0.2"], r"has no effect"),
    (["algorithm.credit.num_contrastive=0"], r"C >= 1 .*algorithm\.name=sdpo"),
    (["algorithm.clip_eps_low=1.5"], r"'algorithm\.clip_eps_low' = 1\.5"),
    (["algorithm.clip_eps_high=0"], r"'algorithm\.clip_eps_high'"),
    (["algorithm.name=grpo", "algorithm.group_size=1"], r"group_size.*at least 2"),
    (["algorithm.name=rlsd", "algorithm.rlsd.eps_w=1.2"], r"eps_w"),
    (["algorithm.sdpo.alpha=2"], r"alpha"),
    (["algorithm.credit.lam=1.5"], r"'algorithm\.credit\.lam' = 1\.5 .*\[0, 1\]"),
    (["data.prompts_per_step=1"], r"at least 2 prompts"),
    (["training.ppo_mini_batch_size=5"], r"must divide data\.prompts_per_step \(32\)"),
    (["parallel.tensor_model_parallel_size=2"], r"does not divide the 9 attention heads"),
    (["parallel.pipeline_model_parallel_size=4"], r"does not divide the 30 layers"),
    (["parallel.sequence_parallel=true"], r"needs parallel\.tensor_model_parallel_size > 1"),
    (["model.name_or_path=tiny", "parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2",
      "parallel.sequence_parallel=true", "parallel.micro_batch_tokens=32769"],
     r"'parallel\.micro_batch_tokens' = 32769 .*sequence and pipeline parallelism.*multiple of 2"),
    (["model.name_or_path=tiny", "parallel.tensor_model_parallel_size=3"], r"4 attention heads"),
    (["rollout.max_new_tokens=20000"], r"smaller than rollout\.max_seq_len"),
    (["data.dataset=sciknoweval", "data.train_path=/no/such/file.jsonl"], r"'data\.train_path'.*file not found"),
    (["checkpoint.resume=/no/such/ckpt"], r"'checkpoint\.resume'"),
    (["validation.confidence=1.0"], r"validation\.confidence"),
    (["parallel.collective_timeout_minutes=0"], r"'parallel\.collective_timeout_minutes' = 0.*must be > 0"),
    (["rollout.request_timeout_s=-1"], r"'rollout\.request_timeout_s' = -1.*must be > 0"),
    (["rollout.max_engine_faults=-1"], r"'rollout\.max_engine_faults' = -1.*0 = stop at the first fault"),
    (["parallel.recompute=full", "parallel.recompute_num_layers=4"],
     r"'parallel\.recompute_num_layers' = 4 .*divide the 30 layers of a pipeline stage"),
    (["parallel.recompute=full", "parallel.recompute_method=block", "parallel.recompute_num_layers=31"],
     r"at most the 30 layers"),
    (["parallel.recompute=selective", "parallel.recompute_modules=[core_atn]"], r"Did you mean 'core_attn'"),
    (["parallel.recompute=selective", "parallel.recompute_modules=[layernorm]"], r"recompute_modules.*'layernorm'"),
    (["rollout.engine=vllm", "rollout.placement=remote", "rollout.urls=[http://h:8000]",
      "rollout.offload_trainer_during_rollout=true"], r"'rollout\.offload_trainer_during_rollout'.*colocated"),
])
def test_incompatible_or_out_of_range_values_are_rejected(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)


def test_sequence_parallel_budgets_that_can_run_are_accepted():
    """Without PP the actor pads each packed row to a multiple of TP, so any budget runs; with PP
    rows are padded to the budget itself, which must then split into TP shards."""
    tiny_tp2 = ["model.name_or_path=tiny", "parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]
    assert load_config(None, [*tiny_tp2, "parallel.micro_batch_tokens=32769"]).parallel.sequence_parallel
    assert load_config(None, [*tiny_tp2, "parallel.pipeline_model_parallel_size=2"]).parallel.sequence_parallel


def test_group_size_one_is_allowed_without_group_normalisation():
    assert load_config(None, ["algorithm.name=sdpo", "algorithm.group_size=1"]).algorithm.group_size == 1


def test_validate_against_real_hf_config_objects():
    from transformers import LlamaConfig

    hf = LlamaConfig(num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=6,
                     hidden_size=64, intermediate_size=128, vocab_size=100)
    ok = load_config(None, ["model.name_or_path=/some/folder",
                            "parallel.tensor_model_parallel_size=2",
                            "parallel.pipeline_model_parallel_size=3"], check_paths=False)
    validate_against_model(ok, hf)  # 8 heads, 2 KV heads, 6 layers: TP=2, PP=3 divide
    bad_tp = replace(ok, **{"parallel.tensor_model_parallel_size": 4})
    with pytest.raises(ConfigError, match=r"does not divide the 2 KV heads"):
        validate_against_model(bad_tp, hf)
    bad_pp = replace(ok, **{"parallel.pipeline_model_parallel_size": 4})
    with pytest.raises(ConfigError, match=r"does not divide the 6 layers"):
        validate_against_model(bad_pp, hf)


MOE_TINY = ["model.name_or_path=tiny", "model.tiny.architecture=qwen3_moe"]  # 4 experts


@pytest.mark.parametrize("overrides, pattern", [
    (["parallel.expert_model_parallel_size=2"],
     r"^config key 'parallel\.expert_model_parallel_size' = 2 needs a mixture-of-experts model; .* set it to 1$"),
    ([*MOE_TINY, "parallel.expert_model_parallel_size=3"],
     r"^config key 'parallel\.expert_model_parallel_size' = 3 does not divide the 4 experts .*; choose one of"),
    ([*MOE_TINY, "parallel.tensor_model_parallel_size=2"],
     r"^config key 'parallel\.sequence_parallel' = False: .* needs parallel\.sequence_parallel=true"),
    ([*MOE_TINY, "parallel.expert_model_parallel_size=0"], r"'parallel\.expert_model_parallel_size' = 0.*>= 1"),
    ([*MOE_TINY, "model.moe_aux_loss_coeff=-0.1"], r"'model\.moe_aux_loss_coeff' = -0\.1.*>= 0"),
    (["model.moe_aux_loss_coeff=0.01"], r"'model\.moe_aux_loss_coeff' = 0\.01 has no effect: .* remove it$"),
])
def test_expert_parallel_settings_are_checked_in_one_line(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern) as error:
        load_config(None, overrides)
    assert "\n" not in str(error.value)


def test_expert_parallelism_fits_the_world_size():
    cfg = load_config(None, [*MOE_TINY, "parallel.expert_model_parallel_size=4", "parallel.sequence_parallel=true",
                             "parallel.tensor_model_parallel_size=2"])
    assert cfg.parallel.data_parallel_size(4) == 2  # EP 4 folded over TP 2 x DP 2
    with pytest.raises(ConfigError, match=r"expert_model_parallel_size=4 x pipeline_model_parallel_size=1 must "
                                          r"divide the world size 2; choose EP in \[1, 2\]"):
        check_world_size(cfg.parallel, 2)


def test_world_size_must_be_a_multiple_of_tp_times_pp():
    cfg = load_config(None, ["model.name_or_path=tiny", "parallel.tensor_model_parallel_size=2"])
    check_world_size(cfg.parallel, 4)
    assert cfg.parallel.data_parallel_size(4) == 2
    with pytest.raises(ConfigError, match=r"world size 3 is not divisible"):
        check_world_size(cfg.parallel, 3)


@pytest.mark.parametrize("method", METHODS)
def test_yaml_round_trip(tmp_path, method):
    overrides = [f"algorithm.name={method}", "training.steps=3", "env.kwargs.level=2",
                 "data.generator_kwargs.difficulty=1d+1d", "optimizer.betas=[0.8, 0.95]"]
    cfg = load_config(None, overrides)
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(path)
    assert again == cfg
    assert config_to_yaml(again) == path.read_text()


def test_saved_yaml_omits_settings_the_method_ignores():
    text = config_to_yaml(load_config(None, ["algorithm.name=rlsd"]))
    data = yaml.safe_load(text)
    assert "sdpo" not in data["algorithm"] and "credit" not in data["algorithm"]
    assert data["algorithm"]["rlsd"]["eps_w"] == 0.2
    hybrid = yaml.safe_load(config_to_yaml(load_config(None, ["algorithm.name=credit_rlsd"])))
    assert hybrid["algorithm"]["credit"] == {"num_contrastive": 1}


def test_base_files_merge_under_the_including_file(tmp_path):
    write_yaml(tmp_path, {"training": {"steps": 5, "seed": 1}, "optimizer": {"lr": 2e-6}}, "base.yaml")
    path = write_yaml(tmp_path, {"base": "base.yaml", "training": {"steps": 9}}, "child.yaml")
    cfg = load_config(path, ["training.seed=3"])
    assert (cfg.training.steps, cfg.training.seed, cfg.optimizer.lr) == (9, 3, 2e-6)
    write_yaml(tmp_path, {"base": "loop_b.yaml"}, "loop_a.yaml")
    write_yaml(tmp_path, {"base": "loop_a.yaml"}, "loop_b.yaml")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "loop_a.yaml")


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("training: {steps: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_every_field_of_every_config_dataclass_has_a_docstring():
    import inspect

    import megacredit.config.schema as config_module

    source = inspect.getsource(config_module)
    pending, seen = [MegacreditConfig], set()
    while pending:
        cls = pending.pop()
        seen.add(cls)
        class_start = source.index(f"class {cls.__name__}")
        for field in dataclasses.fields(cls):
            start = source.index(f"    {field.name}: ", class_start)
            following = source[start:].splitlines()[1:4]
            assert any(text.strip().startswith('"""') for text in following), (cls.__name__, field.name)
            value = getattr(cls(), field.name)
            if dataclasses.is_dataclass(value) and type(value) not in seen:
                pending.append(type(value))
    assert len(seen) >= 16  # root + 11 sections + nested blocks


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_loads_and_validates(path, tmp_path):
    paper_scale = path.name.startswith(PAPER_SCALE_PREFIXES)
    cfg = load_config(path, check_paths=not paper_scale)
    assert load_config(save_config(cfg, tmp_path / path.name), check_paths=False) == cfg
    if path.name.startswith("qwen3_8b"):
        from megacredit.config.validation import validate_against_model as check

        # Qwen3-8B: 32 attention heads, 8 KV heads, 36 layers.
        check(cfg, {"num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 36})
        check_world_size(cfg.parallel, 8)
        assert cfg.optimizer.lr == 1e-6 and cfg.data.prompts_per_step == 32
        assert cfg.algorithm.group_size == 8 and cfg.rollout.engine == "sglang"
        assert cfg.rollout.max_seq_len == 18944
        if cfg.algorithm.name in ("sdpo", "credit"):
            assert cfg.algorithm.sdpo.top_k == (20 if path.stem.endswith("code") else 100)
            assert cfg.algorithm.teacher.ema_rate == 0.01
    if path.name.startswith("olmo3_7b"):
        from megacredit.config.validation import validate_against_model as check

        # OLMo-3-7B-Instruct: 32 attention heads, 32 KV heads, 32 layers; the paper's Table 3
        # (one column for both base models on science and tools).
        check(cfg, {"num_attention_heads": 32, "num_key_value_heads": 32, "num_hidden_layers": 32})
        check_world_size(cfg.parallel, 8)
        assert cfg.model.name_or_path == "allenai/Olmo-3-7B-Instruct" and cfg.rollout.engine == "vllm"
        assert cfg.optimizer.lr == 1e-6 and cfg.optimizer.warmup_steps == 10 and cfg.training.epochs == 3
        assert cfg.data.prompts_per_step == 32 and cfg.algorithm.group_size == 8
        assert cfg.training.ppo_mini_batch_size == 32 and cfg.rollout.max_seq_len == 18944
        assert cfg.algorithm.sdpo.top_k == 100 and cfg.algorithm.sdpo.alpha == 0.5
        assert cfg.algorithm.credit.lam == 0.1 and cfg.algorithm.credit.num_contrastive == 1
        assert cfg.validation.k == 16 and cfg.validation.temperature == 0.6
    if path.name.startswith("qwen3_30b_a3b"):
        from megacredit.config.validation import validate_against_model as check

        # Qwen3-30B-A3B: 32 attention heads, 4 KV heads, 48 layers, 128 experts (top-8).
        check(cfg, {"num_attention_heads": 32, "num_key_value_heads": 4, "num_hidden_layers": 48,
                    "num_experts": 128})
        check_world_size(cfg.parallel, 8)
        assert cfg.parallel.expert_model_parallel_size == 8 and cfg.parallel.sequence_parallel
        assert cfg.algorithm.name == "credit" and cfg.optimizer.lr == 1e-6


def test_demo_config_is_credit_on_smollm2():
    cfg = load_config(EXAMPLES / "credit_smollm2_arithmetic.yaml")
    assert cfg.algorithm.name == "credit" and cfg.model.name_or_path == "smollm2-135m-instruct"
    assert cfg.env.name == "arithmetic" and cfg.rollout.engine == "embedded"


def test_make_demo_runs_the_grid_credit_with_only_sdpo_teacher_wording_changed():
    """docs/results.md, Demo defaults: the demo is the replication grid's CREDIT config with the
    public SDPO code's teacher wording; nothing else may drift between the two."""
    makefile = (EXAMPLES.parent / "Makefile").read_text()
    demo_recipe = makefile[makefile.index("\ndemo:"):].split("\n\n")[0]
    assert "examples/credit_smollm2_demo.yaml" in demo_recipe
    demo = config_to_dict(load_config(EXAMPLES / "credit_smollm2_demo.yaml"))
    grid = config_to_dict(load_config(EXAMPLES / "credit_smollm2_arithmetic.yaml"))
    assert demo["algorithm"]["teacher"]["template"] == "sdpo"
    assert grid["algorithm"]["teacher"]["template"] == "credit"
    demo["algorithm"]["teacher"]["template"] = "credit"
    demo["logging"]["run_dir"] = grid["logging"]["run_dir"]
    assert demo == grid


def test_overriding_the_method_drops_the_files_other_method_settings(tmp_path):
    path = write_yaml(tmp_path, {"algorithm": {"name": "credit", "credit": {"lam": 0.05},
                                               "sdpo": {"top_k": 7}}})
    with pytest.warns(UserWarning, match=r"does not read algorithm\.credit\.lam, algorithm\.sdpo\.top_k"):
        cfg = load_config(path, ["algorithm.name=rlsd"])
    assert cfg.algorithm.name == "rlsd"
    # The dropped settings are back at their defaults, so the saved YAML round-trips.
    assert cfg.algorithm.credit.lam == 0.1 and cfg.algorithm.sdpo.top_k == 20
    assert load_config(save_config(cfg, tmp_path / "saved.yaml")) == cfg
    # Kept for a method that reads them; an override of an unread key is still an error.
    with pytest.warns(UserWarning, match=r"does not read algorithm\.credit\.lam set in"):
        assert load_config(path, ["algorithm.name=sdpo"]).algorithm.sdpo.top_k == 7
    with pytest.raises(ConfigError, match="has no effect"), pytest.warns(UserWarning):
        load_config(path, ["algorithm.name=grpo", "algorithm.sdpo.top_k=3"])


def test_epochs_resolve_to_steps():
    training = load_config(None, ["training.epochs=3"]).training
    assert training.resolved_steps(num_train_prompts=100, prompts_per_step=32) == 10  # ceil(9.375)
    assert load_config(None).training.resolved_steps(100, 32) == 100  # steps when epochs is null


def test_the_config_literal_names_every_method_of_the_table():
    """``algorithm.name``'s Literal (config/schema.py) and algorithms/methods.py list the same methods."""
    import typing

    from megacredit.config.schema import AlgorithmName

    assert sorted(typing.get_args(AlgorithmName)) == METHODS


@pytest.mark.parametrize("text, expected", [("on", "on"), ("off", "off"), ('"on"', "on"), ("auto", "auto")])
def test_a_bare_on_or_off_is_the_word_not_a_yaml_boolean(tmp_path, text, expected):
    """YAML 1.1 (PyYAML) reads an unquoted on/off as True/False; on/off fields take it as the word."""
    path = tmp_path / "te.yaml"
    path.write_text(f"model:\n  transformer_engine: {text}\n")
    assert load_config(path).model.transformer_engine == expected
    assert load_config(None, [f"model.transformer_engine={text}"]).model.transformer_engine == expected
    with pytest.raises(ConfigError, match="must be one of 'auto', 'on', 'off', got 'yes'"):
        load_config(None, ["model.transformer_engine='yes'"])
    assert load_config(None, ["logging.progress=off"]).logging.progress == "off"  # 'off' without an 'on'
    with pytest.raises(ConfigError, match="'logging.progress' must be one of 'auto', 'rich', 'plain', 'off', got True"):
        load_config(None, ["logging.progress=on"])
