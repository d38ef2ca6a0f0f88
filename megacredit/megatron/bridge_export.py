"""Export a Megatron ``GPTModel`` (any TP x PP layout) back to Hugging Face tensors.

``export_hf_weights`` walks the parameters in HF checkpoint order. For each one, the TP ranks
of the owning pipeline stage all-gather their shards and that stage's first TP rank
re-assembles the full HF tensor(s) (unfusing q/k/v and gate/up, dropping vocab padding); an MoE
expert, held whole by one expert-parallel rank, is broadcast over the stage's EP groups instead. The
tensors then go where the caller says (``receivers``): to global rank 0 (sent point to point by
each stage, never relayed through other stages), stay on each stage's first TP rank (one NCCL
broadcast source per stage for remote engines), or to every rank. This is the stream the
rollout engine's weight sync consumes; ``iter_hf_weight_buckets`` groups it into bounded-size
buckets and ``save_hf_pretrained`` writes a ``from_pretrained``-ready folder.

With Megatron-Core's distributed optimizer each rank updates only its shard of the weights;
the export still reads whole parameters because every optimizer step ends with the synchronous
all-gather of the updated shards (``megacredit.megatron.optimizer.wrap_with_ddp`` turns the
overlapped gather off), which tests/distributed/test_distributed_optimizer.py checks by
comparing this export with the plain optimizer's after every step.

COLLECTIVE CONTRACT: every rank of the job must run the iterator to the end (``for _ in it``),
receiving or not; a rank that stops early leaves the others blocked in a collective. Data-
parallel replicas other than DP rank 0 skip the collectives except with ``receivers="all"``.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence, Union

import torch
import torch.distributed as dist

from megacredit.megatron.bridge_load import canonical_order, global_named_parameters
from megacredit.megatron.distributed import ParallelContext
from megacredit.megatron.hf_mapping import EXPERT_PREFIX, OUTPUT_LAYER, AttentionShape, mapping_for, unshard
from megacredit.rollout.base import rebucket
from megacredit.utils.sync_stats import InFlightBytes, track
from megacredit.utils.comm import all_gather_objects

#: "rank0", "stage", "all", or the global ranks that must each receive everything.
Receivers = Union[Literal["rank0", "all", "stage"], Sequence[int]]
RECEIVERS = ("rank0", "all", "stage")
DEFAULT_BUCKET_BYTES = 512 * 1024 * 1024
DEFAULT_MAX_SHARD_BYTES = 5 * 1024 ** 3
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def _as_list(model_chunks: torch.nn.Module | Sequence[torch.nn.Module]) -> list[torch.nn.Module]:
    return [model_chunks] if isinstance(model_chunks, torch.nn.Module) else list(model_chunks)


@dataclass(frozen=True)
class ExportItem:
    """One Megatron parameter of the export and the HF tensors it becomes."""

    name: str
    """Global Megatron name."""
    owner: int
    """Pipeline rank that holds it (the first one for a tied output-layer copy)."""
    local_shape: tuple[int, ...]
    """Shape of one TP rank's shard."""
    dtype: torch.dtype
    """The parameter's dtype (the export may cast)."""
    hf: tuple[tuple[str, tuple[int, ...]], ...]
    """``(hf_name, full_shape)`` of each HF tensor, in the order they are yielded."""
    expert_owner: int | None = None
    """For an MoE expert's parameter: the expert-parallel rank (in its stage's EP group) that
    holds it whole (experts are not split over TP); None for the others."""


def _stage_manifest(params: dict[str, torch.nn.Parameter], ctx: ParallelContext) -> dict[str, tuple]:
    """This stage's parameters: global name -> (local shard shape, dtype, expert owner or None),
    the experts of the stage's other expert-parallel ranks included (collective over EP)."""
    from megatron.core import parallel_state

    local = {name: (tuple(p.shape), p.dtype, ctx.ep_rank if EXPERT_PREFIX in name else None)
             for name, p in params.items()}
    if ctx.ep_size > 1:
        experts = [None] * ctx.ep_size
        dist.all_gather_object(experts, {n: v for n, v in local.items() if v[2] is not None},
                               group=parallel_state.get_expert_model_parallel_group())
        for part in experts:
            local.update(part)
    return local


