"""The trainer's weight sync into the rollout engine(s) and its check.

Every rank runs :func:`sync_weights` (the export is collective); the ranks that hold an engine
feed it. Order of one sync:

1. the HF manifest of the export (names, shapes) is checked against every engine BEFORE any
   tensor moves; a mismatch (unknown name, wrong shape) stops every rank with the engine's
   error and the engines keep their previous weights;
2. the HF-named buckets (``rollout.sync_bucket_mb``) stream from the export into
   ``update_weights_from_buckets``; a failure half-way is reported on every rank after the
   export finished (no rank waits in a collective); ``reads_buckets_in_call`` engines get views;
3. every ``rollout.check_weight_sync_every``-th sync (the first one included) the engines score
   the fixed probe and are compared with the trainer's own log-probs
   (megacredit/rollout/sync_check.py); beyond the tolerance the run stops, naming the
   largest-differing tensor when the engine can read its weights back.
"""

from __future__ import annotations

from typing import Any

import torch

from megacredit.rollout.base import EngineUnavailableError, RolloutEngine, WeightSyncError
from megacredit.rollout.sync_check import (
    compare_probe,
    largest_weight_difference,
    probe_token_ids,
    sync_check_error,
)
from megacredit.trainer.run import RLRun
from megacredit.utils.comm import all_gather_objects, broadcast_object

MIB = 2**20


def engines_of(engine: RolloutEngine | None) -> list[RolloutEngine]:
    """The individual engines behind ``engine`` (an EnginePool's members, or itself)."""
    if engine is None:
        return []
    return list(getattr(engine, "engines", [engine]))


def _raise_on_every_rank(error: BaseException | None) -> None:
    """Share rank 0's error (or None) with every rank; all raise it together."""
    error = broadcast_object(error)
    if error is not None:
        raise error


def _first_available(local: Any) -> Any:
    """The first non-None value any rank holds (results living on the last pipeline stage)."""
    return next((part for part in all_gather_objects(local) if part is not None), None)


def sync_weights(run: RLRun) -> dict[str, float]:
    """Stream the policy's weights into the engine(s); returns the sync/ metrics of this sync."""
    from megacredit.megatron.bridge import iter_hf_weight_buckets
    from megacredit.megatron.bridge_export import hf_export_manifest
    from megacredit.utils.sync_stats import SyncMeter, reduce_sync_metrics

    cfg, ctx, engine = run.cfg, run.ctx, run.engine
    manifest = hf_export_manifest(run.actor.model_chunks, run.hf_config, ctx)
    error = None
    if torch.cuda.is_available():  # training's cached blocks back to the GPU: a colocated engine re-takes
        torch.cuda.empty_cache()    # its memory on wake (vLLM's sleep mode, SGLang's memory saver)
    if engine is not None:
        engine.wake()
        try:
            engine.check_weight_manifest(manifest)
        except (KeyError, ValueError) as exc:
            error = exc
    _raise_on_every_rank(error)
    meter = SyncMeter()
    buckets = meter.count(iter_hf_weight_buckets(run.actor.model_chunks, run.hf_config, ctx, cfg.rollout.sync_bucket_mb * MIB,
                                                 tracker=meter.tracker, views=getattr(engine, "reads_buckets_in_call", False)))
    if engine is not None:
        try:
            engine.update_weights_from_buckets(buckets, manifest)
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            error = exc
    for _ in buckets:  # the export is collective: finish it whatever happened here
        pass
    _raise_on_every_rank(error)
    metrics = reduce_sync_metrics(all_gather_objects(meter.metrics()))
    sync_index = run.sync_count
    run.sync_count += 1
    every = cfg.rollout.check_weight_sync_every
    if every and sync_index % every == 0:
        metrics.update(check_weight_sync(run, sync_index))
    return metrics if ctx.rank == 0 else {}


def check_weight_sync(run, sync_index: int) -> dict[str, float]:
    """Probe every engine after sync ``sync_index``; raise ``WeightSyncError`` on every rank
    beyond ``rollout.check_weight_sync_tolerance``. Returns sync/probe_logprob_diff (rank 0)."""
    probe = probe_token_ids(run.tokenizer)
    scored = run.actor.score_sequences([probe])
    trainer = _first_available(scored[0].tolist() if 0 in scored else None)
    failure, worst_diff = None, 0.0
    for index, engine in enumerate(engines_of(run.engine)):
        try:
            scored_by_engine = engine.score_logprobs([probe])[0]
        except EngineUnavailableError:  # died since the update: the pool leaves it out at its next call
            continue
        comparison = compare_probe(scored_by_engine, trainer, run.cfg.rollout.check_weight_sync_tolerance)
        worst_diff = max(worst_diff, comparison.mean_abs_diff)
        if not comparison.ok and failure is None:
            failure = (index, comparison)
    failure = broadcast_object(failure)
    if failure is not None:
        raise WeightSyncError(broadcast_object(_failure_message(run, sync_index, *failure)))
    return {"sync/probe_logprob_diff": worst_diff}


def _failure_message(run, sync_index: int, index: int, comparison) -> str | None:
    """Re-export the weights (collective) and name the tensor the failing engine differs most
    on, when it can read its weights back; the message on rank 0, None elsewhere."""
    from megacredit.megatron.bridge import export_hf_weights

    reference = export_hf_weights(run.actor.model_chunks, run.hf_config, run.ctx)
    engine = engines_of(run.engine)[index] if run.engine is not None else None
    readback = engine.read_weights() if engine is not None else None
    worst = largest_weight_difference(reference, readback) if readback else None
    for _ in reference:
        pass
    if engine is None:
        return None
    name = f"engine {index} ({type(engine).__name__}{' ' + engine.url if hasattr(engine, 'url') else ''})"
    return sync_check_error(name, comparison, sync_index, worst, readback is not None)
