"""Export a Megatron ``GPTModel`` (any TP x PP layout) back to Hugging Face tensors.

``export_hf_weights`` walks the parameters in HF checkpoint order. For each one, the TP ranks
of the owning pipeline stage all-gather their shards, the owning stage broadcasts the gathered
stack over the pipeline group, and the receiving rank(s) re-assemble the full HF tensor(s)
(unfusing q/k/v and gate/up, dropping vocab padding) and yield them one at a time. This is the
stream the rollout engine's weight sync consumes; ``iter_hf_weight_buckets`` groups it into
bounded-size buckets and ``save_hf_pretrained`` writes a ``from_pretrained``-ready folder.

COLLECTIVE CONTRACT: every rank of the job must run the iterator to the end (``for _ in it``),
receiving or not; a rank that stops early leaves the others blocked in a collective. Data-
parallel replicas other than DP rank 0 skip the collectives when only rank 0 receives.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import torch
import torch.distributed as dist

from megacredit.megatron.bridge_load import canonical_order, global_named_parameters
from megacredit.megatron.distributed import ParallelContext
from megacredit.megatron.hf_mapping import OUTPUT_LAYER, AttentionShape, mapping_for, unshard
from megacredit.rollout.base import rebucket

Receivers = Literal["rank0", "all"]
DEFAULT_BUCKET_BYTES = 512 * 1024 * 1024
DEFAULT_MAX_SHARD_BYTES = 5 * 1024 ** 3
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def _as_list(model_chunks: torch.nn.Module | Sequence[torch.nn.Module]) -> list[torch.nn.Module]:
    return [model_chunks] if isinstance(model_chunks, torch.nn.Module) else list(model_chunks)


def _pipeline_manifest(
    params: dict[str, torch.nn.Parameter], ctx: ParallelContext
) -> dict[str, tuple[int, tuple[int, ...], torch.dtype]]:
    """Global name -> (owning pipeline rank, local shard shape, dtype), known on every rank."""
    from megatron.core import parallel_state

    local = {name: (tuple(p.shape), p.dtype) for name, p in params.items()}
    if ctx.pp_size == 1:
        per_stage = [local]
    else:
        per_stage = [None] * ctx.pp_size
        dist.all_gather_object(per_stage, local, group=parallel_state.get_pipeline_model_parallel_group())
    manifest: dict[str, tuple[int, tuple[int, ...], torch.dtype]] = {}
    for pp_rank, stage in enumerate(per_stage):
        for name, (shape, dtype) in stage.items():
            manifest.setdefault(name, (pp_rank, shape, dtype))  # tied output copy: first owner wins
    return manifest


def _gathered_stack(
    name: str,
    owner: int,
    local_shape: tuple[int, ...],
    dtype: torch.dtype,
    params: dict[str, torch.nn.Parameter],
    ctx: ParallelContext,
    receivers: Receivers,
) -> torch.Tensor | None:
    """[tp, *local_shape]: every TP shard of ``name``, on the ranks that take part."""
    from megatron.core import parallel_state

    tp_takes_part = receivers == "all" or ctx.dp_rank == 0
    pp_takes_part = receivers == "all" or (ctx.dp_rank == 0 and ctx.tp_rank == 0)
    stack = None
    if ctx.pp_rank == owner and tp_takes_part:
        local = params[name].detach().contiguous()
        if ctx.tp_size > 1:
            shards = [torch.empty_like(local) for _ in range(ctx.tp_size)]
            dist.all_gather(shards, local, group=parallel_state.get_tensor_model_parallel_group())
            stack = torch.stack(shards)
        else:
            stack = local.unsqueeze(0)
    if ctx.pp_size > 1 and pp_takes_part:
        group = parallel_state.get_pipeline_model_parallel_group()
        if stack is None:
            stack = torch.empty((ctx.tp_size, *local_shape), dtype=dtype, device=ctx.device)
        dist.broadcast(stack, src=dist.get_global_rank(group, owner), group=group)
    return stack


def export_hf_weights(
    model_chunks: torch.nn.Module | Sequence[torch.nn.Module],
    hf_config: Any,
    ctx: ParallelContext,
    *,
    receivers: Receivers = "rank0",
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full_tensor)`` for the whole model, in HF checkpoint order.

    receivers: "rank0" (only global rank 0 yields; the others yield nothing but must still
    exhaust the iterator) or "all" (every rank yields every tensor). dtype: cast the yielded
    tensors (default: the parameters' dtype). device: where yielded tensors live (default CPU;
    pass the GPU to feed a colocated rollout engine without a host copy). With tied embeddings no
    ``lm_head.weight`` is yielded (HF re-ties it on load).
    """
    if receivers not in ("rank0", "all"):
        raise ValueError(f"receivers must be 'rank0' or 'all', got {receivers!r}")
    params = global_named_parameters(_as_list(model_chunks))
    manifest = _pipeline_manifest(params, ctx)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    attention = AttentionShape.from_hf(hf_config)
    receives = receivers == "all" or ctx.rank == 0
    for name in sorted(manifest, key=canonical_order):
        if tied and name == OUTPUT_LAYER:
            continue
        owner, local_shape, param_dtype = manifest[name]
        stack = _gathered_stack(name, owner, local_shape, param_dtype, params, ctx, receivers)
        if not receives:
            continue
        for hf_name, tensor in unshard(mapping_for(name, tied), list(stack.unbind(0)), hf_config.vocab_size, attention):
            yield hf_name, tensor.to(device=device, dtype=dtype or tensor.dtype).contiguous()


