"""The embedded rollout engine: megacredit's default (CPU) inference engine.

It holds a Hugging Face ``transformers`` causal LM (built from a config without download, or
loaded from a local folder) in eval / no-grad mode and runs its own batched sampling loop:

* prompts are micro-batched (``max_batch_size`` rows at a time, sorted by length to limit
  padding), left-padded, with an attention mask and position ids that start at 0 on each
  row's first real token;
* one prefill forward over the DISTINCT prompts of the micro-batch (a prompt's ``n`` samples
  share it): the prompt's KV-cache rows are then copied to each of its samples
  (``DynamicCache.batch_select_indices`` with a repeating index), so a prompt is prefilled
  once per micro-batch instead of once per sample;
* then one token per step through the model's KV cache (a transformers ``DynamicCache``
  passed with the current cache API: the ``cache`` argument of transformers >= 5.24, the
  ``past_key_values`` argument, deprecated there, only on versions whose forward has no
  ``cache`` argument; the unit tests pass on 5.24 and 5.23),
  computing logits for the last position only;
* a row stops when it samples one of the stop (EOS) ids, the stop token included in its
  output; finished rows are dropped from the batch and its cache, the rest continue until
  all are finished or ``max_new_tokens`` is reached;
* temperature / top-k / top-p sampling with a seeded ``torch.Generator`` (greedy at T=0);
* the returned log-probs are ``log_softmax(logits / T)`` over the full vocabulary at the sampled
  tokens (T = the sampling temperature; 1 when greedy): the tempered distribution that was
  sampled, before top-k / top-p truncation, which is what the trainer scores (RolloutOutput).
  They are a diagnostic and the rollout-IS input: the trainer recomputes the old-policy
  log-probs with its own forward.

Because it only uses the generic ``AutoModelForCausalLM`` forward, every decoder-only family
transformers supports works (tested: Llama, Qwen2, Qwen3, OLMo-3, Qwen3-MoE).

Weights arrive through ``load_weights`` as ``(hf_name, full_tensor)`` pairs, exactly what the
Megatron -> HF bridge exports, and are copied in place into the existing parameters.
"""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import Callable, Iterable

import torch
from transformers import AutoModelForCausalLM, DynamicCache, PretrainedConfig, PreTrainedModel

from megacredit.rollout.base import (
    NamedTensor,
    RolloutEngine,
    RolloutOutput,
    SamplingParams,
    WeightLoadReport,
    WeightManifest,
    request_seed,
)
from megacredit.rollout.expert_names import per_expert_views
from megacredit.rollout.sampling import (
    choose_next_tokens,
    left_pad,
    positions_from_mask,
    token_logprobs,
)