def _pipeline_manifest(params: dict[str, torch.nn.Parameter], ctx: ParallelContext) -> dict[str, tuple]:
    """Global name -> (owning pipeline rank, local shard shape, dtype, expert owner), known on
    every rank."""
    from megatron.core import parallel_state

    local = _stage_manifest(params, ctx)
    if ctx.pp_size == 1:
        per_stage = [local]
    else:
        per_stage = [None] * ctx.pp_size
        dist.all_gather_object(per_stage, local, group=parallel_state.get_pipeline_model_parallel_group())
    manifest: dict[str, tuple] = {}
    for pp_rank, stage in enumerate(per_stage):
        for name, (shape, dtype, expert_owner) in stage.items():
            manifest.setdefault(name, (pp_rank, shape, dtype, expert_owner))  # tied output copy: first owner wins
    return manifest


def export_plan(
    model_chunks: torch.nn.Module | Sequence[torch.nn.Module], hf_config: Any, ctx: ParallelContext
) -> list[ExportItem]:
    """Every exported parameter in HF checkpoint order, with its HF names and full shapes
    (computed on the meta device: no data moves). Collective over the pipeline group."""
    params = global_named_parameters(_as_list(model_chunks))
    return _plan(params, hf_config, ctx)


def _plan(params: dict[str, torch.nn.Parameter], hf_config: Any, ctx: ParallelContext) -> list[ExportItem]:
    manifest = _pipeline_manifest(params, ctx)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    attention = AttentionShape.from_hf(hf_config)
    items = []
    for name in sorted(manifest, key=canonical_order):
        if tied and name == OUTPUT_LAYER:
            continue  # HF re-ties lm_head to the input embedding on load
        owner, local_shape, dtype, expert_owner = manifest[name]
        shards = 1 if expert_owner is not None else ctx.tp_size
        meta_shards = [torch.empty(local_shape, device="meta") for _ in range(shards)]
        pieces = unshard(mapping_for(name, tied, hf_config.model_type), meta_shards, hf_config.vocab_size, attention)
        items.append(ExportItem(name, owner, local_shape, dtype, tuple((n, tuple(t.shape)) for n, t in pieces),
                                expert_owner))
    return items


def hf_export_manifest(
    model_chunks: torch.nn.Module | Sequence[torch.nn.Module], hf_config: Any, ctx: ParallelContext,
    *, stage_only: bool = False,
) -> dict[str, tuple[int, ...]]:
    """HF name -> full shape of everything the export yields (to check an engine against it
    before any weight moves); with ``stage_only`` only what this rank's pipeline stage owns
    (what ``receivers="stage"`` yields here). Collective over the pipeline group."""
    return {
        hf_name: shape
        for item in export_plan(model_chunks, hf_config, ctx)
        if not stage_only or item.owner == ctx.pp_rank
        for hf_name, shape in item.hf
    }


def _gathered_stack(
    item: ExportItem,
    params: dict[str, torch.nn.Parameter],
    ctx: ParallelContext,
    dtype: torch.dtype | None,
    broadcast_over_pp: bool,
    tracker: InFlightBytes | None,
    views: bool = False,
) -> torch.Tensor | None:
    """[tp, *local_shape]: every TP shard of ``item`` (cast to ``dtype`` before it moves) on
    the owning stage, and on every stage too when ``broadcast_over_pp``. An expert's parameter is
    [1, *shape], broadcast over each expert-parallel group of the stage from the rank holding it.
    ``views`` with TP 1 and no cast: a view of the parameter on its stage (no copy)."""
    from megatron.core import parallel_state

    dtype = dtype or item.dtype
    rows = 1 if item.expert_owner is not None else ctx.tp_size
    stack = None
    if ctx.pp_rank == item.owner and item.expert_owner is not None:
        stack = _expert_stack(item, params, ctx, dtype)
    elif ctx.pp_rank == item.owner and views and ctx.tp_size == 1 and params[item.name].dtype == dtype:
        stack = params[item.name].detach().unsqueeze(0)  # the parameter itself: nothing to gather or cast
    elif ctx.pp_rank == item.owner:
        local = params[item.name].detach().to(dtype).contiguous()  # a copy only when it casts
        stack = torch.empty((ctx.tp_size, *item.local_shape), dtype=dtype, device=local.device)
        if ctx.tp_size > 1:  # gather straight into the stack's rows: no second copy
            dist.all_gather(list(stack.unbind(0)), local, group=parallel_state.get_tensor_model_parallel_group())
        else:
            stack[0].copy_(local)
        del local
    if broadcast_over_pp and ctx.pp_size > 1:
        group = parallel_state.get_pipeline_model_parallel_group()
        if stack is None:
            stack = torch.empty((rows, *item.local_shape), dtype=dtype, device=ctx.device)
        dist.broadcast(stack, src=dist.get_global_rank(group, item.owner), group=group)
    return None if stack is None else track(tracker, stack)