def iter_hf_weight_buckets(
    model_chunks: torch.nn.Module | Sequence[torch.nn.Module],
    hf_config: Any,
    ctx: ParallelContext,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    *,
    receivers: Receivers = "rank0",
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """:func:`export_hf_weights` grouped in lists whose total size is <= ``bucket_bytes``
    (a single tensor larger than the bound travels alone). Same collective contract."""
    yield from rebucket(
        export_hf_weights(model_chunks, hf_config, ctx, receivers=receivers, dtype=dtype, device=device),
        bucket_bytes,
    )


def _copy_tokenizer_files(source_dir: Path, out_dir: Path) -> list[str]:
    """Copy every non-weight, non-config file (tokenizer, chat template, generation config)."""
    copied = []
    for file in sorted(source_dir.iterdir()):
        if not file.is_file() or file.name == "config.json" or file.name.endswith(_WEIGHT_SUFFIXES):
            continue
        shutil.copy2(file, out_dir / file.name)
        copied.append(file.name)
    return copied


def _write_shards(shards: list[dict[str, torch.Tensor]], out_dir: Path) -> None:
    """HF layout: model.safetensors, or model-0000i-of-0000N.safetensors + index json."""
    from safetensors.torch import save_file

    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata=metadata)
        return
    weight_map: dict[str, str] = {}
    total = 0
    for index, shard in enumerate(shards, start=1):
        file_name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / file_name), metadata=metadata)
        weight_map.update({name: file_name for name in shard})
        total += sum(t.numel() * t.element_size() for t in shard.values())
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))


def save_hf_pretrained(
    model_chunks: torch.nn.Module | Sequence[torch.nn.Module],
    hf_config: Any,
    ctx: ParallelContext,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a folder ``AutoModelForCausalLM.from_pretrained`` loads: config.json (dtype set to
    the written tensors'), safetensors (sharded above ``max_shard_bytes``), and the tokenizer /
    generation-config files of ``tokenizer_dir``. Collective: call on every rank; rank 0 writes.
    """
    out_dir = Path(out_dir)
    shards: list[dict[str, torch.Tensor]] = []
    for bucket in iter_hf_weight_buckets(model_chunks, hf_config, ctx, max_shard_bytes, dtype=dtype):
        shards.append(dict(bucket))
    if ctx.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_shards(shards, out_dir)
        out_config = copy.deepcopy(hf_config)
        out_config.dtype = next(iter(shards[0].values())).dtype
        out_config.save_pretrained(out_dir)
        if tokenizer_dir is not None:
            _copy_tokenizer_files(Path(tokenizer_dir), out_dir)
    if dist.is_initialized() and ctx.world_size > 1:
        dist.barrier()
    return out_dir