def _as_id_tuple(value: int | Iterable[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def cache_argument_name(model: PreTrainedModel) -> str:
    """The keyword under which ``model.forward`` takes its KV cache.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns and goes
    away in 5.40); older versions (5.23 and before) only know ``past_key_values``.
    """
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def new_dynamic_cache(config: PretrainedConfig) -> DynamicCache:
    """An empty ``DynamicCache`` laid out for ``config`` (per-layer types where supported)."""
    if "config" in inspect.signature(DynamicCache.__init__).parameters:
        return DynamicCache(config=config)
    return DynamicCache()


ProgressCallback = Callable[[int], None]
"""``progress(count)``: called with the number of samples that just finished."""


def default_eos_token_ids(model: PreTrainedModel) -> tuple[int, ...]:
    """EOS ids of a model: its generation config's, else its model config's."""
    generation_config = getattr(model, "generation_config", None)
    ids = _as_id_tuple(getattr(generation_config, "eos_token_id", None))
    return ids or _as_id_tuple(getattr(model.config, "eos_token_id", None))


class EmbeddedRolloutEngine(RolloutEngine):
    """Batched KV-cache sampling on a transformers causal LM (see the module docstring)."""

    reads_buckets_in_call = True  # load_weights copies every tensor into its parameter

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        max_batch_size: int = 64,
        eos_token_ids: Iterable[int] | None = None,
        pad_token_id: int | None = None,
        share_prompt_prefill: bool = True,
    ) -> None:
        """Wrap ``model`` (put in eval mode, gradients off).

        max_batch_size: rows per micro-batch (prompts x n), bounds the KV-cache memory.
        eos_token_ids: default stop ids when ``SamplingParams.stop_token_ids`` is None
            (defaults to the model's generation / model config EOS ids).
        pad_token_id: id written in the left padding (masked out; any valid id works).
        share_prompt_prefill: prefill each distinct prompt of a micro-batch once and copy its
            KV cache to its samples (default). False prefills every sample on its own, as the
            engine did before; kept as the reference of tests and benchmarks.
        """
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.max_batch_size = max_batch_size
        self.eos_token_ids = (
            tuple(eos_token_ids) if eos_token_ids is not None else default_eos_token_ids(model)
        )
        config_pad = getattr(model.config, "pad_token_id", None)
        self.pad_token_id = pad_token_id if pad_token_id is not None else (config_pad or 0)
        self.vocab_size = int(model.get_input_embeddings().weight.shape[0])
        self.share_prompt_prefill = bool(share_prompt_prefill)
        self._cache_argument = cache_argument_name(model)

    # ----------------------------------------------------------------------------- builders
    @classmethod
    def from_config(
        cls, config: PretrainedConfig, *, dtype: torch.dtype = torch.float32, **engine_kwargs
    ) -> "EmbeddedRolloutEngine":
        """A randomly initialised model from a HF config (no download); load weights later."""
        model = AutoModelForCausalLM.from_config(config).to(dtype)
        return cls(model, **engine_kwargs)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, dtype: torch.dtype = torch.float32, **engine_kwargs
    ) -> "EmbeddedRolloutEngine":
        """Load a local Hugging Face folder (never downloads)."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"EmbeddedRolloutEngine.from_pretrained: {path} is not a Hugging Face model "
                f"folder (no config.json); pass a local folder written by save_pretrained"
            )
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(dtype)
        return cls(model, **engine_kwargs)

    # ---------------------------------------------------------------------------- generate
    def generate(
        self, prompt_token_ids: list[list[int]], params: SamplingParams,
        *, progress: ProgressCallback | None = None,
    ) -> list[RolloutOutput]:
        """Sample ``params.n`` responses per prompt; outputs grouped prompt by prompt.

        Output ``i * n + j`` is sample ``j`` of prompt ``i``. Rows are processed in
        micro-batches of ``max_batch_size`` after a stable sort by prompt length, so with a
        seed the samples are reproducible for the same prompts, weights and max_batch_size
        (and the same machine and library versions: a change of batch shape or kernel can move
        float rounding). ``progress(count)``, if given, is called as samples finish.

        The prompt-prefill sharing computes the same values as one prefill per sample up to
        float rounding (the matmuls see fewer rows): on tiny models the tokens and log-probs
        are bit-identical, on SmolLM2-135M the logits move by up to ~5e-5 and a seeded sample can in
        rare cases pick a different token (tests/unit/test_rollout_embedded.py,
        tests/integration/test_rollout_smollm2.py).
        """
        self._check_prompts(prompt_token_ids, params)
        stop_ids = self.eos_token_ids if params.stop_token_ids is None else params.stop_token_ids
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(
                request_seed(params.seed, params.seed_offset))
        rows = [(i, p) for i, p in enumerate(prompt_token_ids) for _ in range(params.n)]
        order = sorted(range(len(rows)), key=lambda r: len(rows[r][1]))
        outputs: list[RolloutOutput | None] = [None] * len(rows)
        for start in range(0, len(order), self.max_batch_size):
            chunk = order[start:start + self.max_batch_size]
            results = self._generate_micro_batch(
                [list(rows[r][1]) for r in chunk], params, stop_ids, generator, progress
            )
            for r, (tokens, logprobs, reason) in zip(chunk, results):
                prompt_index, prompt = rows[r]
                outputs[r] = RolloutOutput(prompt_index, list(prompt), tokens, logprobs, reason)
        return outputs  # type: ignore[return-value]

    def _check_prompts(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"generate: params must be a SamplingParams, got {type(params)}")
        if not isinstance(prompt_token_ids, (list, tuple)) or not prompt_token_ids:
            raise ValueError(
                "generate: prompt_token_ids must be a non-empty list of token-id lists"
            )
        max_positions = getattr(self.model.config, "max_position_embeddings", None)
        for index, prompt in enumerate(prompt_token_ids):
            if isinstance(prompt, (str, bytes)) or not hasattr(prompt, "__len__") or not prompt:
                raise ValueError(
                    f"generate: prompt_token_ids[{index}] must be a non-empty list of token ids "
                    f"(tokenize text first), got {prompt!r:.80}"
                )
            if min(prompt) < 0 or max(prompt) >= self.vocab_size:
                raise ValueError(
                    f"generate: prompt_token_ids[{index}] has a token id outside "
                    f"[0, {self.vocab_size}) (the model's vocabulary)"
                )
            if max_positions and len(prompt) + params.max_new_tokens > max_positions:
                raise ValueError(
                    f"generate: prompt_token_ids[{index}] has {len(prompt)} tokens + "
                    f"max_new_tokens={params.max_new_tokens} > the model's "
                    f"max_position_embeddings={max_positions}; shorten the prompt or lower "
                    f"max_new_tokens"
                )

    def _forward(self, input_ids, attention_mask, position_ids, cache: DynamicCache) -> torch.Tensor:
        """One cached forward; returns the last position's logits [B, V] (cache grows in place)."""
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=True, logits_to_keep=1, **{self._cache_argument: cache},
        )
        return out.logits[:, -1, :]

    def _prefill(
        self, prompts: list[list[int]], cache: DynamicCache, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prefill ``prompts`` (one per row) into ``cache``; returns the rows' last-position
        logits [B, V], attention mask [B, L] and next position ids [B, 1].

        With ``share_prompt_prefill`` the forward runs on the distinct prompts only; their
        cache rows, logits and masks are then copied to every row holding that prompt.
        """
        if self.share_prompt_prefill:
            distinct = list(dict.fromkeys(tuple(p) for p in prompts))
            slot = {prompt: index for index, prompt in enumerate(distinct)}
            expand = torch.tensor([slot[tuple(p)] for p in prompts], device=device)
        else:
            distinct, expand = [tuple(p) for p in prompts], None
        input_ids, attention_mask = left_pad([list(p) for p in distinct], self.pad_token_id)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        position_ids = positions_from_mask(attention_mask)
        logits = self._forward(input_ids, attention_mask, position_ids, cache)
        if expand is not None and len(distinct) < len(prompts):
            cache.batch_select_indices(expand)
            logits, attention_mask, position_ids = logits[expand], attention_mask[expand], position_ids[expand]
        return logits, attention_mask, position_ids[:, -1:] + 1

    @torch.inference_mode()
    def _generate_micro_batch(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        stop_ids: tuple[int, ...],
        generator: torch.Generator | None,
        progress: ProgressCallback | None = None,
    ) -> list[tuple[list[int], list[float], str]]:
        """Run the KV-cache loop on one left-padded micro-batch."""
        device = self.model.get_input_embeddings().weight.device
        cache = new_dynamic_cache(self.model.config)
        logits, attention_mask, next_position = self._prefill(prompts, cache, device)
        stop_tensor = torch.tensor(stop_ids, dtype=torch.long, device=device)
        tokens: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        reasons = ["length"] * len(prompts)
        live_rows = list(range(len(prompts)))  # original row of each row still in the batch
        for step in range(params.max_new_tokens):
            if step > 0:
                logits = self._forward(sampled.unsqueeze(-1), attention_mask, next_position, cache)
                next_position = next_position + 1
            sampled = choose_next_tokens(logits, params, generator)
            sampled_logprobs = token_logprobs(logits, sampled, 1.0 if params.greedy else params.temperature)
            finished = torch.isin(sampled, stop_tensor)
            for row, token, logprob, done in zip(
                live_rows, sampled.tolist(), sampled_logprobs.tolist(), finished.tolist()
            ):
                tokens[row].append(token)
                logprobs[row].append(logprob)
                if done:
                    reasons[row] = "stop"
            last = step == params.max_new_tokens - 1 or bool(finished.all())
            done_now = len(live_rows) if last else int(finished.sum())
            if progress is not None and done_now:
                progress(done_now)
            if last:
                break
            if bool(finished.any()):
                keep = (~finished).nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                live_rows = [live_rows[i] for i in keep.tolist()]
                sampled, attention_mask, next_position = (
                    sampled[keep], attention_mask[keep], next_position[keep]
                )
            new_column = attention_mask.new_ones((len(live_rows), 1))
            attention_mask = torch.cat([attention_mask, new_column], dim=1)
        return [(tokens[r], logprobs[r], reasons[r]) for r in range(len(prompts))]

    # ----------------------------------------------------------------------------- scoring
    @torch.inference_mode()
    def score_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """log pi(s[t] | s[:t]) for t >= 1 of each sequence (raw logits, T=1, full vocab)."""
        if not sequences or any(len(s) < 2 for s in sequences):
            raise ValueError("score_logprobs: give a non-empty list of sequences of >= 2 tokens")
        device = self.model.get_input_embeddings().weight.device
        scores: list[list[float]] = []
        for start in range(0, len(sequences), self.max_batch_size):
            chunk = [list(s) for s in sequences[start:start + self.max_batch_size]]
            input_ids, attention_mask = left_pad(chunk, self.pad_token_id)
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                position_ids=positions_from_mask(attention_mask)).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            picked = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
            width = input_ids.shape[1]
            scores.extend(picked[row, width - len(s):].tolist() for row, s in enumerate(chunk))
        return scores

    # ------------------------------------------------------------------------- weight sync
    def weight_manifest(self) -> WeightManifest:
        return {name: tuple(t.shape) for name, t in self._named_targets().items()}

    def read_weights(self) -> dict[str, torch.Tensor]:
        return {name: t.detach() for name, t in self._named_targets().items()}

    def missing_weight_names(self, received: set[str]) -> list[str]:
        targets = self._named_targets()
        loaded = {targets[name].data_ptr() for name in received if name in targets}
        return sorted(name for name, t in targets.items() if t.data_ptr() not in loaded)

    def _named_targets(self) -> dict[str, torch.Tensor]:
        """Every loadable tensor by HF checkpoint name; tied weights appear under each of their
        names, fused MoE experts as one view per expert (megacredit/rollout/expert_names.py)."""
        return per_expert_views(self.model.state_dict(keep_vars=True))

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[NamedTensor]) -> WeightLoadReport:
        """Copy ``(hf_name, full_tensor)`` pairs in place into the model's parameters.

        No parameter is reallocated (``copy_`` into the existing storage, casting dtype and
        device as needed), so references held elsewhere stay valid. An unknown name or a
        shape mismatch raises ``KeyError`` / ``ValueError`` naming the tensor; tensors
        copied before the error stay copied. For tied embeddings the stream may omit
        ``lm_head.weight`` (it is the embedding). Returns how many tensors and bytes were
        loaded and which parameters the stream did not touch.
        """
        targets = self._named_targets()
        report = WeightLoadReport(missing_names=[])
        loaded_storages: set[int] = set()
        for name, tensor in named_tensors:
            target = targets.get(name)
            if target is None:
                raise KeyError(self._unknown_name_message(name, targets))
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(
                    f"load_weights: '{name}' must be a torch.Tensor, got {type(tensor)}"
                )
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(
                    f"load_weights: tensor '{name}' has shape {tuple(tensor.shape)} but the "
                    f"engine's parameter has shape {tuple(target.shape)}; the exported model and "
                    f"the engine's config disagree (vocab padding not removed? different "
                    f"num_key_value_heads / hidden size?)"
                )
            target.data.copy_(tensor)
            loaded_storages.add(target.data_ptr())
            report.num_tensors += 1
            report.num_bytes += tensor.numel() * tensor.element_size()
        report.missing_names = sorted(
            name for name, target in targets.items() if target.data_ptr() not in loaded_storages
        )
        return report

    def _unknown_name_message(self, name: str, targets: dict[str, torch.Tensor]) -> str:
        close = difflib.get_close_matches(name, list(targets), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return (
            f"load_weights: unknown tensor name '{name}': not a parameter of the engine's "
            f"{type(self.model).__name__}{hint} Names must use Hugging Face naming, e.g. "
            f"'model.layers.0.self_attn.q_proj.weight'"
        )