def _expert_stack(item: ExportItem, params: dict[str, torch.nn.Parameter], ctx: ParallelContext,
                  dtype: torch.dtype) -> torch.Tensor:
    """[1, *shape]: the expert parameter ``item``, on every rank of its stage (each EP group of
    the stage holds every expert; all of them broadcast at once)."""
    from megatron.core import parallel_state

    stack = torch.empty((1, *item.local_shape), dtype=dtype, device=ctx.device)
    if ctx.ep_rank == item.expert_owner:
        stack[0].copy_(params[item.name].detach())
    if ctx.ep_size > 1:
        group = parallel_state.get_expert_model_parallel_group()
        dist.broadcast(stack, src=dist.get_global_rank(group, item.expert_owner), group=group)
    return stack


def _unshard_stack(item: ExportItem, stack: torch.Tensor, hf_config: Any, tracker: InFlightBytes | None) -> list:
    """The HF tensors of ``item`` from its gathered stack (the caller drops the stack)."""
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    pieces = unshard(mapping_for(item.name, tied, hf_config.model_type), list(stack.unbind(0)), hf_config.vocab_size,
                     AttentionShape.from_hf(hf_config))
    return [(name, track(tracker, tensor)) for name, tensor in pieces]


def _receive_pieces(item: ExportItem, dtype: torch.dtype, source: int, ctx: ParallelContext,
                    tracker: InFlightBytes | None) -> list:
    """A destination rank: the HF tensors of ``item``, sent point to point by ``source``."""
    pieces = []
    for hf_name, shape in item.hf:
        buffer = track(tracker, torch.empty(shape, dtype=dtype, device=ctx.device))
        dist.recv(buffer, src=source)
        pieces.append((hf_name, buffer))
    return pieces


def _destinations(receivers: Receivers, ctx: ParallelContext) -> frozenset[int] | None:
    """The global ranks that receive everything (None for the "all" and "stage" modes)."""
    if isinstance(receivers, str):
        if receivers not in RECEIVERS:
            raise ValueError(f"receivers must be one of {RECEIVERS} or a list of global ranks, got {receivers!r}")
        return frozenset({0}) if receivers == "rank0" else None
    ranks = frozenset(int(rank) for rank in receivers)
    if not ranks or not all(0 <= rank < ctx.world_size for rank in ranks):
        raise ValueError(f"receivers: global ranks in [0, {ctx.world_size}) expected, got {sorted(ranks)}")
    return ranks


def _stage_sources(ctx: ParallelContext) -> list[int]:
    """Global rank of every pipeline stage's first TP rank in DP replica 0 (world collective)."""
    coordinates = all_gather_objects((ctx.pp_rank, ctx.tp_rank, ctx.dp_rank, ctx.rank))
    sources = {pp: rank for pp, tp, dp, rank in coordinates if tp == 0 and dp == 0}
    return [sources[stage] for stage in range(ctx.pp_size)]


def _item_pieces(item, params, hf_config, ctx, receivers, destinations, sources, dtype, tracker,
                 views=False) -> list | None:
    """This rank's HF tensors of ``item`` (None when it receives nothing). Every rank calls it
    for every item, in plan order."""
    if receivers == "all":
        stack = _gathered_stack(item, params, ctx, dtype, True, tracker, views)
        return _unshard_stack(item, stack, hf_config, tracker)
    pieces = None
    # DP replicas hold the same weights; an expert's broadcast involves every EP group of its stage.
    if ctx.pp_rank == item.owner and (ctx.dp_rank == 0 or item.expert_owner is not None):
        stack = _gathered_stack(item, params, ctx, dtype, False, tracker, views)
        if ctx.tp_rank == 0 and ctx.dp_rank == 0:
            pieces = _unshard_stack(item, stack, hf_config, tracker)
        del stack
    if destinations is None:  # "stage": the stage's first TP rank keeps its own tensors
        return pieces
    source = sources[item.owner]
    if ctx.rank == source:
        for destination in sorted(destinations - {source}):  # straight from the stage, no relay
            for _, tensor in pieces:
                dist.send(tensor.contiguous(), dst=destination)
        return pieces if source in destinations else None
    if ctx.rank in destinations:
        return _receive_pieces(item, dtype or item.dtype, source, ctx, tracker)
    return None


