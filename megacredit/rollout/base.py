"""The rollout-engine interface: sampling parameters, outputs, weight updates, the abstract engine.

Every inference engine megacredit can drive (the embedded CPU engine in ``embedded.py``, the
vLLM adapter in ``vllm.py``, the SGLang adapter in ``sglang.py``, and the data-parallel
:class:`~megacredit.rollout.pool.EnginePool` over several of them) implements
:class:`RolloutEngine`. The trainer only ever talks to this interface:

* ``generate(prompt_token_ids, params)`` returns one :class:`RolloutOutput` per sample, each
  with the engine's log-probs of its sampled tokens (raw logits, temperature 1, full vocab);
* ``score_logprobs(sequences)`` scores given token sequences (the weight-sync probe);
* ``update_weights_from_buckets(buckets, manifest)`` is THE weight-update entry point: the
  trained weights as a stream of buckets of ``(hf_name, full_tensor)`` pairs in Hugging Face
  naming (what the Megatron -> HF bridge exports). The whole manifest of names and shapes is
  validated against the engine before anything is copied, so a wrong name or shape raises
  and leaves the previous weights in place. ``load_weights(named_tensors)`` is the engine's
  low-level copy that the entry point drives;
* ``sleep()`` / ``wake()`` let a colocated engine release and re-take memory around training;
  ``shutdown()`` releases the engine for good (processes, servers it started, memory);
* ``health_problem()`` / ``restart()``: a server's health check, and a restart of a server
  megacredit started; an engine that died or hung raises :class:`EngineUnavailableError`, which
  an :class:`~megacredit.rollout.pool.EnginePool` survives (docs/reliability.md).
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
    # Index, in the step's whole batch, of this call's first prompt. Engines that seed every
    # request on its own (vLLM, SGLang) sample prompt i of the call with
    # ``request_seed(seed, seed_offset + i)``, so a batch split across engines (EnginePool)
    # samples what one engine samples for the whole batch. The embedded engine draws all rows
    # of a call from one generator seeded with ``request_seed(seed, seed_offset)``.
    seed_offset: int = 0

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
        if not _is_int(self.seed_offset) or self.seed_offset < 0:
            raise ValueError(
                f"SamplingParams.seed_offset must be a non-negative integer, got {self.seed_offset!r}"
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


def request_seed(seed: int, index: int) -> int:
    """The seed of request ``index`` of a batch sampled with ``SamplingParams.seed = seed``
    (``index`` counts prompts over the whole batch, see ``SamplingParams.seed_offset``);
    ``request_seed(seed, 0) == seed``."""
    return (seed + index * 1_000_003) % (2**31 - 1)


@dataclass
class RolloutOutput:
    """One generated sample."""

    # Index of the prompt this sample answers, in the list passed to generate().
    prompt_index: int
    # The prompt's token ids, unchanged (no padding).
    prompt_ids: list[int]
    # Generated token ids; when finish_reason == "stop" the last one is the stop token.
    token_ids: list[int]
    # log pi_T(token | prefix) of each generated token: log_softmax(logits / T) over the full
    # vocabulary, T = the sampling temperature (1 when greedy), before top-k / top-p truncation:
    # the tempered distribution that was sampled, as the trainer scores it. Same length as
    # token_ids. A diagnostic and the rollout-IS input: the trainer recomputes old log-probs.
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


# ------------------------------------------------------------------------------ weight sync
#: The names and shapes of a whole weight update: HF name -> shape.
WeightManifest = dict[str, tuple[int, ...]]


class EngineUnavailableError(RuntimeError):
    """The engine died or did not answer in time (connection refused or reset, a timeout): the
    fault an :class:`~megacredit.rollout.pool.EnginePool` survives by moving the engine's work to
    the others. Errors the engine answers with (a bad request) are not this."""


class WeightSyncError(RuntimeError):
    """A weight update failed after it started copying (the engine may hold a mix of old and
    new weights and must be synced again before it generates)."""


def manifest_of(named_tensors: Iterable[NamedTensor]) -> WeightManifest:
    """The manifest of a materialised stream of pairs (duplicate names are an error)."""
    manifest: WeightManifest = {}
    for name, tensor in named_tensors:
        if name in manifest:
            raise ValueError(f"weight update: tensor '{name}' appears twice in the stream")
        manifest[name] = tuple(tensor.shape)
    return manifest


def check_manifest(manifest: Mapping[str, Sequence[int]], expected: Mapping[str, Sequence[int]],
                   engine: str = "engine") -> None:
    """Raise before anything is copied if ``manifest`` names a tensor the engine does not have
    (``KeyError``, with the closest engine name) or gives a shape the engine's parameter does
    not have (``ValueError``). Engine parameters absent from the manifest are allowed (a
    partial update); tied weights appear in ``expected`` under every name."""
    import difflib  # noqa: PLC0415

    for name, shape in manifest.items():
        if name not in expected:
            close = difflib.get_close_matches(name, list(expected), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise KeyError(
                f"weight update: unknown tensor name '{name}': not a parameter of the {engine}"
                f"{hint} Names must use Hugging Face naming, e.g. "
                f"'model.layers.0.self_attn.q_proj.weight'. Nothing was copied."
            )
        if tuple(shape) != tuple(expected[name]):
            raise ValueError(
                f"weight update: tensor '{name}' has shape {tuple(shape)} but the {engine}'s "
                f"parameter has shape {tuple(expected[name])}; the exported model and the "
                f"engine's model disagree (vocab padding not removed? different "
                f"num_key_value_heads / hidden size?). Nothing was copied."
            )


def check_bucket(bucket: Sequence[NamedTensor], manifest: Mapping[str, Sequence[int]],
                 seen: set[str]) -> None:
    """Raise ``WeightSyncError`` if a bucket disagrees with the announced manifest (a tensor
    not in it, sent twice, or of another shape); called before the bucket is copied."""
    for name, tensor in bucket:
        if not isinstance(tensor, torch.Tensor):
            raise WeightSyncError(f"weight update: '{name}' must be a torch.Tensor, got {type(tensor)}")
        problem = None
        if name not in manifest:
            problem = "is not in the manifest announced for this update"
        elif name in seen:
            problem = "was sent twice"
        elif tuple(tensor.shape) != tuple(manifest[name]):
            problem = f"has shape {tuple(tensor.shape)}, the manifest said {tuple(manifest[name])}"
        if problem:
            raise WeightSyncError(
                f"weight update: tensor '{name}' {problem}; {len(seen)} tensors were already "
                f"copied, so the engine holds a mix of old and new weights: sync again"
            )
        seen.add(name)


def bucket_bytes(bucket: Sequence[NamedTensor]) -> int:
    """Bytes of a bucket (numel * element size of its tensors)."""
    return sum(t.numel() * t.element_size() for _, t in bucket)


class RolloutEngine(ABC):
    """An inference engine that samples responses and accepts HF-named weight updates.

    Subclasses implement ``generate``, ``score_logprobs`` and ``load_weights``; they override
    ``weight_manifest`` when they can list their parameters (enables the check-before-copy),
    ``finish_weight_update`` when an update needs a final step (vLLM: process the reloaded
    weights, reset the prefix cache), ``abort_weight_update`` when a failed update must be
    wound down (SGLang: close its update session), and ``sleep`` / ``wake`` / ``shutdown`` when they hold
    memory or processes.
    """

    reads_buckets_in_call: bool = False
    """True when ``update_weights_from_buckets`` only reads the bucket tensors during the call
    (copies them into the engine, serialises or sends them) and keeps no reference and shares
    no storage afterwards: the trainer then hands it views of its live parameters instead of
    copies (megacredit/megatron/bridge_export.py, ``views``), one copy per byte fewer."""

    @abstractmethod
    def generate(
        self, prompt_token_ids: list[list[int]], params: SamplingParams,
        *, progress: Callable[[int], None] | None = None,
    ) -> list[RolloutOutput]:
        """Sample ``params.n`` responses per prompt.

        Returns ``len(prompt_token_ids) * params.n`` outputs, grouped by prompt: outputs
        ``[i * n, (i + 1) * n)`` answer prompt ``i``. ``progress(count)``, if given, is called
        as ``count`` more samples finish (engines that cannot tell call it once at the end).
        Every output carries the engine's
        log-probs of its sampled tokens (``RolloutOutput.logprobs``: logits / temperature, full
        vocabulary), which the trainer compares with its own (rollout/ metrics and
        ``algorithm.rollout_is``).
        """

    @abstractmethod
    def score_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Score given token sequences (the weight-sync probe; no sampling).

        For each sequence ``s`` (at least 2 tokens) returns ``len(s) - 1`` floats:
        ``log pi(s[t] | s[:t])`` for ``t = 1 .. len(s) - 1``, from the model's raw logits at
        temperature 1 over the full vocabulary -- the quantity the trainer's weight-sync probe
        computes (megacredit.megatron.actor.MegatronActor.score_sequences).
        """

    @abstractmethod
    def load_weights(self, named_tensors: Iterable[NamedTensor]) -> WeightLoadReport:
        """Copy ``(hf_name, full_tensor)`` pairs into the engine's model (low level: the
        trainer calls :meth:`update_weights_from_buckets`, which validates first)."""

    def weight_manifest(self) -> WeightManifest | None:
        """HF name -> shape of every parameter the engine accepts (tied weights under each of
        their names), or None when the engine cannot tell (then only the engine's own loader
        checks names and shapes, possibly after copying has begun)."""
        return None

    def missing_weight_names(self, received: set[str]) -> list[str] | None:
        """Engine parameters a full update with ``received`` names did not touch (None when
        the engine cannot tell)."""
        return None

    def read_weights(self) -> Mapping[str, torch.Tensor] | None:
        """The engine's current weights under HF names, as far as it can read them back (the
        sync check uses them to name the tensor that differs most from the trainer's); None
        when it cannot (e.g. a remote server)."""
        return None

    def check_weight_manifest(self, manifest: Mapping[str, Sequence[int]]) -> None:
        """Raise (``KeyError`` / ``ValueError``) if ``manifest`` does not fit the engine; the
        trainer calls it before the export starts, so every rank learns of a mismatch before
        any tensor moves."""
        expected = self.weight_manifest()
        if expected is not None:
            check_manifest(manifest, expected, type(self).__name__)

    def begin_weight_update(self) -> None:
        """Called once after the manifest check, before the first bucket (no-op by default)."""

    def finish_weight_update(self) -> None:
        """Called once after the last bucket of an update (no-op by default)."""

    def abort_weight_update(self) -> None:
        """Called instead of (or after a failed) :meth:`finish_weight_update` when an update
        fails after :meth:`begin_weight_update`: undo what begin set up (an engine-side update
        session, paused generation) so the engine can serve and be updated again; must not
        raise over the original error (no-op by default)."""

    def update_weights_from_buckets(
        self, buckets: Iterable[WeightBucket], manifest: Mapping[str, Sequence[int]] | None = None
    ) -> WeightLoadReport:
        """THE weight-update entry point: load a bucketed HF-named weight stream.

        ``manifest`` (HF name -> shape of every tensor the stream will carry) is checked
        against :meth:`weight_manifest` before anything is copied: an unknown name raises
        ``KeyError``, a wrong shape ``ValueError``, and the engine keeps its previous
        weights. Without a manifest the stream is materialised first (extra memory of one
        full copy) so the same check still precedes any copy. Each bucket is then checked
        against the manifest before it is copied (a deviation raises ``WeightSyncError``).
        """
        if manifest is None:
            staged = [list(iterate_buckets([bucket])) for bucket in buckets]
            manifest = manifest_of(pair for bucket in staged for pair in bucket)
            buckets = staged
        self.check_weight_manifest(manifest)
        self.begin_weight_update()
        report, seen = WeightLoadReport(), set()
        try:
            for bucket in buckets:
                pairs = list(iterate_buckets([bucket]))
                check_bucket(pairs, manifest, seen)
                part = self.load_weights(pairs)
                report.num_tensors += part.num_tensors
                report.num_bytes += part.num_bytes
                del bucket, pairs  # drop this bucket before the exporter builds the next (peak ~ one bucket)
            self.finish_weight_update()
        except BaseException:
            self.abort_weight_update()
            raise
        report.missing_names = self.missing_weight_names(seen)
        return report

    def sleep(self) -> None:
        """Release memory while the trainer runs (no-op unless the engine overrides it)."""

    def wake(self) -> None:
        """Re-take memory before the next rollout (no-op unless the engine overrides it)."""

    def shutdown(self) -> None:
        """Release the engine for good: memory, worker processes, servers it started (no-op
        unless the engine overrides it). Safe to call twice."""

    def health_problem(self) -> str | None:
        """Why the engine cannot serve right now (its health check), None when it can. In-process
        engines are healthy while their process runs; servers answer a health endpoint."""
        return None

    def take_faults(self) -> list:
        """The engine faults survived since the last call (an EnginePool's, each printable as
        "engine K (url) failed during ... (cause)"); a single engine survives none."""
        return []

    def fault_metrics(self) -> dict[str, float]:
        """rollout/engine_faults and rollout/engines_serving of an EnginePool (docs/metrics.md);
        a single engine has none."""
        return {}

    def restart(self) -> bool:
        """Restart the engine's server after it died or hung, when megacredit started it (blocks
        until it is healthy); False when it cannot (a server somebody else runs). A restarted
        engine holds its initial weights: it needs a full weight update before it generates."""
        return False
