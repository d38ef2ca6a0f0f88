"""Building the run's components from the config: model source, data, environment, actor, engine.

Each builder does one job and receives what it needs; the loop (megacredit.trainer.loop) only
wires them together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megacredit.algorithms.methods import METHODS
from megacredit.algorithms.objective import ObjectiveSettings
from megacredit.config import ConfigError, MegacreditConfig
from megacredit.config.validation import hf_folder_problem
from megacredit.utils.errors import one_line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TRANSFORMER_ENGINE = {"auto": None, "on": True, "off": False}
"""``model.transformer_engine`` -> ``use_transformer_engine`` of the model provider."""
BUILTIN_SMOLLM2 = "smollm2-135m-instruct"


@dataclass
class ModelSource:
    """Where the initial policy comes from."""

    hf_config: Any
    """transformers config of the policy."""
    tokenizer: Any
    """Its tokenizer (with chat template)."""
    weights: Any
    """A local HF folder (str) or an in-memory HF state dict (tiny random models)."""


def load_tokenizer(name_or_path: str, cache_dir: str, key: str = "model.name_or_path"):
    """A tokenizer from a builtin name or a local HF folder (never downloads)."""
    from transformers import AutoTokenizer

    folder = resolve_hf_dir(name_or_path, cache_dir, key)
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as error:  # no tokenizer files, or unreadable ones
        raise ConfigError(f"config key '{key}' = {name_or_path!r}: cannot load a tokenizer from "
                          f"{folder} ({one_line(error)}); the folder needs the tokenizer files") from error


def resolve_hf_dir(name_or_path: str, cache_dir: str, key: str = "model.name_or_path") -> Path:
    """The local HF folder of a builtin model name or a path; clear error when missing."""
    if name_or_path == BUILTIN_SMOLLM2:
        from megacredit.models.smollm2 import smollm2_hf_dir

        return smollm2_hf_dir(Path(cache_dir).expanduser())
    problem = hf_folder_problem(name_or_path)
    if problem is not None:
        raise ConfigError(f"config key '{key}' = {name_or_path!r}: {problem}")
    return Path(name_or_path).expanduser()


def resolve_model(cfg: MegacreditConfig) -> ModelSource:
    """The initial policy: a builtin/local HF model, or a seeded random tiny model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_cfg = cfg.model
    if model_cfg.name_or_path != "tiny":
        hf_dir = resolve_hf_dir(model_cfg.name_or_path, model_cfg.cache_dir)
        try:
            hf_config = AutoConfig.from_pretrained(str(hf_dir), local_files_only=True)
        except (OSError, ValueError) as error:  # unparsable config.json, unknown model_type
            raise ConfigError(f"config key 'model.name_or_path' = {model_cfg.name_or_path!r}: "
                              f"{hf_dir}/config.json is not a usable model config ({one_line(error)})") from error
        return ModelSource(hf_config, load_tokenizer(str(hf_dir), model_cfg.cache_dir), str(hf_dir))
    from megacredit.models.tiny import tiny_config

    tokenizer = load_tokenizer(model_cfg.tiny.tokenizer, model_cfg.cache_dir, "model.tiny.tokenizer")
    fields = model_cfg.tiny.to_hf_config_dict(len(tokenizer))
    hf_config = tiny_config(
        fields.pop("model_type"), **fields, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    # Same seed on every rank -> identical random weights everywhere, no file needed.
    with torch.random.fork_rng():
        torch.manual_seed(cfg.training.seed)
        state_dict = AutoModelForCausalLM.from_config(hf_config).state_dict()
    return ModelSource(hf_config, tokenizer, state_dict)


def build_data(cfg: MegacreditConfig) -> tuple[list[dict], list[dict]]:
    """(train records, validation records) from benchmark files or the task generator."""
    data = cfg.data
    if data.dataset is not None:
        from megacredit.data.loaders import load_benchmark

        train = load_benchmark(data.dataset, data.train_path, skip_invalid_rows=data.skip_invalid_rows)
        val = load_benchmark(data.dataset, data.val_path or data.train_path, skip_invalid_rows=data.skip_invalid_rows)
        for key, loaded in (("data.train_path", train), ("data.val_path", val)):
            if not loaded.records:
                raise ConfigError(f"config key '{key}': {loaded.source} holds no usable rows "
                                  f"({loaded.num_skipped} malformed row(s) skipped)")
        return train.records, val.records
    if cfg.env.name != "arithmetic" and ":" not in cfg.env.name:
        raise ConfigError(
            f"env.name={cfg.env.name!r} has no problem generator: set data.dataset and data.train_path "
            f"(only arithmetic problems are generated; a custom 'module:Class' env may score them)"
        )
    from megacredit.envs.arithmetic import generate_arithmetic_dataset

    seed = cfg.training.seed
    try:
        train = generate_arithmetic_dataset(data.num_generated_train, seed, id_prefix="train", **data.generator_kwargs)
        val = generate_arithmetic_dataset(data.num_generated_val, seed + 1, id_prefix="val", **data.generator_kwargs)
    except (TypeError, ValueError) as error:  # an unknown keyword or difficulty
        raise ConfigError(f"config key 'data.generator_kwargs' = {data.generator_kwargs!r}: {error}") from error
    return train, val


def build_env(cfg: MegacreditConfig):
    """The environment named by ``cfg.env``."""
    from megacredit.envs.registry import make_env

    try:
        return make_env(cfg.env.name, **cfg.env.kwargs)
    except (ImportError, TypeError, ValueError) as error:  # unimportable, not an Environment, bad kwargs
        raise ConfigError(f"config key 'env.name' = {cfg.env.name!r} with env.kwargs={cfg.env.kwargs!r}: "
                          f"{one_line(error)}") from error


def build_actor(cfg: MegacreditConfig, ctx, source: ModelSource, progress=None):
    """This rank's Megatron actor: model (weights loaded), DDP, optimizer, teacher; ``progress``
    (a megacredit.utils.progress reporter) shows its passes."""
    from megacredit.megatron.actor import ActorSettings, MegatronActor
    from megacredit.megatron.bridge import load_hf_weights
    from megacredit.megatron.model_provider import build_gpt_model, recompute_overrides
    from megacredit.megatron.optimizer import OptimizerSettings, build_optimizer, wrap_with_ddp
    from megacredit.megatron.packed_attention import enable_packed_attention
    from megacredit.megatron.teacher import TeacherWeights

    dtype = DTYPES[cfg.model.dtype]
    use_te = TRANSFORMER_ENGINE[cfg.model.transformer_engine]
    moe = {} if cfg.model.moe_aux_loss_coeff is None else {"moe_aux_loss_coeff": cfg.model.moe_aux_loss_coeff}
    par = cfg.parallel
    model = build_gpt_model(source.hf_config, ctx, dtype=dtype, use_transformer_engine=use_te,
                            sequence_parallel=par.sequence_parallel, **moe,
                            **recompute_overrides(par.recompute, par.recompute_method, par.recompute_num_layers,
                                                  par.recompute_modules))
    # Keep Megatron's random init although the HF weights overwrite it: with CPU initialisation,
    # perform_initialization=False also skips tagging the weights tensor-parallel, and the
    # gradient norm (and clipping) then miscounts TP shards (caught by the TP=2 e2e test).
    enable_packed_attention(model)
    load_hf_weights([model], source.weights, source.hf_config, ctx)
    opt = cfg.optimizer
    chunks = wrap_with_ddp([model], use_distributed_optimizer=opt.use_distributed_optimizer)
    optimizer = build_optimizer(chunks, OptimizerSettings(
        lr=opt.lr, weight_decay=opt.weight_decay, adam_beta1=opt.betas[0], adam_beta2=opt.betas[1],
        adam_eps=opt.eps, clip_grad=opt.clip_grad, use_distributed_optimizer=opt.use_distributed_optimizer,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
    ))
    algorithm = cfg.algorithm
    teacher = None
    if METHODS[algorithm.name].teacher_pass:
        teacher = TeacherWeights(chunks, algorithm.teacher.kind, algorithm.teacher.ema_rate, algorithm.teacher.sync_every,
                                 on_host=algorithm.teacher.offload_to_host)
    settings = ActorSettings(
        objective=objective_settings(cfg), top_k=algorithm.sdpo.top_k, topk_source=algorithm.sdpo.topk_source,
        token_budget=cfg.parallel.micro_batch_tokens, pad_token_id=source.tokenizer.pad_token_id or 0,
        temperature=cfg.rollout.temperature if cfg.rollout.score_at_temperature else 1.0,
    )
    return MegatronActor(chunks, optimizer, teacher, ctx, settings, progress)


def objective_settings(cfg: MegacreditConfig) -> ObjectiveSettings:
    """The loss hyperparameters of ``cfg.algorithm``."""
    algorithm = cfg.algorithm
    return ObjectiveSettings(
        method=algorithm.name, clip_eps_low=algorithm.clip_eps_low, clip_eps_high=algorithm.clip_eps_high,
        dual_clip_c=algorithm.dual_clip_c,
        loss_agg_mode=algorithm.loss_agg_mode, alpha=algorithm.sdpo.alpha, tail=algorithm.sdpo.tail,
        is_clip=algorithm.sdpo.is_clip, credit_lam=algorithm.credit.lam, eps_w=algorithm.rlsd.eps_w,
    )


def build_engine(cfg: MegacreditConfig, source: ModelSource, ctx=None):
    """This rank's rollout engine, or None on ranks without one; its weights come from the actor
    through the weight sync (docs/engines.md).

    embedded: our sampler on global rank 0. vllm colocated: one ``vllm.LLM`` on rank 0 over the
    job's devices (engine tensor-parallel size = world size), started from the policy's HF folder
    (a tiny model's is written under the run directory); in this process when the job has one
    rank, in vLLM's own engine processes otherwise.
    remote: rank 0 drives ``rollout.urls`` as an EnginePool (failover: docs/reliability.md); SGLang: ``_build_sglang``.
    """
    rank = 0 if ctx is None else ctx.rank
    world = 1 if ctx is None else ctx.world_size
    ro = cfg.rollout
    if ro.engine != "embedded" and ro.placement == "colocated" and world not in (1, ro.engine_tensor_parallel_size):
        raise NotImplementedError(
            f"rollout.placement=colocated with {world} ranks needs one engine over all of them "
            f"(rollout.engine_tensor_parallel_size={world}); one engine per smaller group of ranks is not "
            f"implemented yet: start the engines as servers and use rollout.placement=remote (docs/engines.md)")
    memory = None
    if ro.engine == "vllm" and ro.placement == "colocated" and torch.cuda.is_available():
        from megacredit.rollout.engine_memory import least_free_device_memory

        memory = least_free_device_memory()  # on every rank: what the actor left on the engine's GPUs
    if rank != 0:
        return None
    if ro.engine == "embedded":
        from megacredit.rollout.embedded import EmbeddedRolloutEngine

        return EmbeddedRolloutEngine.from_config(
            source.hf_config, dtype=DTYPES[cfg.model.dtype], max_batch_size=ro.batch_size,
            eos_token_ids=[source.tokenizer.eos_token_id], pad_token_id=source.tokenizer.pad_token_id,
        )
    if ro.engine == "vllm":
        return _build_vllm(cfg, source, world, memory)
    return _build_sglang(cfg, source, engine_model_dir(cfg, source))


def engine_model_dir(cfg: MegacreditConfig, source: ModelSource) -> Path:
    """The HF folder an engine starts from: the policy's own, or (tiny in-memory models) one
    written to ``<run_dir>/engine_model`` with the tokenizer."""
    if isinstance(source.weights, str):
        return Path(source.weights)
    from transformers import AutoModelForCausalLM

    out = Path(cfg.logging.run_dir) / "engine_model"
    model = AutoModelForCausalLM.from_config(source.hf_config)
    model.load_state_dict(source.weights)
    model.to(DTYPES[cfg.model.dtype]).save_pretrained(out)
    source.tokenizer.save_pretrained(out)
    return out


def _build_vllm(cfg: MegacreditConfig, source: ModelSource, world: int, memory: tuple[int, int] | None):
    """``memory``: (free, total) bytes of the engine's GPUs after the actor was built (None on CPU)."""
    ro = cfg.rollout
    if ro.placement == "remote":
        from megacredit.rollout.http_json import EngineHTTPError
        from megacredit.rollout.pool import EnginePool
        from megacredit.rollout.vllm_server import VLLMServerEngine, server_sync_backend

        # own checkpoint each; buckets via /dev/shm or NCCL/gloo; the pool survives faults (docs/reliability.md)
        backend = server_sync_backend(ro.sync_transport, ro.urls, torch.cuda.is_available())
        try:
            engines = [VLLMServerEngine(url, timeout=ro.request_timeout_s, sync_backend=backend) for url in ro.urls]
        except EngineHTTPError as error:
            raise ConfigError(f"config key 'rollout.urls' = {ro.urls!r}: {one_line(error)} (start them first)") from error
        return EnginePool(engines, max_faults=ro.max_engine_faults)
    from megacredit.rollout.vllm import VLLMRolloutEngine

    model_dir = engine_model_dir(cfg, source)
    args = {"dtype": cfg.model.dtype, "tensor_parallel_size": ro.engine_tensor_parallel_size,
            "max_model_len": min(ro.max_seq_len, getattr(source.hf_config, "max_position_embeddings", ro.max_seq_len)),
            "seed": cfg.training.seed, "enforce_eager": not torch.cuda.is_available()}
    if memory is not None:
        args.update(enable_sleep_mode=True, gpu_memory_utilization=vllm_memory_fraction(
            cfg, source.hf_config, model_dir, args["max_model_len"], memory))
    return VLLMRolloutEngine(model_dir, in_process=world == 1, **{**args, **ro.engine_kwargs})


def vllm_memory_fraction(cfg: MegacreditConfig, hf_config: Any, model_dir: Path, max_model_len: int,
                         memory: tuple[int, int]) -> float:
    """``rollout.gpu_memory_utilization``, lowered to what the actor left free (vLLM refuses to
    start otherwise; megacredit/rollout/engine_memory.py), keeping two sync buckets free."""
    from megacredit.rollout.checkpoint_manifest import checkpoint_manifest
    from megacredit.rollout.engine_memory import CONTEXT_RESERVE_BYTES, colocated_fraction, engine_need

    ro = cfg.rollout
    need = engine_need(checkpoint_manifest(model_dir), hf_config, max_model_len, DTYPES[cfg.model.dtype],
                       ro.engine_tensor_parallel_size)
    reserve = 2 * ro.sync_bucket_mb * (1 << 20) + CONTEXT_RESERVE_BYTES
    return colocated_fraction(ro.gpu_memory_utilization, *memory, need, reserve)


def _build_sglang(cfg: MegacreditConfig, source: ModelSource, model_dir: Path):
    """SGLang (verified on CPU with SGLang 0.5.23; CUDA unverified). remote: an EnginePool of one engine per
    server, or one engine over a router (no failover); weights by broadcast (NCCL with CUDA, gloo without).
    colocated: an ``sglang.Engine`` from the policy's HF folder (megacredit/rollout/sglang.py)."""
    ro = cfg.rollout
    cuda = torch.cuda.is_available()
    if ro.placement == "remote":
        from megacredit.rollout.pool import EnginePool
        from megacredit.rollout.sglang_server import SGLangServerEngine

        remote = {"model_path": model_dir, "timeout": ro.request_timeout_s, "sync_backend": "nccl" if cuda else "gloo"}
        if ro.router_url:  # SGLang's router routes: one engine
            return SGLangServerEngine(ro.urls, router_url=ro.router_url, **remote)
        return EnginePool([SGLangServerEngine([url], **remote) for url in ro.urls], max_faults=ro.max_engine_faults)
    from megacredit.rollout.sglang import SGLangRolloutEngine

    args = {"dtype": cfg.model.dtype, "random_seed": cfg.training.seed,
            "context_length": min(ro.max_seq_len, getattr(source.hf_config, "max_position_embeddings", ro.max_seq_len))}
    if cuda:
        args.update(mem_fraction_static=ro.gpu_memory_utilization, enable_memory_saver=True)
    return SGLangRolloutEngine(model_dir, tp_size=ro.engine_tensor_parallel_size, **{**args, **ro.engine_kwargs})