def export_hf_weights(
    model_chunks: torch.nn.Module | Sequence[torch.nn.Module],
    hf_config: Any,
    ctx: ParallelContext,
    *,
    receivers: Receivers = "rank0",
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    tracker: InFlightBytes | None = None,
    views: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full_tensor)`` in HF checkpoint order, from any TP x PP layout.

    Each parameter is all-gathered over TP on the stage that holds it and turned into HF
    tensors there; where it goes then depends on ``receivers``:

    - "rank0": global rank 0 yields everything (the embedded or a colocated engine on rank 0);
      other stages' first TP rank sends their own tensors point to point to rank 0. Same as
      ``receivers=[0]``.
    - "stage": the first TP rank of data-parallel replica 0 of each pipeline stage yields
      that stage's tensors only, in HF order (the sources of an NCCL broadcast to remote
      engines: one sender per stage, nothing crosses the pipeline).
    - "all": every rank yields every tensor (gathered stacks are broadcast over the pipeline).
    - a list of global ranks: each of them yields everything, sent point to point by each
      stage's first TP rank (e.g. the leader rank of every colocated engine).

    dtype: cast before anything moves (default: the parameters' dtype). device: where yielded
    tensors live (default CPU; pass the GPU to feed a colocated engine without a host copy).
    tracker: counts the bytes this export allocates while they are alive (see
    :class:`megacredit.utils.sync_stats.InFlightBytes`). With tied embeddings no
    ``lm_head.weight`` is yielded (HF re-ties it on load).

    views: where nothing must be gathered, cast or moved (TP 1, the parameter's own dtype and
    device), yield views of the live parameters (strided ones too) instead of copies: for a
    consumer that copies every tensor before the parameters change again (the weight sync's
    engines, ``RolloutEngine.reads_buckets_in_call``), so each byte is copied once, into the
    engine. Default: every yielded tensor is a contiguous copy of its own.
    """
    destinations = _destinations(receivers, ctx)
    params = global_named_parameters(_as_list(model_chunks))
    sources = _stage_sources(ctx) if destinations is not None else None
    if views and tracker is not None:  # views of the parameters allocate nothing: not in flight
        tracker = _NewStorages(tracker, {p.untyped_storage().data_ptr() for p in params.values()})
    for item in _plan(params, hf_config, ctx):
        pieces = _item_pieces(item, params, hf_config, ctx, receivers, destinations, sources, dtype, tracker, views)
        while pieces:
            hf_name, tensor = pieces.pop(0)
            moved = tensor.to(device=device) if views else tensor.to(device=device).contiguous()
            del tensor
            yield hf_name, track(tracker, moved)
            del moved


class _NewStorages:
    """An InFlightBytes that counts only tensors outside ``skipped`` storages (the parameters)."""

    def __init__(self, tracker: InFlightBytes, skipped: set[int]) -> None:
        self.tracker, self.skipped = tracker, skipped

    def track(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if tensor.untyped_storage().data_ptr() in self.skipped else self.tracker.track(tensor)


def iter_hf_weight_buckets(
    model_chunks: torch.nn.Module | Sequence[torch.nn.Module],
    hf_config: Any,
    ctx: ParallelContext,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    *,
    receivers: Receivers = "rank0",
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    tracker: InFlightBytes | None = None,
    views: bool = False,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """:func:`export_hf_weights` grouped in lists whose total size is <= ``bucket_bytes``
    (a single tensor larger than the bound travels alone). Same collective contract.

    Memory: the export itself holds at most the bucket being filled, one parameter's
    gathered TP shards and its HF tensors; so a consumer that drops each bucket before
    asking for the next (``del bucket`` at the end of the loop body) keeps the extra memory
    under ``bucket_bytes + 2 x`` the largest gathered parameter (measured in
    tests/distributed/test_weight_resharding.py).
    """
    yield from rebucket(
        export_hf_weights(model_chunks, hf_config, ctx, receivers=receivers, dtype=dtype, device=device,
                          tracker=tracker, views=views),
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
