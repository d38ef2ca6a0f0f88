"""The rollout-engine interface: sampling parameters, outputs, and the abstract engine.

Every inference engine megacredit can drive (the embedded CPU engine in ``embedded.py``, the
SGLang and vLLM adapters) implements :class:`RolloutEngine`. The trainer only ever talks to
this interface:

* ``generate(prompt_token_ids, params)`` returns one :class:`RolloutOutput` per sample;
* ``load_weights(named_tensors)`` receives the trained weights as a stream of
  ``(hf_name, full_tensor)`` pairs in Hugging Face naming (what the Megatron -> HF bridge
  exports), and ``update_weights_from_buckets(buckets)`` is the same for the bucketed stream;
* ``sleep()`` / ``wake()`` let a colocated engine release and re-take memory around training
  (no-ops by default).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Mapping, Sequence, Union

import torch

FinishReason = Literal["stop", "length"]

NamedTensor = tuple[str, torch.Tensor]
#: One bucket of the weight stream: a sequence of ``(hf_name, tensor)`` pairs or a mapping.
WeightBucket = Union[Sequence[NamedTensor], Mapping[str, torch.Tensor]]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample responses. Validated on construction; errors name the field and the fix."""

    # Softmax temperature; 0 means greedy (argmax). Must be a finite number >= 0.
    temperature: float = 1.0
    # Nucleus sampling: keep the smallest set of tokens whose probability mass reaches top_p
    # (after temperature). 1.0 disables it. Must be in (0, 1].
    top_p: float = 1.0
    # Keep only the top_k most likely tokens (after temperature). -1 disables it.
    top_k: int = -1
    # Maximum number of tokens generated per sample (the stop token counts as one).
    max_new_tokens: int = 128
    # Token ids that end a sample (EOS ids); the stop token is included in the output.
    # None means "the engine's default EOS ids" (from the model's config); () means never stop.
    stop_token_ids: tuple[int, ...] | None = None
    # Number of samples per prompt (a GRPO group); outputs are grouped prompt by prompt.
    n: int = 1
    # Seed of the sampling generator; same seed + same prompts + same weights -> same samples.
    # None draws from torch's global RNG.
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise TypeError(
                f"SamplingParams.temperature must be a number, got {self.temperature!r}"
            )
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(
                f"SamplingParams.temperature must be a finite number >= 0 (0 = greedy), "
                f"got {self.temperature!r}"
            )
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)):
            raise TypeError(f"SamplingParams.top_p must be a number, got {self.top_p!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(
                f"SamplingParams.top_p must be in (0, 1] (1.0 disables nucleus sampling), "
                f"got {self.top_p!r}"
            )
        if not _is_int(self.top_k) or not (self.top_k == -1 or self.top_k >= 1):
            raise ValueError(
                f"SamplingParams.top_k must be -1 (off) or a positive integer, got {self.top_k!r}"
            )
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(
                f"SamplingParams.max_new_tokens must be a positive integer, "
                f"got {self.max_new_tokens!r}"
            )
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"SamplingParams.n (samples per prompt) must be >= 1, got {self.n!r}")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise ValueError(
                f"SamplingParams.seed must be None or a non-negative integer, got {self.seed!r}"
            )
        if self.stop_token_ids is not None:
            ids = tuple(self.stop_token_ids)
            if not all(_is_int(t) and t >= 0 for t in ids):
                raise ValueError(
                    f"SamplingParams.stop_token_ids must be non-negative token ids "
                    f"(or None for the model's EOS), got {self.stop_token_ids!r}"
                )
            object.__setattr__(self, "stop_token_ids", ids)

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax (temperature 0)."""
        return self.temperature == 0


@dataclass
class RolloutOutput:
    """One generated sample."""

    # Index of the prompt this sample answers, in the list passed to generate().
    prompt_index: int
    # The prompt's token ids, unchanged (no padding).
    prompt_ids: list[int]
    # Generated token ids; when finish_reason == "stop" the last one is the stop token.
    token_ids: list[int]
    # log pi(token | prefix) of each generated token under the model's raw logits at
    # temperature 1, over the full vocabulary (not the tempered / truncated sampling
    # distribution). Same length as token_ids. A diagnostic: the trainer recomputes old
    # log-probs with its own forward.
    logprobs: list[float]
    # "stop" when a stop token was generated, "length" when max_new_tokens was reached.
    finish_reason: FinishReason

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(
                f"RolloutOutput: token_ids ({len(self.token_ids)}) and logprobs "
                f"({len(self.logprobs)}) must have the same length"
            )


@dataclass
class WeightLoadReport:
    """What one ``load_weights`` call copied into the engine."""

    # Number of (name, tensor) pairs received and copied.
    num_tensors: int = 0
    # Bytes received (numel * element size of the incoming tensors).
    num_bytes: int = 0
    # Engine parameters (HF names) that the stream did not touch; empty after a full sync.
    # Tied parameters count as loaded when any of their names was received. None when the
    # engine cannot tell (external engines load inside their own processes).
    missing_names: list[str] | None = None


def iterate_buckets(buckets: Iterable[WeightBucket]) -> Iterable[NamedTensor]:
    """Flatten a stream of buckets (sequences of pairs or name->tensor mappings) into pairs."""
    for bucket in buckets:
        if isinstance(bucket, Mapping):
            yield from bucket.items()
        else:
            yield from bucket


def rebucket(
    named_tensors: Iterable[NamedTensor], max_bucket_bytes: int
) -> Iterable[list[NamedTensor]]:
    """Group a stream of pairs into lists of at most ``max_bucket_bytes`` (a larger single
    tensor gets a bucket of its own). Used by engines that take weights in batches."""
    if max_bucket_bytes < 1:
        raise ValueError(f"max_bucket_bytes must be >= 1, got {max_bucket_bytes}")
    bucket: list[NamedTensor] = []
    bucket_bytes = 0
    for name, tensor in named_tensors:
        size = tensor.numel() * tensor.element_size()
        if bucket and bucket_bytes + size > max_bucket_bytes:
            yield bucket
            bucket, bucket_bytes = [], 0
        bucket.append((name, tensor))
        bucket_bytes += size
    if bucket:
        yield bucket


class RolloutEngine(ABC):
    """An inference engine that samples responses and accepts HF-named weight updates."""

    @abstractmethod
    def generate(
        self, prompt_token_ids: list[list[int]], params: SamplingParams,
        *, progress: Callable[[int], None] | None = None,
    ) -> list[RolloutOutput]:
        """Sample ``params.n`` responses per prompt.

        Returns ``len(prompt_token_ids) * params.n`` outputs, grouped by prompt: outputs
        ``[i * n, (i + 1) * n)`` answer prompt ``i``. ``progress(count)``, if given, is called
        as ``count`` more samples finish (engines that cannot tell call it once at the end).
        """

    @abstractmethod
    def load_weights(self, named_tensors: Iterable[NamedTensor]) -> WeightLoadReport:
        """Copy ``(hf_name, full_tensor)`` pairs into the engine's model."""

    def update_weights_from_buckets(self, buckets: Iterable[WeightBucket]) -> WeightLoadReport:
        """Load the bucketed HF-named weight stream (each bucket: pairs or a mapping)."""
        return self.load_weights(iterate_buckets(buckets))

    def sleep(self) -> None:
        """Release memory while the trainer runs (no-op unless the engine overrides it)."""

    def wake(self) -> None:
        """Re-take memory before the next rollout (no-op unless the engine overrides it)."""
