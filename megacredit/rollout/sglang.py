"""Adapter from megacredit's RolloutEngine interface to SGLang's offline ``Engine``.

UNVERIFIED HERE: SGLang needs CUDA (torch CUDA build, sgl-kernel, flashinfer) and cannot be
installed or run on the CPU-only machines this project is developed and tested on. This
module was written against SGLang's public API and has never been executed against a real
SGLang; only the translation helpers below (sampling parameters in, output dicts out) are
unit-tested, on dicts shaped as SGLang documents them. Check it on a GPU before relying on it.

API used (sgl-project/sglang, ``python/sglang/srt/entrypoints/engine.py``; the docs page
https://docs.sglang.io/basic_usage/offline_engine_api.html and sampling parameters at
https://docs.sglang.io/basic_usage/sampling_params.html):

* ``sglang.Engine(model_path=..., **server_args)``;
* ``Engine.generate(input_ids=[[...], ...], sampling_params={...}, return_logprob=True)``
  returns one dict per input with ``meta_info["output_token_logprobs"]`` as
  ``(logprob, token_id, text)`` triples and ``meta_info["finish_reason"]["type"]`` in
  {"stop", "length", "abort"};
* ``Engine.update_weights_from_tensor(named_tensors, load_format=None, flush_cache=True)``
  (HF-named ``(name, tensor)`` pairs, as in SGLang's test/srt/test_update_weights_from_tensor.py);
* ``Engine.init_weights_update_group(...)`` + ``Engine.update_weights_from_distributed(
  names, dtypes, shapes, group_name, flush_cache)`` for the NCCL broadcast path, where the
  trainer's rank 0 broadcasts each tensor in the same order;
* ``release_memory_occupation()`` / ``resume_memory_occupation()`` for sleep / wake
  (needs ``enable_memory_saver=True``).

Log-prob semantics: SGLang may report log-probs of the processed (tempered) distribution
depending on its version and the ``SGLANG_RETURN_ORIGINAL_LOGPROB`` setting; the embedded
engine reports raw T=1 log-probs. The trainer recomputes old log-probs, so this only affects
diagnostics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

from megacredit.rollout.base import (
    NamedTensor,
    RolloutEngine,
    RolloutOutput,
    SamplingParams,
    WeightLoadReport,
    rebucket,
)

_INSTALL_HINT = (
    "SGLangRolloutEngine needs the `sglang` package, which requires a CUDA GPU: install it "
    "with `pip install 'megacredit[sglang]'` on a GPU machine, or use the embedded engine "
    "(megacredit.rollout.embedded.EmbeddedRolloutEngine) on CPU."
)


def import_sglang() -> Any:
    """Import sglang lazily, with an actionable message when it is missing."""
    try:
        import sglang  # noqa: PLC0415
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error
    return sglang


def to_sglang_sampling_params(params: SamplingParams) -> dict[str, Any]:
    """SamplingParams -> SGLang's sampling_params dict (n is expanded by the caller)."""
    sampling: dict[str, Any] = {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "max_new_tokens": params.max_new_tokens,
    }
    if params.stop_token_ids is not None:
        if params.stop_token_ids:
            sampling["stop_token_ids"] = list(params.stop_token_ids)
        else:
            sampling["ignore_eos"] = True
    if params.seed is not None:
        sampling["sampling_seed"] = params.seed
    return sampling


def from_sglang_output(
    result: dict[str, Any], prompt_index: int, prompt_ids: list[int]
) -> RolloutOutput:
    """One SGLang generate() result dict -> RolloutOutput."""
    meta = result["meta_info"]
    finish = meta["finish_reason"]["type"]
    if finish not in ("stop", "length"):
        raise RuntimeError(f"SGLang request {prompt_index} ended with finish_reason={finish!r}")
    triples = meta["output_token_logprobs"]
    return RolloutOutput(
        prompt_index=prompt_index,
        prompt_ids=list(prompt_ids),
        token_ids=[int(t[1]) for t in triples],
        logprobs=[float(t[0]) for t in triples],
        finish_reason=finish,
    )


class SGLangRolloutEngine(RolloutEngine):
    """SGLang offline engine behind the RolloutEngine interface. UNVERIFIED (no GPU here)."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        max_bucket_bytes: int = 512 * 1024**2,
        **server_args: Any,
    ) -> None:
        """model_path: HF folder; server_args: any sglang ServerArgs (tp_size, dtype, ...);
        max_bucket_bytes: size of each update_weights_from_tensor call."""
        sglang = import_sglang()
        self.max_bucket_bytes = max_bucket_bytes
        self.engine = sglang.Engine(model_path=str(model_path), **server_args)

    def generate(
        self, prompt_token_ids: list[list[int]], params: SamplingParams,
        *, progress: Callable[[int], None] | None = None,
    ) -> list[RolloutOutput]:
        rows = [(i, list(p)) for i, p in enumerate(prompt_token_ids) for _ in range(params.n)]
        results = self.engine.generate(
            input_ids=[prompt for _, prompt in rows],
            sampling_params=to_sglang_sampling_params(params),
            return_logprob=True,
        )
        if progress is not None:
            progress(len(rows))
        return [from_sglang_output(r, i, p) for r, (i, p) in zip(results, rows)]

    def score_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Prompt log-probs of each sequence (``return_logprob`` from position 0, one token
        generated and ignored); SGLang reports None for the first token, dropped here."""
        results = self.engine.generate(
            input_ids=[list(s) for s in sequences], sampling_params={"max_new_tokens": 1},
            return_logprob=True, logprob_start_len=0,
        )
        return [[float(t[0]) for t in r["meta_info"]["input_token_logprobs"][1:]] for r in results]

    def load_weights(self, named_tensors: Iterable[NamedTensor]) -> WeightLoadReport:
        """Send HF-named tensors in buckets; the KV cache is flushed once, after the last."""
        report = WeightLoadReport()
        pending: list[NamedTensor] | None = None
        for bucket in rebucket(named_tensors, self.max_bucket_bytes):
            if pending is not None:
                self._send(pending, flush_cache=False)
            pending = bucket
            report.num_tensors += len(bucket)
            report.num_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
        if pending is not None:
            self._send(pending, flush_cache=True)
        return report

    def _send(self, bucket: list[NamedTensor], flush_cache: bool) -> None:
        answer = self.engine.update_weights_from_tensor(bucket, flush_cache=flush_cache)
        if isinstance(answer, tuple) and answer and answer[0] is False:
            raise RuntimeError(f"SGLang update_weights_from_tensor failed: {answer}")

    def init_weights_update_group(self, **kwargs: Any) -> Any:
        """Pass-through to ``Engine.init_weights_update_group`` (NCCL path)."""
        return self.engine.init_weights_update_group(**kwargs)

    def update_weights_from_distributed(self, **kwargs: Any) -> Any:
        """Pass-through to ``Engine.update_weights_from_distributed`` (NCCL path)."""
        return self.engine.update_weights_from_distributed(**kwargs)

    def sleep(self) -> None:
        self.engine.release_memory_occupation()

    def wake(self) -> None:
        self.engine.resume_memory_occupation()

    def shutdown(self) -> None:
        self.engine.shutdown()
