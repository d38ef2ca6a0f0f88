"""Resharding for the weight sync: any TP x PP layout -> the exact HF tensors of TP=1.

One spawned 2-process gloo run (module fixture) loads the same perturbed random HF model
(6 layers, vocab 101 so TP=2 pads the vocabulary) into TP=1 (DP=2), TP=2 and PP=2, and
exports it with every ``receivers`` mode. Checks:

- TP=2 and PP=2 give bitwise the tensors (names, order, dtypes) of TP=1, which equal the HF
  state dict; also with a bf16 cast done before the gather;
- "rank0": only global rank 0 yields; "stage": each pipeline stage's first TP rank yields
  exactly its own stage's tensors; "all" and an explicit list of ranks: each of them yields
  everything;
- the manifests (``hf_export_manifest``, whole and per stage) list exactly what is yielded;
- the remote-engine path: each stage's first TP rank opens its own broadcast group to a
  recording stand-in of an SGLang server (tests/unit/sglang_fake_server.py, which receives as
  SGLang's ModelRunner does) and sends its stage's buckets, rank 0 opening the update before
  (pause, SGLang's update session) and closing it after (end the session, flush, resume); the
  server ends with exactly the HF state dict;
- buckets respect their byte bound, and the extra memory of a streamed sync (tracked bytes of
  every tensor the export allocated, while alive) stays under one bucket plus twice the
  largest gathered parameter, while collecting all buckets reaches the whole model's size (so
  the tracker can tell the two apart).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch
from megacredit.utils.spawn import run_distributed
from megatron_test_helpers import each_loaded_model, perturbed_hf_model

pytestmark = pytest.mark.distributed
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))  # the fake SGLang server

LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}
MODELS = {
    "llama": dict(family="llama"),
    "qwen3_tied": dict(family="qwen3", tie_word_embeddings=True),
}
BUCKET_BYTES = 96 * 1024  # the model is ~1 MB of fp32: many buckets


def _random_hf_model(model_key: str):
    options = dict(MODELS[model_key])
    return perturbed_hf_model(options.pop("family"), sum(map(ord, model_key)), num_layers=6, **options)


def _largest_gathered_bytes(model, ctx) -> int:
    """max over all parameters of tp_size * shard bytes (the stack one gather holds)."""
    local = max(p.numel() * p.element_size() for p in model.parameters()) * ctx.tp_size
    value = torch.tensor([local], dtype=torch.int64)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return int(value)


def _streamed_peak(model, hf_config, ctx) -> tuple[int, int]:
    """(peak tracked bytes, bytes received) of a sync that drops each bucket after use."""
    from megacredit.megatron.bridge import iter_hf_weight_buckets
    from megacredit.utils.sync_stats import SyncMeter

    meter = SyncMeter()
    for bucket in meter.count(iter_hf_weight_buckets([model], hf_config, ctx, BUCKET_BYTES,
                                                     tracker=meter.tracker)):
        del bucket
    deadline = time.monotonic() + 30  # gloo's send/recv work objects release their tensors late
    while meter.tracker.current and time.monotonic() < deadline:
        time.sleep(0.05)
    assert meter.tracker.current == 0  # everything the export allocated is gone
    return meter.tracker.peak, meter.num_bytes


def _collected_peak(model, hf_config, ctx) -> int:
    from megacredit.megatron.bridge import iter_hf_weight_buckets
    from megacredit.utils.sync_stats import InFlightBytes

    tracker = InFlightBytes()
    kept = list(iter_hf_weight_buckets([model], hf_config, ctx, BUCKET_BYTES, tracker=tracker))
    del kept
    return tracker.peak


def _remote_stage_sync(model, hf_config, ctx, url) -> None:
    """The wiring for remote SGLang servers: one sender (and group) per pipeline stage."""
    from megacredit.megatron.bridge import hf_export_manifest, iter_hf_weight_buckets
    from megacredit.rollout.sglang_server import SGLangServerEngine
    from megacredit.rollout.weight_group import free_port

    manifest = hf_export_manifest([model], hf_config, ctx, stage_only=True)  # collective
    coordinator = SGLangServerEngine([url], pause_around_updates=False) if ctx.rank == 0 else None
    if coordinator is not None:
        coordinator.open_update()
    torch.distributed.barrier()
    buckets = iter_hf_weight_buckets([model], hf_config, ctx, BUCKET_BYTES, receivers="stage")
    if ctx.tp_rank == 0 and ctx.dp_rank == 0:
        sender = SGLangServerEngine([url], pause_around_updates=False)
        sender.connect_weight_sync("127.0.0.1", free_port(), group_name=f"megacredit_pp{ctx.pp_rank}",
                                   backend="gloo")
        sender.update_weights_from_buckets(buckets, manifest)
        sender.shutdown()
    else:
        for _ in buckets:  # the collective contract: every rank runs the export to the end
            pass
    torch.distributed.barrier()
    if coordinator is not None:
        coordinator.close_update()
        coordinator.shutdown()


def _views_export(model, hf_config, ctx) -> tuple[list, list[str]]:
    """The "rank0" export with ``views=True`` (copied here: the pairs leave this process) and
    the names of its tensors that share storage with a parameter of ``model``."""
    from megacredit.megatron.bridge import iter_hf_weight_buckets

    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    pairs = [pair for bucket in iter_hf_weight_buckets([model], hf_config, ctx, BUCKET_BYTES, views=True)
             for pair in bucket]
    return [(n, t.clone()) for n, t in pairs], [n for n, t in pairs if t.untyped_storage().data_ptr() in storages]


def _run_all_layouts(rank, world_size, hf_dirs, server_urls):
    from megacredit.megatron.bridge import hf_export_manifest, iter_hf_weight_buckets

    results = {}
    for layout, model_key, ctx, hf_config, model in each_loaded_model(LAYOUTS, hf_dirs):
        out = {"pp_rank": ctx.pp_rank, "tp_rank": ctx.tp_rank, "dp_rank": ctx.dp_rank}
        for receivers in ("rank0", "stage", "all", (0, 1)):
            out[receivers] = list(iter_hf_weight_buckets([model], hf_config, ctx, BUCKET_BYTES,
                                                         receivers=receivers))
        out["manifest"] = hf_export_manifest([model], hf_config, ctx)
        out["stage_manifest"] = hf_export_manifest([model], hf_config, ctx, stage_only=True)
        if model_key == "llama" and layout != "tp1":
            _remote_stage_sync(model, hf_config, ctx, server_urls[layout])
        out["bf16"] = [pair for bucket in iter_hf_weight_buckets(
            [model], hf_config, ctx, BUCKET_BYTES, dtype=torch.bfloat16) for pair in bucket]
        out["views"], out["views_of_params"] = _views_export(model, hf_config, ctx)
        out["largest_gathered"] = _largest_gathered_bytes(model, ctx)
        out["streamed_peak"], out["streamed_bytes"] = _streamed_peak(model, hf_config, ctx)
        out["collected_peak"] = _collected_peak(model, hf_config, ctx)
        results[layout, model_key] = out
    return results


@pytest.fixture(scope="module")
def reshard_run(tmp_path_factory):
    from sglang_fake_server import running_server, server_state

    root = tmp_path_factory.mktemp("reshard")
    hf_models, hf_dirs = {}, {}
    for model_key in MODELS:
        hf_models[model_key] = _random_hf_model(model_key)
        hf_dirs[model_key] = str(root / model_key)
        hf_models[model_key].save_pretrained(hf_dirs[model_key])
    with running_server() as tp2_url, running_server() as pp2_url:
        urls = {"tp2": tp2_url, "pp2": pp2_url}
        per_rank = run_distributed(_run_all_layouts, world_size=2, hf_dirs=hf_dirs, server_urls=urls)
        servers = {layout: server_state(url) for layout, url in urls.items()}
    return hf_models, per_rank, servers


def _flat(buckets) -> list[tuple[str, torch.Tensor]]:
    return [pair for bucket in buckets for pair in bucket]


def _assert_identical(got, expected) -> None:
    assert [n for n, _ in got] == [n for n, _ in expected]
    for (name, tensor), (_, reference) in zip(got, expected):
        assert tensor.dtype == reference.dtype and tensor.shape == reference.shape, name
        assert torch.equal(tensor, reference), name


@pytest.mark.parametrize("model_key", list(MODELS))
def test_tp1_export_is_the_hf_state_dict(reshard_run, model_key):
    hf_models, per_rank, _ = reshard_run
    state = hf_models[model_key].state_dict()
    if hf_models[model_key].config.tie_word_embeddings:
        state.pop("lm_head.weight")
    exported = _flat(per_rank[0]["tp1", model_key]["rank0"])
    assert sorted(n for n, _ in exported) == sorted(state)
    for name, tensor in exported:
        assert torch.equal(tensor, state[name]), name


@pytest.mark.parametrize("model_key", list(MODELS))
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_rank0_receives_exactly_the_tp1_tensors(reshard_run, layout, model_key):
    _, per_rank, _ = reshard_run
    reference = _flat(per_rank[0]["tp1", model_key]["rank0"])
    _assert_identical(_flat(per_rank[0][layout, model_key]["rank0"]), reference)
    assert per_rank[1][layout, model_key]["rank0"] == []
    _assert_identical(per_rank[0][layout, model_key]["bf16"], per_rank[0]["tp1", model_key]["bf16"])
    # the cast before the gather equals casting the fp32 result
    _assert_identical(per_rank[0][layout, model_key]["bf16"],
                      [(n, t.to(torch.bfloat16)) for n, t in reference])


@pytest.mark.parametrize("model_key", list(MODELS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_views_equal_the_copies_and_alias_the_parameters_only_without_tp(reshard_run, layout, model_key):
    """``views=True`` yields the same tensors; without TP the ones of rank 0's own stage are the
    parameters themselves (q/k/v of interleaved query groups excepted: a reshape copies them),
    never with TP 2 (the gather copies) nor those another stage sent."""
    _, per_rank, _ = reshard_run
    reference = _flat(per_rank[0]["tp1", model_key]["rank0"])
    result = per_rank[0][layout, model_key]
    _assert_identical(result["views"], reference)
    assert per_rank[1][layout, model_key]["views"] == []
    own_stage = set(result["stage_manifest"])
    qkv = (".q_proj.weight", ".k_proj.weight", ".v_proj.weight")
    expected = set() if layout == "tp2" else {n for n in own_stage if not n.endswith(qkv)}
    assert set(result["views_of_params"]) - {n for n in own_stage if n.endswith(qkv)} == expected
    if layout == "pp2":
        assert set(n for n, _ in reference) - own_stage  # stage 1's tensors came as copies


@pytest.mark.parametrize("model_key", list(MODELS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_stage_receivers_send_each_stage_from_that_stage(reshard_run, layout, model_key):
    _, per_rank, _ = reshard_run
    reference = _flat(per_rank[0]["tp1", model_key]["rank0"])
    yielded = {rank: _flat(per_rank[rank][layout, model_key]["stage"]) for rank in (0, 1)}
    if layout == "pp2":
        assert yielded[0] and yielded[1]  # both stages send, neither relays the other
        assert yielded[0][0][0] == "model.embed_tokens.weight"
        assert all(not n.startswith("model.layers.") or int(n.split(".")[2]) < 3 for n, _ in yielded[0])
        assert all(n.startswith("model.layers.") and int(n.split(".")[2]) >= 3 or n == "model.norm.weight"
                   or n == "lm_head.weight" for n, _ in yielded[1])
        _assert_identical(yielded[0] + yielded[1], reference)
    else:  # one stage: its first TP rank of DP replica 0 (rank 0) sends everything
        _assert_identical(yielded[0], reference)
        assert yielded[1] == []


@pytest.mark.parametrize("receivers", ["all", (0, 1)])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_receiver_gets_everything(reshard_run, layout, receivers):
    """Also rank 1 as a chosen destination: a DP replica (tp1), a TP peer (tp2), stage 1 (pp2)."""
    _, per_rank, _ = reshard_run
    reference = _flat(per_rank[0]["tp1", "llama"]["rank0"])
    for rank in (0, 1):
        _assert_identical(_flat(per_rank[rank][layout, "llama"][receivers]), reference)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_buckets_and_streamed_memory_are_bounded(reshard_run, layout):
    _, per_rank, _ = reshard_run
    result = per_rank[0][layout, "llama"]
    buckets = result["rank0"]
    total = sum(t.numel() * t.element_size() for _, t in _flat(buckets))
    assert len(buckets) > 4 and total > 8 * BUCKET_BYTES
    for bucket in buckets:
        size = sum(t.numel() * t.element_size() for _, t in bucket)
        assert size <= BUCKET_BYTES or len(bucket) == 1, [n for n, _ in bucket]
    assert result["streamed_bytes"] == total
    bound = BUCKET_BYTES + 2 * result["largest_gathered"]
    assert result["streamed_peak"] <= bound, (result["streamed_peak"], bound)
    assert result["collected_peak"] >= total  # the tracker sees what a consumer keeps
    assert result["streamed_peak"] < total / 2
    sender = per_rank[1][layout, "llama"]  # rank 1 sends (pp2) or gathers (tp2): no bucket
    assert sender["streamed_bytes"] == 0
    assert sender["streamed_peak"] <= 2 * result["largest_gathered"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_manifests_list_what_is_yielded(reshard_run, layout):
    _, per_rank, _ = reshard_run
    reference = _flat(per_rank[0]["tp1", "qwen3_tied"]["rank0"])
    for rank in (0, 1):
        result = per_rank[rank][layout, "qwen3_tied"]
        assert result["manifest"] == {n: tuple(t.shape) for n, t in reference}
        stage = _flat(result["stage"]) if result["tp_rank"] == 0 and result["dp_rank"] == 0 else None
        if stage is not None:
            assert result["stage_manifest"] == {n: tuple(t.shape) for n, t in stage}
    if layout == "pp2":
        assert set(per_rank[0][layout, "qwen3_tied"]["stage_manifest"]).isdisjoint(
            per_rank[1][layout, "qwen3_tied"]["stage_manifest"])


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_remote_engine_receives_every_stage_from_its_own_sender(reshard_run, layout):
    hf_models, _, servers = reshard_run
    state = servers[layout]
    expected = hf_models["llama"].state_dict()
    assert set(state["received"]) == set(expected)
    for name, tensor in expected.items():
        got = state["received"][name]
        assert got["shape"] == list(tensor.shape) and got["dtype"] == str(tensor.dtype), name
        assert torch.equal(torch.tensor(got["values"]), tensor.flatten()), name
    paths = [path for _, path, _ in state["requests"]]
    inits = [body for _, path, body in state["requests"] if path == "/init_weights_update_group"]
    stages = 2 if layout == "pp2" else 1
    assert sorted(b["group_name"] for b in inits) == [f"megacredit_pp{s}" for s in range(stages)]
    assert all(b["world_size"] == 2 and b["rank_offset"] == 1 for b in inits)
    assert paths[:2] == ["/pause_generation", "/begin_weight_update"]
    assert paths[-3:] == ["/end_weight_update", "/flush_cache", "/continue_generation"]
    updates = [b for _, path, b in state["requests"] if path == "/update_weights_from_distributed"]
    assert all(b["load_format"] == "flattened_bucket" and not b["flush_cache"] for b in updates)
    if layout == "pp2":  # each group carried only its own stage's layers
        for body in updates:
            layers = {int(n.split(".")[2]) for n in body["names"] if n.startswith("model.layers.")}
            first = body["group_name"] == "megacredit_pp0"
            assert all((index < 3) == first for index in layers), body["names"]
